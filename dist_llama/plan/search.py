"""Search mode: estimate every sensible layout of a model on a GPU count, keep those that fit a
memory cap, best MFU first."""

from __future__ import annotations

import dataclasses
import itertools

from dist_llama.config import Config, ConfigError, validate
from dist_llama.plan.estimate import Estimate, estimate
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


def search(cfg: Config, gpus: int, hw: Hardware, memory_cap: float, top: int = 10) -> list[tuple[Config, Estimate]]:
    """The `top` layouts by predicted MFU whose peak memory (pipeline rank 0 holds the most
    in-flight micro-batches) stays under memory_cap bytes. The preset's own layout plays no part:
    every tp x cp x pp (x schedule, AC) is tried, the data-parallel degree taking the rest of the
    GPUs, and only those a run would accept are kept (dp dividing the global batch, the
    micro-batch size dividing the per-rank batch, tp dividing the heads, ...).
    Raises ConfigError saying why when no layout of `gpus` is valid at all."""
    results, valid = [], 0
    for candidate in candidates(cfg, gpus, hw):
        valid += 1
        est = estimate(candidate, hw, rank=0)
        if est.memory.total <= memory_cap:
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


def format_search(results: list[tuple[Config, Estimate]], memory_cap: float) -> str:
    lines = [f"best layouts under {memory_cap / 2**30:.0f} GiB per GPU (by predicted MFU):",
             f"{'tp':>3}{'cp':>4}{'pp':>4}{'dp':>6}  {'schedule':<22}{'ac':<6}{'memory GiB':>11}"
             f"{'tok/s/GPU':>11}{'MFU':>8}"]
    for cfg, est in results:
        p = cfg.parallel
        schedule = f"{p.pp_schedule} v{p.pp_virtual_stages}" if p.pp > 1 else "-"
        lines.append(f"{p.tp:>3}{p.cp:>4}{p.pp:>4}{p.dp:>6}  {schedule:<22}{p.ac:<6}"
                     f"{est.memory.total / 2**30:>11.1f}{est.tokens_per_s_per_gpu:>11,.0f}{100 * est.mfu:>7.1f}%")
    if not results:
        lines.append("(no layout fits)")
    return "\n".join(lines)


def plot_search(results: list[tuple[Config, Estimate]], memory_cap: float, path: str) -> None:
    """A PNG: predicted MFU (bars) and peak memory per GPU (dots, cap dashed) of each layout."""
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
    mem.plot(list(x), [e.memory.total / 2**30 for _, e in results], "o", color="tab:red")
    mem.axhline(memory_cap / 2**30, color="tab:red", linestyle="--", linewidth=1)
    mem.set_ylabel("peak memory per GPU (GiB)", color="tab:red")
    mem.set_ylim(bottom=0)
    ax.set_title("dist-llama-plan: best layouts under the memory cap")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
