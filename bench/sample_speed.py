"""Sampling speed: batched generation (K samples per prompt sharing the prompt's prefill) against one
prompt at a time (what dist-llama-generate does), and dist-llama-sample on 1 against 2 ranks, side by
side in one run (CPU by default).

The model is configs/debug.yaml's shape with random weights; both in-process modes sample the same
number of tokens per answer (no stop token). The rank comparison runs the command itself on a
saved copy of the model, and adds the ranks' tokens over the slowest rank's time.

  python bench/sample_speed.py                      # 16 prompts x 8 samples x 64 tokens
  python bench/sample_speed.py --device cuda --config configs/llama3_8b.yaml model.n_layers=4
  python bench/sample_speed.py --quick              # 4 prompts x 2 samples x 8 tokens: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_llama.config import load, to_object
from dist_llama.model import Transformer
from dist_llama.model.batch_generation import generate_batch
from dist_llama.model.generation import generate

ROOT = Path(__file__).resolve().parents[1]


def _save_hf(model: Transformer, out: Path) -> None:
    """The model as a Hugging Face directory dist-llama-sample reads (with --tokenizer byte)."""
    from safetensors.torch import save_file

    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), model.args).items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(model.args, torch.float32, 256, 257)))


def _command_rate(ckpt: Path, prompts: Path, nproc: int, args) -> tuple[float, int]:
    """(tokens/s over all ranks, tokens) of dist-llama-sample on `nproc` ranks."""
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "dist_llama.sample", "--checkpoint", str(ckpt), "--tokenizer", "byte", "--prompts",
           str(prompts), "--out", str(out), "--samples", str(args.samples), "--max-new-tokens", str(args.new_tokens),
           "--batch-prompts", str(args.batch_prompts), "--temperature", "1.0", "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    lines = re.findall(r"rank \d+: \d+ prompts, \d+ samples, (\d+) tokens, ([\d.]+) tokens/s", proc.stderr)
    tokens = sum(int(t) for t, _ in lines)
    seconds = max(int(t) / float(r) for t, r in lines if int(t))
    return tokens / seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/debug.yaml")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="4 prompts x 2 samples x 8 tokens (a smoke test)")
    args, overrides = ap.parse_known_args()
    if args.quick:
        args.prompts, args.samples, args.prompt_len, args.new_tokens, args.batch_prompts = 4, 2, 8, 8, 2
    cfg = to_object(load(str(ROOT / args.config), overrides))
    model_args = dataclasses.replace(cfg.model, vocab_size=258, attn_impl="sdpa")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(model_args).to(device)
    model.init_weights(0, buffer_device=device)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (args.prompt_len - i % 4,), generator=g).tolist() for i in range(args.prompts)]
    n_tokens = args.prompts * args.samples * args.new_tokens

    t0 = time.perf_counter()
    one = [generate(model, [p], args.new_tokens, temperature=1.0, seed=j) for p in prompts for j in range(args.samples)]
    t_one = time.perf_counter() - t0
    assert sum(len(x[0]) for x in one) == n_tokens
    t0 = time.perf_counter()
    for start in range(0, len(prompts), args.batch_prompts):
        out = generate_batch(model, prompts[start : start + args.batch_prompts], args.new_tokens,
                             samples=args.samples, temperature=1.0)
        assert all(len(c.ids) == args.new_tokens for c in out)
    t_batch = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        _save_hf(model.cpu(), ckpt)
        prompt_file = Path(tmp) / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"text": bytes(p).decode("latin-1")}) + "\n" for p in prompts))
        rate1, tokens1 = _command_rate(ckpt, prompt_file, 1, args)
        rate2, tokens2 = _command_rate(ckpt, prompt_file, 2, args)

    print(f"model: {args.config} (dim {model_args.dim}, {model_args.n_layers} layers), {args.device}; "
          f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens")
    print(f"{'mode':42s} {'tokens/s':>10s}")
    print(f"{'one prompt at a time (generate)':42s} {n_tokens / t_one:10.1f}")
    print(f"{f'batched, {args.batch_prompts} prompts x K per batch':42s} {n_tokens / t_batch:10.1f}")
    print(f"{'dist-llama-sample, 1 rank':42s} {rate1:10.1f}   ({tokens1} tokens)")
    print(f"{'dist-llama-sample, 2 ranks':42s} {rate2:10.1f}   ({tokens2} tokens)")
    print(f"batched / one-at-a-time: {t_one / t_batch:.2f}x;  2 ranks / 1 rank: {rate2 / rate1:.2f}x")


if __name__ == "__main__":
    main()
