"""Health checks: detection only. What to do about a fired check is decided in train/recovery.py.

- RobustZScore / StepHealth: NaN/Inf, loss spikes and gradient-norm explosions on the global
  (already all-reduced) loss and gradient norm of a step.
- Watchdog: a heartbeat thread that dumps every thread's stack and the recent phase history when
  the loop stops making progress (a stuck collective, a dead peer), then hands over to `on_hang`.
- find_stragglers: ranks whose step time is far above the median.
- param_hash / replica_groups / check_replicas: silent data corruption, found as data-parallel
  replicas whose parameters should be byte-identical but are not (Megatron's
  check_weight_hash_across_dp_replicas; Llama 3 saw 6 SDC interruptions in 54 days).
- preflight: a matmul with a known answer and a small all-reduce before training starts.
"""

from __future__ import annotations

import collections
import faulthandler
import hashlib
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.parallel.env import node_name
from dist_llama.train.heartbeats import Heartbeats, attribute

MAD_TO_SIGMA = 1.4826
"""MAD x this estimates the standard deviation of normal data (1 / Phi^-1(3/4))."""

CHECKS = ("nan", "loss_spike", "grad_norm_explosion")
"""Names StepHealth.check returns; the recovery policy maps each to an action."""


# --- spikes --------------------------------------------------------------------------------------
class RobustZScore:
    """Distance of a value from the median of the last `window` accepted values, in robust standard
    deviations (1.4826 x MAD). Median and MAD ignore the outliers a mean and std would chase, so one
    earlier spike does not mask the next.

    The caller `accept`s only healthy values, so a spike never enters the window it is judged by.
    """

    def __init__(self, window: int, min_history: int, rel_floor: float = 1e-3):
        if not 1 <= min_history <= window:
            # A window smaller than min_history never fills enough: the check would never fire.
            raise ValueError(f"need 1 <= min_history <= window, got window={window}, min_history={min_history}")
        self.window = window
        self.min_history = min_history
        self.rel_floor = rel_floor
        """A window of identical values has MAD 0; the scale is floored at this fraction of |median|
        (and a tiny absolute floor) so a flat history makes small deviations large, not infinite."""
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def _median_scale(self) -> tuple[float, float]:
        xs = np.asarray(self.values, dtype=np.float64)
        median = float(np.median(xs))
        mad = float(np.median(np.abs(xs - median)))
        scale = max(MAD_TO_SIGMA * mad, self.rel_floor * abs(median), 1e-12)
        return median, scale

    def deviation(self, x: float) -> Optional[float]:
        """Signed (x - median) / scale; None until min_history values were accepted."""
        if len(self.values) < self.min_history:
            return None
        median, scale = self._median_scale()
        return (x - median) / scale

    def score(self, x: float) -> Optional[float]:
        """|x - median| / (1.4826 MAD); None until min_history values were accepted."""
        d = self.deviation(x)
        return None if d is None else abs(d)

    def accept(self, x: float) -> None:
        self.values.append(float(x))

    def state_dict(self) -> dict:
        return {"window": self.window, "min_history": self.min_history, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        """The history comes from the checkpoint; window and min_history stay as configured now (a
        smaller window keeps the newest values)."""
        self.values = collections.deque((float(v) for v in state["values"]), maxlen=self.window)


class StepHealth:
    """Per-step checks on the global loss and gradient norm (identical on every rank)."""

    def __init__(self, health_cfg):
        self.zscore = health_cfg.spike_zscore
        self.grad_norm_max = health_cfg.grad_norm_max
        self.loss = RobustZScore(health_cfg.spike_window, health_cfg.spike_min_history)
        self.grad_norm = RobustZScore(health_cfg.spike_window, health_cfg.spike_min_history)
        self.last: dict[str, Optional[float]] = {}
        """The signed z-scores of the last check (for event logs): loss_z, grad_norm_z."""

    def check(self, loss: float, grad_norm: float) -> list[str]:
        """Names of the checks that fired, in CHECKS order; [] when the step is healthy.

        Spikes are one-sided: only values far ABOVE the median fire, because a loss or gradient
        norm that falls fast (early training) is progress, not a fault. A non-finite value fires
        "nan" alone: z-scores of NaN mean nothing."""
        self.last = {}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return ["nan"]
        loss_z, grad_z = self.loss.deviation(loss), self.grad_norm.deviation(grad_norm)
        self.last = {"loss_z": loss_z, "grad_norm_z": grad_z}
        fired = []
        if loss_z is not None and loss_z > self.zscore:
            fired.append("loss_spike")
        if (self.grad_norm_max is not None and grad_norm > self.grad_norm_max) or \
                (grad_z is not None and grad_z > self.zscore):
            fired.append("grad_norm_explosion")
        return fired

    def accept(self, loss: float, grad_norm: float) -> None:
        """Add a healthy step's values to the history the next steps are judged by."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.loss.accept(loss)
            self.grad_norm.accept(grad_norm)

    def state_dict(self) -> dict:
        """Plain JSON-able data: saved in checkpoints so a resumed run judges spikes identically."""
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])


# --- hangs ---------------------------------------------------------------------------------------
class Watchdog:
    """Heartbeat watchdog. The loop calls `beat(step, phase)` at every phase boundary; if no beat
    arrives for `timeout_s`, the watchdog thread writes `hang-rank-XXXXX.txt` into dump_dir (the
    Python stack of every thread, then the recent phase history), then calls `on_hang()` once and
    stops watching.

    The clock starts at the first beat (building the model and the initial load are not watched);
    `pause()` stops it for long legitimate work (loading a checkpoint), `resume()` restarts it fresh.
    A stuck collective releases the GIL while it waits, so this Python thread still runs; code stuck
    while HOLDING the GIL cannot be caught by any Python thread.
    """

    HISTORY = 20
    MAX_WAIT_S = 1.0
    """The thread re-reads the state at least this often (pause/resume/stop wake it at once)."""

    def __init__(self, timeout_s: float, dump_dir: Path, rank: int, on_hang: Callable[[], None],
                 heartbeats: Optional[Heartbeats] = None):
        """heartbeats: where this rank publishes its last beat and reads the others' when it fires,
        to name the suspects (train/heartbeats.py); None: this rank reports only for itself."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.dump_path = Path(dump_dir) / f"hang-rank-{rank:05d}.txt"
        self.rank = rank
        self.on_hang = on_hang
        self.heartbeats = heartbeats
        # Publish often enough that a rank silent for 3 periods is silent well within the timeout.
        self.period_s = min(self.MAX_WAIT_S, timeout_s / 4)
        self.report: Optional[dict] = None
        """Set when it fired with heartbeats: attribute()'s suspects and every rank's last beat."""
        self.fired = False
        self._history: collections.deque[tuple[float, int, str]] = collections.deque(maxlen=self.HISTORY)
        self._last_beat: Optional[float] = None  # monotonic; None = not armed
        self._paused = False
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-rank{rank}", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        """Progress: `phase` is what the loop is about to do ("forward_backward", "optimizer",
        "checkpoint", "all_reduce loss", ...), so a dump names what it was stuck in."""
        now = time.monotonic()
        with self._cond:
            self._history.append((time.time(), step, phase))
            arming = self._last_beat is None
            self._last_beat = now
            if arming:  # later beats only move the deadline: the thread re-reads it when it wakes
                self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._last_beat = time.monotonic()
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def history(self) -> list[tuple[float, int, str]]:
        """The recent (wall time, step, phase) beats, oldest first."""
        with self._cond:
            return list(self._history)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                last = self._history[-1] if self._history else None
                fire, wait = False, self.period_s
                if not self._paused and self._last_beat is not None:
                    remaining = self._last_beat + self.timeout_s - time.monotonic()
                    # Wake at the deadline; a beat meanwhile just moves the deadline on.
                    fire, wait = remaining <= 0, min(remaining, self.period_s)
                if fire:
                    self.fired = True
                    stalled = time.monotonic() - self._last_beat
                    history = list(self._history)
            # Outside the lock: file writes, dumping and on_hang must not block beat() callers (nor
            # deadlock if on_hang calls back into us).
            self._publish(last)
            if fire:
                break
            with self._cond:
                if not self._stopped:
                    self._cond.wait(wait)
        if self.heartbeats is not None:
            self.report = attribute(self.heartbeats.read(), stale_s=3 * self.period_s)
        self._dump(stalled, history)
        self.on_hang()

    def _publish(self, last: Optional[tuple[float, int, str]]) -> None:
        if self.heartbeats is not None:
            wall, step, phase = last if last is not None else (None, None, None)
            self.heartbeats.publish(step, phase, wall)

    def _dump(self, stalled: float, history: list[tuple[float, int, str]]) -> None:
        self.dump_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dump_path, "w") as f:
            last = history[-1] if history else None
            f.write(f"rank {self.rank} (pid {os.getpid()}): no progress for {stalled:.1f} s "
                    f"(timeout {self.timeout_s} s)")
            f.write(f"; last phase {last[2]!r} of step {last[1]}\n" if last else "\n")
            if self.report is not None:
                f.write(f"\nsuspects: ranks {self.report['suspects']} ({self.report['reason']}); last beats:\n")
                for r, b in self.report["ranks"].items():
                    f.write(f"  rank {r}: {b if b is not None else 'never published'}\n")
            f.write(f"\nrecent phases (oldest first, last {len(history)}):\n")
            for wall, step, phase in history:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
                f.write(f"  {stamp}  step {step}  {phase}\n")
            f.write("\nPython stacks of all threads (most recent call first):\n")
            f.flush()  # faulthandler writes to the file descriptor directly, after our buffer
            faulthandler.dump_traceback(f, all_threads=True)


class NoWatchdog:
    """health.hang_timeout_s=0: the loop's beats go nowhere."""

    def beat(self, step: int, phase: str) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def stop(self) -> None:
        pass


# --- stragglers ----------------------------------------------------------------------------------
def _collective_device(group) -> torch.device:
    """NCCL-only groups take CUDA tensors; gloo (and cpu:gloo,cuda:nccl) take CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def find_stragglers(step_time: float, group=None, factor: float = 2.0) -> list[tuple[int, float]]:
    """(global rank, step time) of every rank in `group` (default: world) whose step time is above
    factor x the median, sorted by rank. A collective: every rank of the group calls it, and all get
    the same answer. Callers pass a robust time (StragglerCheck: the rank's median over the
    interval's steps), not one step's, which a rank preempted once can inflate.

    The median is the LOWER median: with an even count the mean of the middle two would let no rank
    of two ever exceed 2x it (b > (a + b) is impossible); the lower one compares the slower of two
    ranks with the faster.

    The times must be each rank's own work, not wall time of a synchronous step: in lockstep
    training a slow rank makes everyone wait inside collectives, so raw step times come out equal.
    """
    times = torch.tensor([float(step_time)], dtype=torch.float64, device=_collective_device(group))
    gathered = [torch.empty_like(times) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, times, group=group)
    values = [float(t.item()) for t in gathered]
    median = statistics.median_low(values)
    return [(rank, t) for rank, t in zip(_group_ranks(group), values) if t > factor * median]


# --- silent data corruption ----------------------------------------------------------------------
def _local_data(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def param_hash(parts: list[nn.Module]) -> int:
    """64-bit BLAKE2b of this rank's local parameter bytes (DTensor: the local shard), parameters
    in name order within each part, names and shapes included. Byte-exact: -0.0 and 0.0 differ,
    as do NaNs with different payloads; == on values would miss both."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        for name, p in sorted(part.named_parameters(), key=lambda kv: kv[0]):
            local = _local_data(p.detach())
            h.update(f"{name}:{local.dtype}:{tuple(local.shape)};".encode())
            raw = local.contiguous().reshape(-1).view(torch.uint8).cpu()
            h.update(memoryview(raw.numpy()))
    return int.from_bytes(h.digest(), "little")


def check_replicas(parts: list[nn.Module], group) -> list[int]:
    """Global ranks of `group` whose parameter hash differs from the majority; [] when all agree.

    A collective over `group`. With no strict majority (two replicas that disagree, or a three-way
    split) there is no telling which copy is right, so every rank of the group is returned.
    Each rank only learns about its own group: OR the result across the world before acting.
    """
    value = param_hash(parts)
    # int64 carries the 64-bit hash bit for bit (two's complement) and all-gathers on gloo and NCCL.
    signed = value - (1 << 64) if value >= 1 << 63 else value
    mine = torch.tensor([signed], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    hashes = [int(t.item()) for t in gathered]
    ranks = _group_ranks(group)
    (majority, count), = collections.Counter(hashes).most_common(1)
    if count == len(hashes):
        return []
    if 2 * count <= len(hashes):
        return list(ranks)
    return [r for r, h in zip(ranks, hashes) if h != majority]


# --- preflight -----------------------------------------------------------------------------------
def _known_matmul(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Small integers (|a| <= 3, |b| <= 2): every product and partial sum is an integer below 2^11,
    exact in fp32 and even in TF32 inputs, so the device must reproduce the int64 answer exactly."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return (i + 2 * j) % 7 - 3, (3 * i + j) % 5 - 2


def known_matmul_error(device: torch.device) -> Optional[str]:
    """None if `device` multiplies two known matrices exactly, else what went wrong."""
    a, b = _known_matmul()
    expected = a.astype(np.int64) @ b.astype(np.int64)
    got = torch.matmul(torch.tensor(a, dtype=torch.float32, device=device),
                       torch.tensor(b, dtype=torch.float32, device=device)).cpu().numpy()
    if np.array_equal(got, expected):
        return None
    return (f"a {a.shape[0]}x{a.shape[0]} fp32 matmul of known result on {device} is wrong "
            f"(max abs error {float(np.nanmax(np.abs(got - expected))):.3g})")


def preflight(device: torch.device, bad_nodes: Optional[Path] = None) -> None:
    """Check this rank's device and the world's collectives before training; raises RuntimeError
    naming the rank and what failed. A rank whose device fails appends its node's name to
    `bad_nodes` (the Slurm batch script's <run_dir>/slurm/bad_nodes, which it resubmits without).

    One all-reduce carries both checks, so every rank learns every other rank's matmul result and
    all raise together (a rank that raised alone would leave the others stuck in the next collective).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    matmul_error = known_matmul_error(device)
    matmul_ok = matmul_error is None
    local_error = None if matmul_ok else f"preflight failed on rank {rank}: {matmul_error}"
    if local_error and bad_nodes is not None:
        bad_nodes.parent.mkdir(parents=True, exist_ok=True)
        with open(bad_nodes, "a") as f:  # one short line per append: safe beside other ranks' appends
            f.write(f"{node_name()}\n")
    if not dist.is_initialized():
        if local_error:
            raise RuntimeError(local_error)
        return
    n = dist.get_world_size()
    # int64: n(n-1)/2 is exact at any world size (fp32 would round above ~5800 ranks).
    t = torch.zeros(n + 1, dtype=torch.int64, device=device)
    t[0] = rank
    t[1 + rank] = int(matmul_ok)
    dist.all_reduce(t)
    sums = t.cpu().tolist()
    if local_error:
        raise RuntimeError(local_error)
    if sums[0] != n * (n - 1) // 2 or any(v not in (0, 1) for v in sums[1:]):
        raise RuntimeError(f"preflight failed on rank {rank}: all_reduce of the ranks over {n} ranks gave "
                           f"{sums[0]} (expected {n * (n - 1) // 2}) or wrong flags")
    bad = [r for r, ok in enumerate(sums[1:]) if not ok]
    if bad:
        raise RuntimeError(f"preflight failed on rank {rank}: the known-result matmul failed on ranks {bad}")
