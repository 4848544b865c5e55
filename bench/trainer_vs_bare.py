"""Trainer overhead: dist_llama's training loop vs a bare PyTorch loop, side by side in one run.

Both train the same model (same init, same data windows, same AdamW, same clipping, same dtype and
compile settings) in one process. They alternate (ABBA) in blocks of --steps steps for --rounds rounds so
machine noise hits both alike; the first block of each is warm-up and is dropped. The trainer's
time is its whole fit() (data loading, loss bookkeeping, metrics.jsonl), the bare loop's is a
plain forward / cross-entropy / backward / clip / step on pre-built batches.

  python bench/trainer_vs_bare.py                                   # CPU, debug model
  python bench/trainer_vs_bare.py --config configs/llama3_8b.yaml model.n_layers=8 \
      data.seq_len=8192 train.global_batch_size=1                   # one GPU (bf16, flex, compile)
  python bench/trainer_vs_bare.py --quick                           # 2 steps x 2 rounds: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dist_llama.model.flops import count_params, mfu
from dist_llama.parallel.env import init_distributed
from dist_llama.train.build import build_trainer, compute_dtype
from dist_llama.train.objectives import build_objective
from dist_llama.train.cli import resolve_config
from dist_llama.model import Transformer


def bare_loop(cfg, device, dtype, batches):
    """The same training step with nothing around it: plain PyTorch, no dist_llama code but the model."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)
    if cfg.train.compile if cfg.train.compile is not None else device.type == "cuda":
        for block in model.layers.values():
            block.compile()
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, foreach=True)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def run(n):
        for i in range(n):
            b = batches[i % len(batches)]
            with autocast:
                logits = model(b["tokens"], doc_ids=b["doc_ids"], positions=b["positions"])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()
    return run


def timed(fn, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=16, help="timed blocks of each (after one warm-up)")
    parser.add_argument("--verbose", action="store_true", help="print every block's time")
    parser.add_argument("--quick", action="store_true", help="2 steps x 2 rounds (a smoke test)")
    args, overrides = parser.parse_known_args()
    if args.quick:  # a tiny model unless the command line says otherwise
        args.steps, args.rounds = 2, 2
        overrides = ["model.n_layers=1", "model.dim=64", "data.seq_len=32", "train.global_batch_size=2", *overrides]
    run_dir = tempfile.mkdtemp(prefix="bench-")
    total = args.steps * (args.rounds + 1)
    cfg, sources = resolve_config(args.config, [
        *overrides, f"train.run_dir={run_dir}", f"train.steps={total}", "checkpoint.enabled=false",
        "logging.console=false", "logging.wandb_mode=disabled", "optim.warmup_steps=2"], 1)
    env = init_distributed(cfg.train.device)
    trainer = build_trainer(cfg, env, sources)
    # The bare loop trains on the windows the trainer sees, fetched up front.
    loader = build_objective(cfg).loader(sources, dp_rank=0, dp_size=1)
    batches = [{k: v.to(env.device) for k, v in loader.next_batch().items()} for _ in range(args.steps)]
    bare = bare_loop(cfg, env.device, compute_dtype(cfg, env.device), batches)

    def framework(n):
        trainer.cfg.train.steps = trainer.step + n
        trainer.fit()

    times = {"dist_llama": [], "bare": []}
    order = [("dist_llama", framework), ("bare", bare)]
    for r in range(args.rounds + 1):
        for name, fn in (order if r % 2 else order[::-1]):  # ABBA: neither always goes first
            t = timed(fn, args.steps, env.device)
            if r > 0:
                times[name].append(t)
            if args.verbose:
                print(f"round {r} {name}: {t:.4f} s/step", flush=True)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    peak = trainer.parts.peak_flops
    total_params, _ = count_params(cfg.model)
    print(f"device {env.device} ({torch.cuda.get_device_name() if env.device.type == 'cuda' else 'cpu'}), "
          f"dtype {compute_dtype(cfg, env.device)}, params {total_params / 1e6:.1f}M, "
          f"layers {cfg.model.n_layers}, dim {cfg.model.dim}, {tokens} tokens/step, "
          f"peak {peak / 1e12:.1f} TFLOP/s")
    print(f"{'loop':<12}{'median step s':>15}{'tokens/s':>14}{'MFU':>9}")
    tps = {}
    per_token = trainer.parts.flops_per_token(cfg.data.seq_len)
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        print(f"{name:<12}{med:>15.4f}{tps[name]:>14,.0f}{100 * mfu(tps[name], per_token, peak):>8.2f}%")
    paired = [b / d for d, b in zip(times["dist_llama"], times["bare"])]
    print(f"ratio dist_llama/bare tokens/s: {tps['dist_llama'] / tps['bare']:.3f} (medians), "
          f"{statistics.median(paired):.3f} (median of {len(paired)} adjacent-block ratios)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
