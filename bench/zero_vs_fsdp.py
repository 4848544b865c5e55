"""DeepSpeed ZeRO-1/2/3 against FSDP2 on the same model and global batch, 2 gloo ranks, one run:
tokens/s and peak memory per rank, side by side.

Each engine trains in fork-started ranks on this machine (fp32, the trainer of dist_llama.train).
Memory on CPU ranks is resident memory as the OS sees it: the peak RSS of each rank during the timed
steps (the high-water mark is reset just before them, through /proc/self/clear_refs), minus that
rank's RSS once everything is imported and before the model is built. So it holds the model states
(weights, gradients, optimizer states, DeepSpeed's flat buffers and fp32 master copies), activations
and communication buffers; it also holds memory the allocator freed but kept.
What to expect: FSDP2 and ZeRO-3 shard weights, gradients and Adam states; ZeRO-2 keeps whole
weights on every rank; ZeRO-1 whole weights and gradients. DeepSpeed also keeps an fp32 master copy
of its shard (a second copy even in fp32) and buffers sized for GPU-scale models: with its defaults
(stage3_max_live_parameters and stage3_max_reuse_distance 1e9, prefetch bucket 5e7) ZeRO-3 keeps
gathered weights alive between uses in a model this small, so here it holds more than FSDP2.

  python bench/zero_vs_fsdp.py                  # the default model below (~3 min on 2 cores)
  python bench/zero_vs_fsdp.py --steps 8 model.dim=512 ...   # more steps, other overrides
  python bench/zero_vs_fsdp.py --quick          # FSDP2 and ZeRO-3 on a tiny model, 1 step (a smoke test)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile

ENGINES = [
    ("FSDP2", ["parallel.engine=fsdp"]),
    ("ZeRO-1", ["parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    ("ZeRO-2", ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    ("ZeRO-3", ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
]
# ~93M parameters and short sequences, so that model states (weights, gradients, Adam) outweigh activations.
MODEL = ["model.dim=1024", "model.n_layers=8", "model.n_heads=16", "model.n_kv_heads=8", "data.seq_len=64",
         "train.global_batch_size=8", "train.micro_batch_size=2", "checkpoint.enabled=false",
         "logging.console=false", "logging.wandb_mode=disabled"]
WORLD = 2


def _rss_mib(field: str) -> float:
    """VmRSS (now, after giving the allocator's free memory back) or VmHWM (peak since the last
    reset) of this process, MiB."""
    if field == "VmRSS":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rank(overrides: list[str], steps: int, warmup: int):
    import torch.distributed as dist

    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config("configs/debug.yaml", [*MODEL, *overrides, f"train.steps={warmup}",
                                                          f"train.run_dir={tempfile.mkdtemp()}"], WORLD)
    env = init_distributed("cpu")
    if cfg.parallel.engine == "deepspeed":  # its imports are not the engine's memory
        from dist_llama.train.engines.zero import import_deepspeed

        import_deepspeed(env.device)
    baseline = _rss_mib("VmRSS")
    trainer = build_trainer(cfg, env, dataset)
    trainer.fit()  # warm-up: first-step allocations, DeepSpeed's lazy buffers
    _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    cfg.train.steps = warmup + steps
    trainer.fit()
    peak = _rss_mib("VmHWM")
    step_times = [h["step_time_s"] for h in trainer.history[warmup:]]
    losses = [h["loss"] for h in trainer.history]
    # Whole-model parameter count (FSDP's DTensors report the global size, ZeRO-3's placeholders ds_numel).
    params = sum(getattr(p, "ds_numel", p.numel()) for part in trainer.engine.parts for p in part.parameters())
    dist.destroy_process_group()
    return {"step_time": statistics.median(step_times), "tokens": cfg.train.global_batch_size * cfg.data.seq_len,
            "mem": peak - baseline, "losses": losses, "params": params}


def main():
    from dist_llama.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="FSDP2 and ZeRO-3, a tiny model, 1 step (a smoke test)")
    args, overrides = parser.parse_known_args()
    engines = [ENGINES[0], ENGINES[-1]] if args.quick else ENGINES
    if args.quick:
        args.steps, args.warmup = 1, 1
        overrides = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", *overrides]
    MODEL.extend(overrides)
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(f"model: {' '.join(o for o in MODEL if o.startswith(('model.', 'data.', 'train.')))}; "
          f"{WORLD} gloo ranks, fp32; median of {args.steps} steps after {args.warmup}")
    print(f"{'engine':<8}{'step s':>9}{'tokens/s':>10}{'vs FSDP2':>10}{'peak MiB/rank':>15}"
          f"{'(rank 0, 1)':>16}{'loss@end':>10}")
    base = None
    for name, engine in engines:
        results = run_ranks(_rank, WORLD, [*engine], args.steps, args.warmup, timeout=1800)
        step = statistics.median(r["step_time"] for r in results)
        tps = results[0]["tokens"] / step
        base = base or tps
        mems = [r["mem"] for r in results]
        print(f"{name:<8}{step:>9.3f}{tps:>10,.0f}{tps / base:>10.2f}{max(mems):>15,.0f}"
              f"{f'({mems[0]:,.0f}, {mems[1]:,.0f})':>16}{results[0]['losses'][-1]:>10.4f}", flush=True)
    params = results[0]["params"]
    print(f"peak MiB/rank: peak RSS during the timed steps minus the RSS before the model was built. "
          f"{params / 1e6:.1f}M parameters: fp32 weights {4 * params / 2**20:,.0f} MiB, Adam states "
          f"{8 * params / 2**20:,.0f} MiB in all")


if __name__ == "__main__":
    main()
