"""Search mode: estimate every sensible layout of a model on a GPU count, keep those that fit a
memory cap, best MFU first; optionally confirm the best ones with the real step on fake tensors
(plan/memory.py), dropping those whose measured peak is over the cap."""

from __future__ import annotations

import dataclasses
import itertools

from dist_llama.config import Config, ConfigError, validate
from dist_llama.plan.allowances import device_allowances, refit
from dist_llama.plan.estimate import Estimate, estimate, estimate_rank
from dist_llama.plan.hardware import Hardware

TP = (1, 2, 4, 8)
PP = (1, 2, 4, 8, 16, 32)
CP = (1, 2, 4, 8, 16)
SCHEDULES = (("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4), ("interleaved_1f1b", 7))
AC = ("none", "full")


def candidates(cfg: Config, gpus: int, hw: Hardware):
    """Layouts that pass the same validation as a real run (TP within a node)."""
    for tp, pp, cp, (schedule, virtual), ac in itertools.product(TP, PP, CP, SCHEDULES, AC):
        if tp > hw.gpus_per_node or gpus % (tp * pp * cp) or (pp == 1 and virtual > 1):
            continue
        parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, cp=cp, dp_replicate=1, dp_shard=-1,
                                       pp_schedule=schedule if pp > 1 else "1f1b", pp_virtual_stages=virtual,
                                       ac=ac, pp_layers_per_stage=None)
        candidate = dataclasses.replace(cfg, parallel=parallel)
        try:
            yield validate(candidate, gpus)
        except ConfigError:
            continue


def search(cfg: Config, gpus: int, hw: Hardware, memory_cap: float, top: int = 10,
           expandable_segments: bool = True) -> list[tuple[Config, Estimate]]:
    """The `top` layouts by predicted MFU whose peak memory (the estimate of the pipeline rank that
    holds the most), tensors + the device's allowances (plan/allowances.py, fragmentation
    per `expandable_segments`), stays under memory_cap bytes. The preset's own layout plays no part:
    every tp x cp x pp (x schedule, AC) is tried, the data-parallel degree taking the rest of the
    GPUs, and only those a run would accept are kept (dp dividing the global batch, the
    micro-batch size dividing the per-rank batch, tp dividing the heads, ...).
    Raises ConfigError saying why when no layout of `gpus` is valid at all."""
    results, valid = [], 0
    for candidate in candidates(cfg, gpus, hw):
        valid += 1
        est = refit(estimate(candidate, hw, rank=None), candidate.parallel, hw, expandable_segments)
        if est.memory.total + est.allowances.total <= memory_cap:
            results.append((candidate, est))
    if not valid:
        raise ConfigError("--gpus", _no_layout(cfg, gpus, hw))
    results.sort(key=lambda r: r[1].mfu, reverse=True)
    return results[:top]


def _no_layout(cfg: Config, gpus: int, hw: Hardware) -> str:
    """Why no layout of `gpus` passed validation, in one sentence."""
    batch = cfg.train.global_batch_size
    model_parallel = sorted({tp * pp * cp for tp, pp, cp in itertools.product(TP, PP, CP)
                             if tp <= hw.gpus_per_node and gpus % (tp * pp * cp) == 0})
    dps = sorted({gpus // mp for mp in model_parallel}, reverse=True)
    if not any(batch % dp == 0 for dp in dps):
        return (f"no layout of {gpus} GPUs exists for train.global_batch_size={batch}: its data-parallel degree "
                f"would be one of {dps}, and none divides {batch}")
    return (f"no layout of {gpus} GPUs passes validation (tp {TP} within {hw.gpus_per_node} GPUs per node, "
            f"pp {PP}, cp {CP}; data-parallel degrees dividing train.global_batch_size={batch}); check "
            f"train.micro_batch_size, data.seq_len and the model's head counts against them")


def peak_ranks(cfg: Config, hw: Hardware) -> list[int]:
    """The ranks whose fake-tensor step stands for a layout's peak: one rank of each of the two
    pipeline ranks the estimate puts highest (it is within 5% of the fake step per rank, so the
    runner-up covers a near tie). The tp, cp and dp peers of a rank hold the same shapes (FSDP pads
    the shards to one size), so one rank of each pipeline rank is enough; pp is the outermost mesh
    dimension."""
    per_pp = cfg.parallel.world_size // cfg.parallel.pp
    firsts = [r * per_pp for r in range(cfg.parallel.pp)]
    ranked = sorted(firsts, key=lambda r: estimate_rank(cfg, hw, r).memory.total, reverse=True)
    return sorted(ranked[:2])


def confirm(results: list[tuple[Config, Estimate]], gpus: int, hw: Hardware, memory_cap: float, n: int,
            device_type: str, progress=None, jobs: int | None = None, expandable_segments: bool = True) -> list[dict]:
    """The real step on fake tensors (plan/memory.py: one forked process per rank, `jobs` at a time,
    default one per CPU core) for the peak ranks of the best layouts, in order, until n of them fit
    or 2n have been stepped: per rank its estimate and measured peak; the layout's peak (the highest
    of them) and whether it fits memory_cap with the device's allowances (plan/allowances.py) on
    top. One record per stepped layout, for results[:len(records)]. `progress(text)` hears of each
    run as it ends."""
    records: list[dict] = []
    while len(records) < min(len(results), 2 * n) and sum(r["fits"] for r in records) < n:
        wanted = n - sum(r["fits"] for r in records)
        batch = results[len(records):len(records) + min(wanted, 2 * n - len(records))]
        records += _step([cfg for cfg, _ in batch], gpus, hw, memory_cap, device_type, progress, jobs,
                         expandable_segments)
    return records


def _step(layouts: list[Config], gpus: int, hw: Hardware, memory_cap: float, device_type: str, progress, jobs,
          expandable_segments: bool) -> list[dict]:
    from dist_llama.plan.memory import fake_memories

    runs = [(cfg, gpus, rank) for cfg in layouts for rank in peak_ranks(cfg, hw)]
    measured = [None] * len(runs)
    for index, mem in fake_memories(runs, device_type, jobs):
        measured[index] = mem
        if progress:
            cfg, _, rank = runs[index]
            progress(f"{sum(m is not None for m in measured)}/{len(runs)}: {_layout(cfg)}, rank {rank}: "
                     f"fake-tensor step peak {mem['peak'] / 2**30:.2f} GiB in {mem['seconds']:.1f} s")
    confirmed = []
    for cfg in layouts:
        ranks = [{"rank": rank, "estimate": estimate_rank(cfg, hw, rank).memory.total, "peak": mem["peak"],
                  "by_kind": mem["by_kind"], "moment": mem["moment"]}
                 for (c, _, rank), mem in zip(runs, measured) if c is cfg]
        worst = max(ranks, key=lambda r: r["peak"])
        device_peak = worst["peak"] + device_allowances(cfg.parallel, hw, worst["peak"], expandable_segments).total
        confirmed.append({"ranks": ranks, "peak": worst["peak"], "peak_rank": worst["rank"],
                          "device_peak": device_peak, "fits": device_peak <= memory_cap})
    return confirmed


def _layout(cfg: Config) -> str:
    p = cfg.parallel
    return f"tp{p.tp} cp{p.cp} pp{p.pp} dp{p.dp}" + (f" {p.pp_schedule} v{p.pp_virtual_stages}" if p.pp > 1 else "") + \
        f" ac={p.ac}"


def format_search(results: list[tuple[Config, Estimate]], memory_cap: float,
                  confirmed: list[dict] | None = None, fast: bool = False) -> str:
    """The table (memory: the estimate's tensors, and the device total with the allowances of
    plan/allowances.py); with `confirmed` (confirm()'s records of the first layouts) columns with the
    fake-tensor step's peak and that peak + allowances (its rank, the estimate there), and the
    layouts over the cap moved out of the ranking into a list of their own."""
    confirmed = confirmed or []
    head = (f"{'tp':>3}{'cp':>4}{'pp':>4}{'dp':>6}  {'schedule':<22}{'ac':<6}{'tensors':>8}{'device GiB':>11}"
            f"{'tok/s/GPU':>11}{'MFU':>8}")
    lines = [f"best layouts under {memory_cap / 2**30:.0f} GiB per GPU (by predicted MFU"
             + (f"; the first {len(confirmed)} stepped on fake tensors, the rest by the estimate only"
                if confirmed else "")
             + ("; --fast: estimate only, no layout stepped" if fast else "") + "):",
             head + ("   fake step GiB, + allowances (rank, estimate there)" if confirmed else "")]
    dropped = []
    for i, (cfg, est) in enumerate(results):
        p = cfg.parallel
        schedule = f"{p.pp_schedule} v{p.pp_virtual_stages}" if p.pp > 1 else "-"
        row = (f"{p.tp:>3}{p.cp:>4}{p.pp:>4}{p.dp:>6}  {schedule:<22}{p.ac:<6}"
               f"{est.memory.total / 2**30:>8.1f}{(est.memory.total + est.allowances.total) / 2**30:>11.1f}"
               f"{est.tokens_per_s_per_gpu:>11,.0f}{100 * est.mfu:>7.1f}%")
        if i < len(confirmed):
            c = confirmed[i]
            at = next(r for r in c["ranks"] if r["rank"] == c["peak_rank"])
            row += (f"   {c['peak'] / 2**30:>13.1f}, {c['device_peak'] / 2**30:.1f} "
                    f"(rank {c['peak_rank']}, {at['estimate'] / 2**30:.1f})")
            if not c["fits"]:
                dropped.append(row)
                continue
        lines.append(row)
    if len(lines) == 2:
        lines.append("(no layout fits)")
    if dropped:
        lines += [f"dropped: the fake-tensor step's peak + allowances is over {memory_cap / 2**30:.0f} GiB", *dropped]
    return "\n".join(lines)


def plot_search(results: list[tuple[Config, Estimate]], memory_cap: float, path: str) -> None:
    """A PNG: predicted MFU (bars) and peak device memory per GPU, tensors + allowances (dots, cap
    dashed), of each layout."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [f"tp{c.parallel.tp} cp{c.parallel.cp} pp{c.parallel.pp}"
              + (f" v{c.parallel.pp_virtual_stages}" if c.parallel.pp > 1 else "")
              + (" AC" if c.parallel.ac != "none" else "") for c, _ in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(results) + 2), 4.5))
    ax.bar(x, [100 * e.mfu for _, e in results], color="tab:blue")
    ax.set_ylabel("predicted MFU (%)", color="tab:blue")
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    mem = ax.twinx()
    mem.plot(list(x), [(e.memory.total + e.allowances.total) / 2**30 for _, e in results], "o", color="tab:red")
    mem.axhline(memory_cap / 2**30, color="tab:red", linestyle="--", linewidth=1)
    mem.set_ylabel("peak memory per GPU (GiB)", color="tab:red")
    mem.set_ylim(bottom=0)
    ax.set_title("dist-llama-plan: best layouts under the memory cap")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
