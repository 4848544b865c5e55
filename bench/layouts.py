"""Tokens/s of every parallel layout on the same tiny model and global batch, from one run, plus
the pipeline's measured idle time beside the theoretical bubble (PP-1)/(V*M).

Each layout trains in fork-started gloo ranks on this machine. Busy time of a pipeline rank is the
time its stages spend in forward/backward computation (timed around PipelineStage's compute
calls); everything else in the step is waiting. Measured bubble = idle / busy, comparable to
(PP-1)/(V*M) (bubble time over ideal compute time).

  python bench/layouts.py            # all layouts; 8-rank ones included (slow on 2 cores)
  python bench/layouts.py --max-ranks 2    # skip the 8-rank layout
  python bench/layouts.py --quick    # 1 rank, dp2, pp2 interleaved: a tiny model, 1 step (a smoke test: seconds)

On a 2-core machine layouts with more ranks than cores are slower for lack of cores, not
because of the layout: compare like with like (same rank count).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

LAYOUTS = [
    # name, world size, overrides
    ("1 rank", 1, []),
    ("dp2 (FSDP)", 2, []),
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2 gpipe", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    ("pp2 1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    ("pp2 interleaved_1f1b v2", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                    "parallel.pp_virtual_stages=2"]),
    ("pp2 interleaved_zb v2", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb",
                                  "parallel.pp_virtual_stages=2"]),
    ("cp2", 2, ["parallel.cp=2"]),
    ("dp2 x pp2 x tp2", 8, ["parallel.dp_shard=2", "parallel.pp=2", "parallel.tp=2"]),
]
MODEL = ["model.dim=256", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=256",
         "train.global_batch_size=16", "train.micro_batch_size=2", "checkpoint.enabled=false",
         "logging.console=false", "logging.wandb_mode=disabled"]
QUICK = ("1 rank", "dp2 (FSDP)", "pp2 interleaved_1f1b v2")
"""--quick: one layout of each code path the table measures (no parallelism, data parallel, a pipeline)."""
QUICK_MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=32",
               "train.global_batch_size=4", "train.micro_batch_size=1"]


def _time_stage_compute(schedule, busy: list[float]) -> None:
    """Accumulate wall time spent inside each stage's compute calls into busy[0]."""
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            original = getattr(stage, name, None)
            if original is None:
                continue

            def timed(*args, _original=original, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    busy[0] += time.perf_counter() - t0

            setattr(stage, name, timed)


def _rank(overrides: list[str], world_size: int, steps: int, warmup: int):
    import torch.distributed as dist

    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config
    from dist_llama.train.step import PipelineStep

    cfg, dataset = resolve_config("configs/debug.yaml", [*MODEL, *overrides, f"train.steps={warmup}",
                                                          f"train.run_dir={tempfile.mkdtemp()}"], world_size)
    env = init_distributed("cpu")
    trainer = build_trainer(cfg, env, dataset)
    trainer.fit()  # warm-up
    busy = [0.0]
    if isinstance(trainer.parts.step, PipelineStep):
        _time_stage_compute(trainer.parts.step.schedule, busy)
    cfg.train.steps = warmup + steps
    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0
    step_times = [h["step_time_s"] for h in trainer.history[warmup:]]
    dist.destroy_process_group()
    return {"step_time": statistics.median(step_times), "busy": busy[0], "elapsed": elapsed,
            "tokens": cfg.train.global_batch_size * cfg.data.seq_len, "n_micro": trainer.parts.step.n_micro,
            "virtual": cfg.parallel.pp_virtual_stages, "pp": cfg.parallel.pp}


def main():
    from dist_llama.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-ranks", type=int, default=None, help="skip layouts with more ranks than this")
    parser.add_argument("--quick", action="store_true", help="3 layouts, a tiny model, 1 step (a smoke test)")
    args = parser.parse_args()
    model = []
    if args.quick:
        args.max_ranks, args.steps, args.warmup, model = 2, 1, 1, QUICK_MODEL
    print(f"model: {' '.join(o for o in [*MODEL, *model] if o.startswith(('model.', 'data.', 'train.')))}")
    print(f"{'layout':<26}{'ranks':>6}{'step s':>9}{'tokens/s':>10}{'vs 1 rank':>10}"
          f"{'bubble meas.':>14}{'(PP-1)/(V*M)':>14}")
    base = None
    for name, world, overrides in LAYOUTS:
        if (args.max_ranks is not None and world > args.max_ranks) or (args.quick and name not in QUICK):
            continue
        results = run_ranks(_rank, world, [*model, *overrides], world, args.steps, args.warmup, timeout=1200)
        step = statistics.median(r["step_time"] for r in results)
        tps = results[0]["tokens"] / step
        base = base or tps
        measured = theory = ""
        pp = results[0]["pp"]
        if pp > 1:
            # idle/busy per pipeline rank, averaged; M micro-batches, V stages per rank.
            ratios = [(r["elapsed"] - r["busy"]) / r["busy"] for r in results]
            measured = f"{statistics.mean(ratios):.3f}"
            theory = f"{(pp - 1) / (results[0]['virtual'] * results[0]['n_micro']):.3f}"
        print(f"{name:<26}{world:>6}{step:>9.3f}{tps:>10,.0f}{tps / base:>10.2f}{measured:>14}{theory:>14}",
              flush=True)


if __name__ == "__main__":
    main()
