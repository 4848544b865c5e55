"""Peak memory per rank: the planner's closed-form estimate (plan/estimate.py) beside the real step
on fake tensors (`dist-llama-plan --dry-run --memory`, plan/memory.py), in two tables.

1. Small layouts, three ways: estimate, fake step and the same step tracked on real tensors in gloo
   ranks (plan/memory.py's tracked_memory: live tensor bytes, the CPU twin of
   torch.cuda.max_memory_allocated), for the debug model on the layouts the tests check, every rank.
2. At scale, on 80 GB H100s (bf16, the CUDA target's attention): each published preset's own layout,
   and the best three layouts `dist-llama-plan --search --fast` finds for llama3_405b on 16,384 GPUs
   and llama3_70b on 1,024: the first rank of every pipeline stage (its tp, cp and dp peers hold the
   same shapes), estimate vs fake step.

  python bench/memory_vs_measured.py              # everything (the 70B fake steps take minutes each)
  python bench/memory_vs_measured.py --small      # table 1 only
  python bench/memory_vs_measured.py --scale      # table 2 only
  python bench/memory_vs_measured.py --quick      # one small layout and the 405B preset's first stage
"""

from __future__ import annotations

import argparse
import os
import sys

SMALL = [  # name, world size, overrides: the layouts tests/test_memory_dryrun.py and
    # tests/test_estimate_vs_fake_step.py check
    ("fsdp2", 2, []),
    ("tp2", 2, ["parallel.tp=2"]),
    ("cp2", 2, ["parallel.cp=2"]),
    ("fsdp2, ac=full", 2, ["parallel.ac=full"]),
    ("fsdp2, ac=selective", 2, ["parallel.ac=selective"]),
    ("pp2 (1f1b)", 2, ["parallel.pp=2"]),
    ("pp2 (gpipe)", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    ("pp4 interleaved v2", 4, ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b",
                               "parallel.pp_virtual_stages=2", "model.n_layers=8"]),
    ("pp4 zero bubble v2", 4, ["parallel.pp=4", "parallel.pp_schedule=interleaved_zb",
                               "parallel.pp_virtual_stages=2", "model.n_layers=8"]),
    ("dp2 x tp2 x pp2 (1f1b)", 8, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"]),
]
DEBUG = "configs/debug.yaml"
BASE = ["model.vocab_size=258", "train.micro_batch_size=1"]
PRESETS = [  # preset, world size: each preset's own layout (its parallel section) on that many GPUs
    ("llama2_7b", 8), ("llama2_13b", 16), ("llama2_34b", 64), ("llama2_70b", 64),
    ("llama3_8b", 8), ("llama3_70b", 64), ("llama3_405b", 16384),
]
SEARCHES = [("llama3_405b", 16384), ("llama3_70b", 1024)]
GiB = 2**30


def _cfg(overrides, world, config=DEBUG):
    from dist_llama.plan.cli import resolved_config

    return resolved_config(config, [*BASE, *overrides] if config == DEBUG else overrides, world)


def _tracked(overrides, world):
    from dist_llama.plan.memory import tracked_memory_on_gloo

    return tracked_memory_on_gloo(_cfg(overrides, world))


def _err(a, b) -> str:
    return f"{100 * (a / b - 1):+6.1f}%"


def small(layouts) -> None:
    from dist_llama.plan.estimate import estimate
    from dist_llama.plan.hardware import hardware_preset
    from dist_llama.plan.memory import fake_memories
    from dist_llama.testing import run_ranks

    print(f"{DEBUG}, fp32 on gloo; peak bytes per rank (KiB); load average {os.getloadavg()[0]:.1f}")
    print(f"{'layout':<26}{'rank':>5}  {'estimate':>9} {'fake step':>10} {'real step':>10}  "
          f"{'est/fake':>8} {'fake/real':>9}")
    for name, world, overrides in layouts:
        cfg = _cfg(overrides, world)
        real = run_ranks(_tracked, world, overrides, world, timeout=900)
        fake = dict(fake_memories([(cfg, world, r) for r in range(world)], "cpu"))
        hw = hardware_preset("cpu", ranks=world)
        for r in range(world):
            est, f, t = estimate(cfg, hw, rank=r).memory.total, fake[r]["peak"], real[r]["peak"]
            print(f"{name:<26}{r:>5}  {est / 1024:9.0f} {f / 1024:10.0f} {t / 1024:10.0f}  "
                  f"{_err(est, f)} {_err(f, t):>9}", flush=True)
            name = ""


def _stage_ranks(cfg) -> list[int]:
    per_pp = cfg.parallel.world_size // cfg.parallel.pp
    return [r * per_pp for r in range(cfg.parallel.pp)]


def _layout(cfg) -> str:
    p = cfg.parallel
    pipeline = f" pp{p.pp} {p.pp_schedule}" + (f" v{p.pp_virtual_stages}" if p.pp_virtual_stages > 1 else "")
    return f"tp{p.tp} cp{p.cp}{pipeline if p.pp > 1 else ''} dp{p.dp} ac={p.ac}"


def at_scale(rows, first_stage_only: bool = False) -> list[float]:
    """rows: (label, config, world). Prints estimate vs fake step per pipeline stage; returns the errors."""
    from dist_llama.plan.estimate import estimate
    from dist_llama.plan.hardware import hardware_preset
    from dist_llama.plan.memory import fake_memories

    runs, where = [], []
    for label, cfg, world in rows:
        for rank in _stage_ranks(cfg)[:1] if first_stage_only else _stage_ranks(cfg):
            runs.append((cfg, world, rank))
            where.append(label)
    print(f"\nbf16 on 80 GB H100s; tensor peak per rank (GiB, without the per-device allowances); "
          f"{len(runs)} fake steps")
    print(f"{'preset / layout':<58}{'rank':>7}  {'estimate':>8} {'fake step':>9}  {'est/fake':>8}  peak moment")
    results = {}
    for index, report in fake_memories(runs, "cuda"):
        results[index] = report
        cfg, world, rank = runs[index]
        print(f"  {len(results)}/{len(runs)}: {where[index]}, rank {rank}: {report['peak'] / GiB:.1f} GiB "
              f"in {report['seconds']:.0f} s", file=sys.stderr, flush=True)
    errors, last = [], None
    for i, (cfg, world, rank) in enumerate(runs):
        est = estimate(cfg, hardware_preset("h100", ranks=world), rank=rank).memory.total
        fake = results[i]["peak"]
        errors.append(est / fake - 1)
        label = where[i] if where[i] != last else ""
        last = where[i]
        moment = results[i]["moment"]
        print(f"{label:<58}{rank:>7}  {est / GiB:8.1f} {fake / GiB:9.1f}  {_err(est, fake)}  "
              f"{moment['phase']} mb {moment['micro_batch']}", flush=True)
    return errors


def scale_rows(quick: bool) -> list:
    from dist_llama.plan.hardware import hardware_preset
    from dist_llama.plan.search import search

    rows = []
    for name, world in PRESETS[-1:] if quick else PRESETS:
        cfg = _cfg([], world, f"configs/{name}.yaml")
        rows.append((f"{name} own: {_layout(cfg)}", cfg, world))
    if not quick:
        for name, world in SEARCHES:
            base = _cfg([], world, f"configs/{name}.yaml")
            hw = hardware_preset("h100", ranks=world)
            for i, (cfg, _) in enumerate(search(base, world, hw, hw.memory_bytes, top=3)):
                rows.append((f"{name} {world} search #{i + 1}: {_layout(cfg)}", cfg, world))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small layout and the 405B preset's first stage")
    ap.add_argument("--small", action="store_true", help="only the small layouts, three ways")
    ap.add_argument("--scale", action="store_true", help="only the presets and search results at scale")
    args = ap.parse_args()
    if not args.scale:
        small(SMALL[:1] if args.quick else SMALL)
    if not args.small:
        errors = at_scale(scale_rows(args.quick), first_stage_only=args.quick)
        print(f"largest |estimate / fake step - 1|: {100 * max(abs(e) for e in errors):.1f}%")


if __name__ == "__main__":
    sys.path.insert(0, ".")
    main()
