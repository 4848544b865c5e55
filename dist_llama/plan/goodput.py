"""Goodput under failures: Monte Carlo over a run, the exact renewal-theory expectation it should
agree with, and the checkpoint interval that maximises it (compared with Young/Daly).

Model: failures arrive as a Poisson process while the job runs (rate proportional to the GPU
count); the job alternates `interval` of training with a blocking checkpoint save; a failure loses
everything since the last completed save and costs detection + restart before training resumes.
Effective training time (ETTR) = committed training time / wall time.

Defaults (Llama 3, §3.3.4, Table 5 and REFERENCE.md):
- 419 unexpected interruptions in 54 days on 16,384 GPUs (MTBF ~3.1 h for the job);
- detection 3 min: NCCL watchdog / heartbeat timeouts and the flight-recorder dump, well under
  PyTorch's default 10-min NCCL timeout that Llama 3 shortened;
- restart 10 min: reschedule on healthy nodes, re-initialise 16k ranks, load the checkpoint;
- checkpoint blocking 6.3 s: PyTorch/IBM async DCP figure (148.8 s synchronous);
- interval: the optimum of the closed form (about the Young/Daly value).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Optional

DAY = 86400.0


@dataclass(frozen=True)
class GoodputConfig:
    """One run's failure and recovery figures."""

    n_gpus: int = 16384
    """GPUs in the job (the failure rate scales with it)."""
    run_days: float = 54.0
    """Wall-clock length of the run simulated."""
    failures_per_gpu_day: float = 419 / (54 * 16384)
    """Unexpected interruptions per GPU per day (Llama 3 Table 5)."""
    detection_s: float = 180.0
    """Time from a failure to the job noticing it (watchdog / heartbeat timeout)."""
    restart_s: float = 600.0
    """Time from detection to training again (reschedule, init, checkpoint load)."""
    checkpoint_block_s: float = 6.3
    """Training time lost to each checkpoint save (async DCP blocking part)."""
    interval_s: Optional[float] = None
    """Training time between checkpoints; None = the optimum of the closed form."""

    @property
    def failure_rate(self) -> float:
        """Failures per second of the whole job."""
        return self.failures_per_gpu_day * self.n_gpus / DAY


def expected_ettr(cfg: GoodputConfig, interval_s: float) -> float:
    """Exact expected ETTR of the model above (long-run renewal): a segment of L = interval + save
    completes after (1/λ + C)(e^{λL} − 1) seconds on average, C = detection + restart."""
    lam = cfg.failure_rate
    segment = interval_s + cfg.checkpoint_block_s
    lost_per_failure = cfg.detection_s + cfg.restart_s
    return interval_s / ((1 / lam + lost_per_failure) * math.expm1(lam * segment))


def young_daly_interval(cfg: GoodputConfig) -> float:
    """sqrt(2·δ·MTBF), the first-order optimum."""
    return math.sqrt(2 * cfg.checkpoint_block_s / cfg.failure_rate)


def best_interval(cfg: GoodputConfig) -> float:
    """Interval maximising expected_ettr (golden-section search; the function is unimodal)."""
    lo, hi = 1.0, 20 / cfg.failure_rate
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if expected_ettr(cfg, a) < expected_ettr(cfg, b):
            lo = a
        else:
            hi = b
    return (lo + hi) / 2


def simulate_run(cfg: GoodputConfig, interval_s: float, rng: random.Random) -> tuple[float, int]:
    """One run: (committed training seconds, failures)."""
    horizon = cfg.run_days * DAY
    segment = interval_s + cfg.checkpoint_block_s
    clock, committed, failures = 0.0, 0.0, 0
    while True:
        remaining = horizon - clock
        next_failure = rng.expovariate(cfg.failure_rate)  # memoryless: a fresh draw after each restart
        if next_failure >= remaining:  # the run ends first; work after its last save is not counted
            committed += (remaining // segment) * interval_s
            return committed, failures
        committed += (next_failure // segment) * interval_s  # saves completed before the failure
        clock += next_failure + cfg.detection_s + cfg.restart_s
        failures += 1


@dataclass
class GoodputResult:
    """What the simulator reports."""

    interval_s: float
    """Checkpoint interval simulated."""
    ettr_monte_carlo: float
    """Mean effective training time ratio over the simulated runs."""
    ettr_stderr: float
    """Standard error of that mean."""
    ettr_expected: float
    """Closed-form expectation at the same interval."""
    failures_per_run: float
    """Mean failures per run."""
    lost_gpu_hours: float
    """GPU-hours not spent on committed training, per run."""
    best_interval_s: float
    """Interval maximising the closed form."""
    young_daly_interval_s: float
    """sqrt(2·δ·MTBF)."""
    ettr_at_young_daly: float
    """Closed-form ETTR at the Young/Daly interval."""
    mtbf_s: float
    """Mean time between job failures."""


def simulate(cfg: GoodputConfig, runs: int = 200, seed: int = 0) -> GoodputResult:
    """Monte Carlo over `runs` runs at cfg.interval_s (or the best interval)."""
    rng = random.Random(seed)
    best = best_interval(cfg)
    interval = cfg.interval_s or best
    horizon = cfg.run_days * DAY
    samples = [simulate_run(cfg, interval, rng) for _ in range(runs)]
    ettrs = [c / horizon for c, _ in samples]
    mean = sum(ettrs) / runs
    var = sum((e - mean) ** 2 for e in ettrs) / max(1, runs - 1)
    yd = young_daly_interval(cfg)
    return GoodputResult(
        interval_s=interval, ettr_monte_carlo=mean, ettr_stderr=math.sqrt(var / runs),
        ettr_expected=expected_ettr(cfg, interval), failures_per_run=sum(f for _, f in samples) / runs,
        lost_gpu_hours=(1 - mean) * horizon / 3600 * cfg.n_gpus, best_interval_s=best,
        young_daly_interval_s=yd, ettr_at_young_daly=expected_ettr(cfg, yd), mtbf_s=1 / cfg.failure_rate)


def simulate_report(cfg: GoodputConfig, runs: int = 200, seed: int = 0) -> dict:
    return {"config": asdict(cfg), **asdict(simulate(cfg, runs, seed))}


def format_goodput(report: dict) -> str:
    c = report["config"]
    return "\n".join([
        f"goodput  {c['n_gpus']} GPUs, {c['run_days']:g} days, MTBF {report['mtbf_s'] / 3600:.2f} h, "
        f"detection {c['detection_s']:.4g} s, restart {c['restart_s']:.4g} s, "
        f"checkpoint blocks {c['checkpoint_block_s']:.4g} s",
        f"  interval {report['interval_s'] / 60:.1f} min: ETTR {100 * report['ettr_monte_carlo']:.2f}% "
        f"± {100 * report['ettr_stderr']:.2f} (closed form {100 * report['ettr_expected']:.2f}%), "
        f"{report['failures_per_run']:.0f} failures, {report['lost_gpu_hours']:,.0f} GPU-hours lost",
        f"  best interval {report['best_interval_s'] / 60:.1f} min; Young/Daly sqrt(2·δ·MTBF) "
        f"{report['young_daly_interval_s'] / 60:.1f} min (ETTR {100 * report['ettr_at_young_daly']:.2f}%)",
    ])
