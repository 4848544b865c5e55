"""Generation speed with and without the KV cache, side by side in one run (CPU by default).

The same model (configs/debug.yaml's shape, random weights), the same prompt and greedy decoding;
without the cache every new token recomputes the whole sequence, with it each costs one position.
Both must produce the same ids. Each mode runs --repeats times after a short warm-up; the best
time counts.

  python bench/generate_speed.py                                     # debug model, 64 + 256 tokens
  python bench/generate_speed.py --config configs/llama3_8b.yaml model.n_layers=2 --device cuda
  python bench/generate_speed.py --quick                             # 8 + 16 tokens, once: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dist_llama.config import load, to_object
from dist_llama.model import Transformer
from dist_llama.model.generation import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/debug.yaml")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="8 + 16 tokens, one repeat (a smoke test)")
    args, overrides = ap.parse_known_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 8, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    margs = to_object(load(args.config, overrides)).model
    if margs.vocab_size == -1:
        margs = dataclasses.replace(margs, vocab_size=258)  # the byte tokenizer's
    margs = dataclasses.replace(margs, attn_impl="sdpa",
                                max_seq_len=max(margs.max_seq_len, args.prompt_len + args.new_tokens))
    device = torch.device(args.device)
    with torch.device(device):
        model = Transformer(margs)
    model.init_weights(seed=0)
    prompt = torch.randint(0, margs.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()

    def timed(use_cache: bool):
        generate(model, [prompt], 8, use_cache=use_cache)  # warm-up
        best, ids = float("inf"), None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = generate(model, [prompt], args.new_tokens, use_cache=use_cache)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return args.new_tokens / best, ids

    cached, cached_ids = timed(True)
    full, full_ids = timed(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.config} ({n_params / 1e6:.2f}M parameters), {device}, {torch.get_num_threads()} threads; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"  {'mode':<20}{'tokens/s':>12}")
    print(f"  {'KV cache':<20}{cached:>12.1f}")
    print(f"  {'no cache (recompute)':<20}{full:>12.1f}")
    print(f"  ratio (cache / no cache): {cached / full:.2f}x; same ids: {cached_ids == full_ids}")


if __name__ == "__main__":
    main()
