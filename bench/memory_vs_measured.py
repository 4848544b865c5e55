"""Peak memory per rank, three ways, side by side: the planner's closed-form estimate
(plan/estimate.py), the real step on fake tensors (`dist-llama-plan --dry-run --memory`,
plan/memory.py) and the same step tracked on real tensors in gloo ranks (plan/memory.py's
tracked_memory: live tensor bytes, the CPU twin of torch.cuda.max_memory_allocated), for the debug
model on the layouts the tests check; then which published presets fit 80 GB with and without
activation checkpointing under the estimate.

  python bench/memory_vs_measured.py              # all layouts (the 8-rank one takes a minute on 2 cores)
  python bench/memory_vs_measured.py --max-ranks 2   # 2-rank layouts only
  python bench/memory_vs_measured.py --quick      # fsdp2 and the 80 GB table (a smoke test: seconds)
  python bench/memory_vs_measured.py --published  # only the 80 GB table

The loss's memory before and after chunking is bench/loss_memory.py's (another change).
"""

from __future__ import annotations

import argparse
import os
import sys

LAYOUTS = [
    ("fsdp2", 2, []),
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2 (1f1b)", 2, ["parallel.pp=2"]),
    ("cp2", 2, ["parallel.cp=2"]),
    ("fsdp2, ac=full", 2, ["parallel.ac=full"]),
    ("dp2 x tp2 x pp2 (1f1b)", 8, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"]),
]
DEBUG = "configs/debug.yaml"
BASE = ["model.vocab_size=258"]
MICRO = ["train.micro_batch_size=1"]
PUBLISHED = [  # preset, world size, overrides: each preset's own layout
    ("llama2_7b", 8, []), ("llama2_13b", 16, []), ("llama2_34b", 64, []), ("llama2_70b", 64, []),
    ("llama3_8b", 8, []), ("llama3_70b", 64, []), ("llama3_405b", 16384, []),
]


def _cfg(overrides, world, config=DEBUG):
    from dist_llama.plan.cli import resolved_config

    return resolved_config(config, [*BASE, *overrides] if config == DEBUG else [*MICRO, *overrides], world)


def _tracked(overrides, world):
    from dist_llama.plan.memory import tracked_memory_on_gloo

    return tracked_memory_on_gloo(_cfg(overrides, world))


def _fake(overrides, world):
    from dist_llama.plan.memory import fake_memory

    return fake_memory(_cfg(overrides, world), world, int(os.environ["RANK"]), "cpu")


def compare(overrides, world) -> list[tuple]:
    """(rank, estimate, fake peak, tracked real peak) per rank."""
    from dist_llama.plan.estimate import estimate
    from dist_llama.plan.hardware import hardware_preset
    from dist_llama.testing import run_ranks

    real = run_ranks(_tracked, world, overrides, world, timeout=900)
    fake = run_ranks(_fake, world, overrides, world, timeout=900)  # one process per fake group
    hw = hardware_preset("cpu", ranks=world)
    cfg = _cfg(overrides, world)
    return [(r, estimate(cfg, hw, rank=r).memory.total, fake[r]["peak"], real[r]["peak"]) for r in range(world)]


def _err(a, b) -> str:
    return f"{100 * (a / b - 1):+6.1f}%"


def published() -> None:
    from dist_llama.plan.estimate import estimate
    from dist_llama.plan.hardware import GiB, hardware_preset

    print(f"\n{'preset (own layout, mbs 1)':<22}{'gpus':>6}  {'no AC GiB':>10}  {'AC full GiB':>11}   fits 80 GB (no AC / AC)")
    for name, world, overrides in PUBLISHED:
        hw = hardware_preset("h100", ranks=world)
        totals = []
        for ac in ("none", "full"):
            cfg = _cfg([*overrides, f"parallel.ac={ac}"], world, f"configs/{name}.yaml")
            per_pp = cfg.parallel.world_size // cfg.parallel.pp
            totals.append(max(estimate(cfg, hw, rank=r * per_pp).memory.total for r in range(cfg.parallel.pp)))
        fits = " / ".join("yes" if t <= hw.memory_bytes else "no" for t in totals)
        print(f"{name:<22}{world:>6}  {totals[0] / GiB:10.1f}  {totals[1] / GiB:11.1f}   {fits}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-ranks", type=int, default=None, help="skip layouts with more ranks than this")
    ap.add_argument("--quick", action="store_true", help="the first layout and the 80 GB table (a smoke test)")
    ap.add_argument("--published", action="store_true", help="only the 80 GB table of the published presets")
    args = ap.parse_args()
    if not args.published:
        print(f"{DEBUG}, fp32 on gloo; peak bytes per rank (KiB); load average {os.getloadavg()[0]:.1f}")
        print(f"{'layout':<26}{'rank':>5}  {'estimate':>9} {'fake step':>10} {'real step':>10}  "
              f"{'est/fake':>8} {'fake/real':>9}")
        for name, world, overrides in LAYOUTS[:1] if args.quick else LAYOUTS:
            if args.max_ranks is not None and world > args.max_ranks:
                continue
            for r, est, fake, real in compare(overrides, world):
                print(f"{name:<26}{r:>5}  {est / 1024:9.0f} {fake / 1024:10.0f} {real / 1024:10.0f}  "
                      f"{_err(est, fake)} {_err(fake, real):>9}", flush=True)
                name = ""
    published()


if __name__ == "__main__":
    sys.path.insert(0, ".")
    main()
