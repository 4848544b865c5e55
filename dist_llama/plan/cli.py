"""dist-llama-plan: predict memory, communication, step time and MFU of a layout before running it;
and simulate goodput under failures (--goodput).

    dist-llama-plan --config llama3_405b.yaml --gpus 8192 parallel.tp=8 parallel.pp=16 \\
        parallel.pp_schedule=interleaved_1f1b parallel.pp_virtual_stages=7 train.micro_batch_size=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from dist_llama.config import ConfigError, load, resolve_parallel, to_object, validate_model
from dist_llama.config.errors import ArgumentParser as OneLineParser
from dist_llama.plan.allowances import Allowances, device_allowances, refit
from dist_llama.plan.engine_costs import engine_costs
from dist_llama.plan.estimate import Estimate, estimate
from dist_llama.plan.hardware import GiB, hardware_preset

EXIT_BAD_INPUT = 2
DEFAULT_CONFIRM = 3
"""Layouts --search steps on fake tensors unless told otherwise: an estimate alone has ranked layouts
whose real peak was over the cap first."""


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="dist-llama-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML preset (path, or a name under configs/)")
    ap.add_argument("--gpus", type=int, default=8, help="world size")
    ap.add_argument("--hardware", default="h100", choices=("h100", "h200", "a100", "cpu"))
    ap.add_argument("--rank", type=int, default=0, help="the rank to describe")
    ap.add_argument("--search", action="store_true",
                    help="list the best layouts (tp, cp, pp, schedule, AC) for --gpus under --memory-cap")
    ap.add_argument("--memory-cap", type=float, default=None,
                    help="GiB per GPU for --search (default: the hardware's memory)")
    ap.add_argument("--top", type=int, default=10, help="layouts --search lists")
    ap.add_argument("--confirm", type=int, default=None, metavar="N",
                    help="with --search: run the real step on fake tensors (as --dry-run --memory) for the peak ranks "
                         "(the two pipeline ranks the estimate puts highest) of the best layouts, in order, until N of them fit (default "
                         "3; at most 2N stepped), print its peak beside the estimate and drop the layouts whose peak "
                         "plus the device's allowances is over the cap")
    ap.add_argument("--fast", action="store_true",
                    help="with --search: rank by the estimate alone (no fake step; the output says so)")
    ap.add_argument("--png", default=None, help="with --search: also draw MFU and memory per layout to this PNG")
    ap.add_argument("--dry-run", action="store_true",
                    help="also build this rank's real model parts on a fake process group and compare")
    ap.add_argument("--memory", action="store_true",
                    help="with --dry-run: also run this rank's real training step (forward, backward, optimizer; "
                         "pipeline schedule, TP, CP, AC, FSDP as configured) on fake tensors and report its "
                         "peak memory by kind and the moment of the peak")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-expandable-segments", dest="expandable_segments", action="store_false",
                    help="allow for the caching allocator's fragmentation without "
                         "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (15%% of the tensor peak instead of 5%%)")
    ap.add_argument("--goodput", action="store_true",
                    help="also simulate effective training time under Llama 3's failure rate, with Llama 3's "
                         "detection/restart/checkpoint figures beside dist_llama's measured ones scaled to this job")
    # key=value overrides may stand anywhere on the line (parse_known_args collects them).
    return ap


def resolved_config(config: Optional[str], overrides: Sequence[str], world_size: int, layout: bool = True):
    """Load, override and validate the parts of the config the planner uses; layout=False leaves
    the parallel layout unchecked (--search replaces it with every layout it tries)."""
    cfg = to_object(load(config, overrides))
    validate_model(cfg.model)
    if cfg.model.vocab_size == -1:
        raise ConfigError("model.vocab_size", "the planner needs an explicit vocabulary size")
    if not layout:
        return cfg
    parallel = resolve_parallel(cfg.parallel, world_size)
    dp = parallel.dp
    if cfg.train.global_batch_size % dp:
        raise ConfigError("train.global_batch_size", f"must be divisible by the data-parallel degree {dp}")
    return dataclasses.replace(cfg, parallel=parallel)


def _gib(x: float) -> str:
    return f"{x / GiB:9.2f} GiB"


def format_table(e: Estimate, cfg, hw) -> str:
    """A readable report of one estimate."""
    p, m = cfg.parallel, e.memory
    lines = [
        f"layout   tp={p.tp} cp={p.cp} pp={p.pp} (V={p.pp_virtual_stages}, {p.pp_schedule}) "
        f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} engine={engine_costs(p).describe(p)} ac={p.ac}  on {hw.name}",
        f"rank     {e.rank}: pp rank {e.pp_rank}, stages {e.stage_ids}, {e.layers} layers",
        f"params   total {e.params_total / 1e9:.2f} B, this rank computes {e.params_rank / 1e9:.3f} B, "
        f"stores {e.params_shard / 1e9:.4f} B",
        "memory (peak, this rank)",
        f"  parameters (stored)       {_gib(m.params)}",
        f"  fp32 master (separate)    {_gib(m.master)}",
        f"  gradients                 {_gib(m.grads)}",
        f"  fp32 Adam m+v             {_gib(m.optimizer)}",
        f"  gathered weights          {_gib(m.gathered)}",
        f"  engine buffers            {_gib(m.buffers)}",
        f"  pipeline buffers          {_gib(m.pipeline)}",
        f"  activations               {_gib(m.activations)}  ({m.in_flight_microbatches} micro-batches in flight, "
        f"{m.activation_per_layer_microbatch / GiB:.3f} GiB per layer per micro-batch without AC)",
        f"  loss backward             {_gib(m.logits)}{'  (peak: larger than a block backward)' if m.logits >= m.working else ''}",
        f"  block backward            {_gib(m.working)}{'  (peak: larger than the loss backward)' if m.working > m.logits else ''}",
        f"  total                     {_gib(m.total)}  (tensors)",
        *format_allowances(e.allowances, m.total, hw),
        *([f"  host (ZeRO offload)       {_gib(m.host)}"] if m.host else []),
        f"compute  {e.micro_batches} micro-batches, {e.hardware_flops_rank / 1e15:.2f} PFLOP on this rank, "
        f"{e.compute_seconds:.3f} s",
        "communication per step           bytes      time   exposed",
    ]
    for c in e.collectives:
        lines.append(f"  {c.name:<30} {c.bytes_per_step / 1e9:8.2f} GB {c.seconds:8.3f} s {c.exposed_seconds:7.3f} s")
    lines += [
        f"bubble   {e.bubble_fraction:.3f}",
        f"step     {e.step_seconds:.3f} s for {e.tokens_per_step:,} tokens",
        f"per GPU  {e.tokens_per_s_per_gpu:,.0f} tokens/s, {e.tflops_per_gpu:.0f} TFLOP/s, MFU {100 * e.mfu:.1f}%",
    ]
    return "\n".join(lines)


def format_allowances(a: Allowances, tensors: float, hw) -> list[str]:
    """The allowances' lines (plan/allowances.py) and the device total they make with the tensors."""
    device_total = tensors + a.total
    allocator = "expandable_segments" if a.expandable_segments else "no expandable_segments"
    if hw.name == "cpu":
        allocator = "none on gloo ranks: no device, and the tracker counts tensors"
    return [f"  cuda context              {_gib(a.cuda_context)}",
            f"  cublas workspaces         {_gib(a.workspaces)}",
            f"  nccl buffers              {_gib(a.nccl)}  ({a.communicators} communicators)",
            f"  fragmentation             {_gib(a.fragmentation)}  ({allocator}"
            f"{'' if hw.name == 'cpu' else f', {100 * a.fragmentation / max(tensors, 1.0):.0f}% of the tensors'})",
            f"  device total              {_gib(device_total)}  of {hw.memory_bytes / GiB:.0f} GiB"
            f"{'' if device_total <= hw.memory_bytes else '  DOES NOT FIT'}"]


def estimate_dict(e: Estimate) -> dict:
    """Estimate.to_dict with the allowances' total and the device total (tensors + allowances)."""
    d = e.to_dict()
    d["allowances"] = e.allowances.to_dict()
    d["device_total"] = e.memory.total + e.allowances.total
    return d


def format_memory(mem: dict, hw) -> str:
    """The fake-tensor step's peak, by kind, beside the estimate."""
    moment = mem["moment"]
    lines = [f"memory dry run  rank {mem['rank']} of {mem['world_size']}, the real step on fake tensors "
             f"({mem['dtype']}), {mem['seconds']:.1f} s",
             f"  peak                      {_gib(mem['peak'])}  of {hw.memory_bytes / GiB:.0f} GiB"
             f"{'' if mem['peak'] <= hw.memory_bytes else '  DOES NOT FIT'}  (estimate {_gib(mem['estimated_total'])}, "
             f"{100 * mem['estimate_relative_error']:+.1f}%)",
             *(f"  {kind:<25} {_gib(v)}" for kind, v in mem["by_kind"].items()),
             f"  peak + allowances         {_gib(mem['device_peak'])}  of {hw.memory_bytes / GiB:.0f} GiB"
             f"{'' if mem['device_peak'] <= hw.memory_bytes else '  DOES NOT FIT'}  (+{_gib(mem['allowances']['total']).strip()}: "
             f"context, workspaces, nccl, fragmentation)",
             f"  at step {moment['step']}, {moment['phase']}, micro-batch {moment['micro_batch']}, {moment['module']}"]
    return "\n".join(lines)


def _check_flags(args) -> None:
    """The numeric flags and the output path, before anything is estimated."""
    if args.gpus < 1:
        raise ConfigError("--gpus", f"must be a world size >= 1, got {args.gpus}")
    if args.memory_cap is not None and not 0 < args.memory_cap < float("inf"):  # nan too
        raise ConfigError("--memory-cap", f"must be a positive number of GiB, got {args.memory_cap}")
    if args.top < 1:
        raise ConfigError("--top", f"must be >= 1, got {args.top}")
    if args.png and not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
        raise ConfigError("--png", f"{args.png}: its directory does not exist")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, args.overrides = _parser().parse_known_args(argv)
    try:
        _check_flags(args)
        cfg = resolved_config(args.config, args.overrides, args.gpus, layout=not args.search)
        if not 0 <= args.rank < args.gpus:
            raise ConfigError("--rank", f"must be in [0, {args.gpus}), got {args.rank}")
        if args.memory and not args.dry_run:
            raise ConfigError("--memory", "needs --dry-run (it steps the dry run's model parts)")
        if (args.confirm is not None or args.fast) and not args.search:
            raise ConfigError("--confirm" if args.confirm is not None else "--fast",
                              "needs --search (it confirms the layouts the search ranks first)")
        if args.confirm is not None and args.fast:
            raise ConfigError("--fast", "skips the fake step that --confirm runs; give one of them")
        if args.confirm is None:
            args.confirm = 0 if args.fast else DEFAULT_CONFIRM
        if args.confirm < 0:
            raise ConfigError("--confirm", f"must be a number of layouts >= 0, got {args.confirm}")
        hw = hardware_preset(args.hardware, ranks=args.gpus)
        if args.search:
            from dist_llama.plan.search import format_search, plot_search, search
            cap = args.memory_cap * 2**30 if args.memory_cap else hw.memory_bytes
            found = search(cfg, args.gpus, hw, cap, args.top, args.expandable_segments)
    except (ConfigError, ValueError) as exc:
        print(f"dist-llama-plan: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.search:
        confirmed = []
        if args.confirm:
            from dist_llama.plan.search import confirm
            confirmed = confirm(found, args.gpus, hw, cap, args.confirm, "cpu" if hw.name == "cpu" else "cuda",
                                expandable_segments=args.expandable_segments,
                                progress=lambda text: print(f"dist-llama-plan: {text}", file=sys.stderr, flush=True))
        if args.png:
            plot_search(found, cap, args.png)
        if args.json:
            print(json.dumps([{"parallel": dataclasses.asdict(c.parallel), "estimate": estimate_dict(e),
                               **({"confirm": confirmed[i]} if i < len(confirmed) else {})}
                              for i, (c, e) in enumerate(found)], indent=2, default=str))
        else:
            print(format_search(found, cap, confirmed, fast=args.fast))
        return 0
    est = refit(estimate(cfg, hw, args.rank), cfg.parallel, hw, args.expandable_segments)
    report = {"estimate": estimate_dict(est)}
    if args.goodput:
        from dist_llama.plan.scenarios import checkpoint_bytes_per_rank, compare
        report["goodput"] = compare(checkpoint_bytes_per_rank(cfg, hw), args.gpus)
    if args.dry_run:
        from dist_llama.plan.dryrun import dry_run
        dr = dry_run(cfg, args.gpus, args.rank)
        dr["estimated_params_local"] = est.params_shard
        dr["relative_error"] = (est.params_shard - dr["params_allocated"]) / dr["params_allocated"]
        report["dry_run"] = dr
    if args.memory:
        from dist_llama.plan.memory import fake_memory
        mem = fake_memory(cfg, args.gpus, args.rank, "cpu" if hw.name == "cpu" else "cuda")
        mem["estimated_total"] = est.memory.total
        mem["estimate_relative_error"] = (est.memory.total - mem["peak"]) / mem["peak"]
        allowances = device_allowances(cfg.parallel, hw, mem["peak"], args.expandable_segments)
        mem["allowances"] = allowances.to_dict()
        mem["device_peak"] = mem["peak"] + allowances.total
        report["memory"] = mem
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(format_table(est, cfg, hw))
    if args.dry_run:
        print(f"dry run  rank {dr['rank']} of {dr['world_size']} (stages {dr['stage_ids']}): "
              f"{dr['params_allocated']:,} parameters allocated ({dr['params_local']:,} of data; estimate "
              f"{est.params_shard:,.0f}, {100 * dr['relative_error']:+.2f}%), fp32 params+grads+Adam "
              f"{16 * dr['params_allocated'] / 2**30:.2f} GiB, {dr['recomputed_blocks']} of its {dr['blocks']} blocks "
              f"recomputed in backward, built in {dr['seconds']:.1f} s")
    if args.memory:
        print(format_memory(mem, hw))
    if args.goodput:
        from dist_llama.plan.scenarios import format_comparison
        print(format_comparison(report["goodput"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
