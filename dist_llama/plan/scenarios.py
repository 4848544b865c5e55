"""The failure and recovery figures the goodput simulator is fed: Llama 3's published ones, and
dist_llama's own, measured by its benchmarks on the 2-core CPU machine and scaled to the planned job.

How the measured figures scale (assumptions, stated plainly; nothing here was measured at scale):
- Checkpoint blocking is the async save's staging copy, so it scales with the bytes a rank stages
  (fp32 parameters + AdamW m, v: 12 bytes per stored parameter, the largest rank of the layout)
  over the staging rate measured per rank (MEASURED.checkpoint_rank_bytes / checkpoint_block_s).
  Measured as a CPU memcpy; a GPU stages over PCIe, typically faster than this machine's rate.
- Detection: a crashed worker is seen by its torchrun agent in MEASURED.detection_s; a lost node
  (most of Llama 3's interruptions are GPU / host hardware) is only seen when its rendezvous
  keep-alive lapses, about DEAD_NODE_DETECTION_S (REFERENCE.md, c10d). The scenario takes the
  latter for every failure: the conservative end.
- Restart: the measured part (new processes, imports, process groups, model build, first step of a
  tiny model) is kept as it is; loading the checkpoint scales with the bytes a rank reads over the
  per-rank rate measured for synchronous saves (reading is usually faster than writing + verifying);
  and SCALE_INIT_S is added for what 2 local ranks cannot show: NCCL communicator set-up and the
  rendezvous of thousands of ranks. Failed nodes are assumed replaced by hot spares (torchrun
  elastic); Llama 3's 10-minute restart includes rescheduling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dist_llama.plan.goodput import GoodputConfig, format_goodput, simulate_report

GiB = 2**30

DEAD_NODE_DETECTION_S = 15.0
"""Rendezvous keep-alive timeout after which surviving agents treat a silent node as lost."""
SCALE_INIT_S = 60.0
"""Assumed (not measured) extra start-up of a 10^4-rank job: communicator set-up and rendezvous."""


@dataclass(frozen=True)
class Measured:
    """dist_llama's fault-tolerance figures from its benchmarks (2 gloo ranks, 2-core CPU machine)."""

    checkpoint_block_s: float = 0.086
    """Async DCP save, time the loop blocks (bench/checkpoint_blocking.py, median, slowest rank)."""
    checkpoint_rank_bytes: float = 0.59 * GiB / 2
    """Model + AdamW state per rank in that benchmark (0.59 GiB over 2 FSDP ranks)."""
    sync_save_s: float = 5.58
    """Synchronous save of the same state (write + fsync + verify + commit) in that benchmark, rerun
    at load average 6 (its async blocking was 0.36 s then): checkpoint_rank_bytes / this is the
    conservative per-rank rate taken for loading."""
    detection_s: float = 0.13
    """Killed worker -> torchrun notices (bench/restart_time.py, 2 ranks, debug model)."""
    restart_s: float = 4.1 - 0.13
    """Noticed -> first step done after the restart: new processes, init, load (a few MiB), one step.
    A rerun at load average 7 took 13.1 s in all (detection 2.9, processes 0.5, init + load 8.9,
    first step 0.8): on a shared machine these figures move with the load."""


MEASURED = Measured()


def llama3_scenario(n_gpus: int = 16384) -> GoodputConfig:
    """Llama 3's figures (goodput.GoodputConfig defaults) on n_gpus."""
    return GoodputConfig(n_gpus=n_gpus)


def dist_llama_scenario(checkpoint_rank_bytes: float, n_gpus: int = 16384,
                        measured: Measured = MEASURED) -> GoodputConfig:
    """dist_llama's measured figures scaled to a job whose largest rank checkpoints
    checkpoint_rank_bytes (see the module docstring), at Llama 3's failure rate per GPU."""
    staging_rate = measured.checkpoint_rank_bytes / measured.checkpoint_block_s
    load_rate = measured.checkpoint_rank_bytes / measured.sync_save_s
    return replace(llama3_scenario(n_gpus),
                   checkpoint_block_s=checkpoint_rank_bytes / staging_rate,
                   detection_s=max(measured.detection_s, DEAD_NODE_DETECTION_S),
                   restart_s=measured.restart_s + checkpoint_rank_bytes / load_rate + SCALE_INIT_S)


def checkpoint_bytes_per_rank(cfg, hw) -> float:
    """Bytes the slowest rank saves: fp32 parameters + AdamW m, v of its stored shard, the largest
    over the pipeline ranks (ranks of one pipeline rank store equal shards)."""
    from dist_llama.plan.estimate import estimate_rank

    p = cfg.parallel
    per_pp = p.world_size // p.pp
    return max(12 * estimate_rank(cfg, hw, r * per_pp).params_shard for r in range(p.pp))


def compare(checkpoint_rank_bytes: float, n_gpus: int, runs: int = 200, seed: int = 0) -> dict:
    """Both scenarios simulated on the same job."""
    return {"llama3": simulate_report(llama3_scenario(n_gpus), runs, seed),
            "dist_llama": simulate_report(dist_llama_scenario(checkpoint_rank_bytes, n_gpus), runs, seed)}


def format_comparison(reports: dict) -> str:
    """The two scenarios side by side, then each one's details."""
    a, b = reports["llama3"], reports["dist_llama"]
    rows = [("detection (s)", "detection_s", "{:.1f}"), ("restart (s)", "restart_s", "{:.1f}"),
            ("checkpoint blocking (s)", "checkpoint_block_s", "{:.3f}")]
    lines = [f"goodput on {a['config']['n_gpus']:,} GPUs at Llama 3's failure rate "
             f"(MTBF {a['mtbf_s'] / 3600:.2f} h)",
             f"  {'':<28}{'Llama 3 figures':>18}{'dist_llama measured, scaled':>30}"]
    for name, key, fmt in rows:
        lines.append(f"  {name:<28}{fmt.format(a['config'][key]):>18}{fmt.format(b['config'][key]):>30}")
    for name, key, fmt, scale in (("best checkpoint interval (min)", "best_interval_s", "{:.1f}", 1 / 60),
                                  ("ETTR (%)", "ettr_monte_carlo", "{:.2f}", 100),
                                  ("GPU-hours lost per run", "lost_gpu_hours", "{:,.0f}", 1)):
        lines.append(f"  {name:<28}{fmt.format(a[key] * scale):>18}{fmt.format(b[key] * scale):>30}")
    lines += ["Llama 3 figures:", format_goodput(a), "dist_llama measured, scaled:", format_goodput(b)]
    return "\n".join(lines)
