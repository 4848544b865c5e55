"""The planner's estimate against real short trainings on this machine: per-rank model-state memory,
saved activations and step time of the debug model on a few gloo layouts, side by side with the
relative error (estimate / measured - 1).

Each layout trains configs/debug.yaml in fork-started gloo ranks (one intra-op thread each) and
measures, on every rank (dist_llama.plan.measure):
- params+grads+Adam: bytes of the live parameter, gradient and AdamW-state storages at the step;
- saved activations: peak bytes of tensors autograd saved for backward (parameters excluded),
  compared with the estimate's activations + logits;
- step time: the trainer's own step_time_s, median over the measured steps after warm-up.
The estimate uses the "cpu" hardware preset for the layout's rank count: one thread's measured
matmul rate shared among the ranks, and gloo latency / bandwidth recorded by dist_llama.plan.calibrate.

  python bench/plan_vs_measured.py            # all layouts (8-rank ones take a minute on 2 cores)
  python bench/plan_vs_measured.py --max-ranks 2    # 2-rank layouts only
  python bench/plan_vs_measured.py --quick    # fsdp2, 1 step (a smoke test: seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

LAYOUTS = [
    # name, world size, overrides
    ("fsdp2", 2, []),
    ("tp2", 2, ["parallel.tp=2"]),
    ("fsdp8", 8, []),
    ("dp2 x tp2 x pp2 (1f1b)", 8, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"]),
]
QUIET = ["checkpoint.enabled=false", "logging.console=false", "logging.wandb_mode=disabled"]


def _rank(overrides: list[str], world_size: int, steps: int, warmup: int) -> dict:
    import logging

    import torch.distributed as dist

    from dist_llama.parallel.env import init_distributed
    from dist_llama.plan.measure import SavedActivations, StateProbe
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    # DTensor warns at every step that the 2-D gradient-norm reduction takes two all-reduces.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    cfg, dataset = resolve_config("configs/debug.yaml", [*QUIET, *overrides, f"train.steps={warmup}",
                                                          f"train.run_dir={tempfile.mkdtemp()}"], world_size)
    env = init_distributed("cpu")
    trainer = build_trainer(cfg, env, dataset)
    states = StateProbe(trainer.engine.parts, trainer.engine.optimizers)
    saved = SavedActivations(trainer.engine.parts)
    with saved.track():
        trainer.fit()  # warm-up
        saved.reset()
        cfg.train.steps = warmup + steps
        trainer.fit()
    step_times = [h["step_time_s"] for h in trainer.history[warmup:]]
    dist.destroy_process_group()
    return {"cfg": cfg, "rank": env.rank, "step_s": statistics.median(step_times), **states.bytes,
            "saved_peak": saved.peak}


def measure(overrides: list[str], world_size: int, steps: int = 5, warmup: int = 2) -> list[dict]:
    """One dict per rank: its resolved config, measured bytes and median step time."""
    from dist_llama.testing import run_ranks

    return run_ranks(_rank, world_size, overrides, world_size, steps, warmup, timeout=900)


def compare(results: list[dict]) -> list[dict]:
    """Estimate of each measured rank beside its measurement."""
    from dist_llama.plan.estimate import estimate, hardware_preset

    world = len(results)
    hw = hardware_preset("cpu", ranks=world)
    rows = []
    for r in results:
        e = estimate(r["cfg"], hw, rank=r["rank"])
        m = e.memory
        rows.append({"rank": r["rank"],
                     "states": (m.params + m.master + m.grads + m.optimizer,
                                r["params"] + r["grads"] + r["optimizer"]),
                     "activations": (m.activations + m.logits, r["saved_peak"]),
                     "step_s": (e.step_seconds, r["step_s"]),
                     "compute_s": e.compute_seconds, "comm_s": e.step_seconds - e.compute_seconds})
    return rows


def _err(pair) -> str:
    est, meas = pair
    return f"{100 * (est / meas - 1):+6.0f}%" if meas else "   n/a"


def format_rows(name: str, rows: list[dict]) -> list[str]:
    kib = 2**10
    out = []
    for r in rows:
        s, a, t = r["states"], r["activations"], r["step_s"]
        out.append(f"{name:<24}{r['rank']:>5}  {s[0] / kib:8.0f} {s[1] / kib:8.0f} {_err(s)}  "
                   f"{a[0] / kib:8.0f} {a[1] / kib:8.0f} {_err(a)}  {t[0]:7.3f} {t[1]:7.3f} {_err(t)}")
        name = ""
    return out


HEADER = (f"{'layout':<24}{'rank':>5}  {'params+grads+Adam KiB':^25}  {'saved activations KiB':^25}  "
          f"{'step s':^23}\n{'':<29}{'est.':>8} {'meas.':>8} {'err':>7}  {'est.':>8} {'meas.':>8} {'err':>7}  "
          f"{'est.':>7} {'meas.':>7} {'err':>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-ranks", type=int, default=None, help="skip layouts with more ranks than this")
    ap.add_argument("--quick", action="store_true", help="the first layout, 1 step (a smoke test)")
    args = ap.parse_args()
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    if args.quick:
        args.steps, args.warmup = 1, 1
    print(f"configs/debug.yaml; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the runs "
          "(other processes sharing the cores slow the measured steps)")
    print(HEADER, flush=True)
    for name, world, overrides in layouts:
        if args.max_ranks is not None and world > args.max_ranks:
            continue
        rows = compare(measure(overrides, world, args.steps, args.warmup))
        print("\n".join(format_rows(name, rows)), flush=True)


if __name__ == "__main__":
    main()
