"""The hang watchdog: a heartbeat thread that dumps every thread's stack and the recent phase
history when the loop stops making progress (a stuck collective, a dead peer), names the suspects
from every rank's heartbeat file (train/heartbeats.py), then hands over to `on_hang`.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from dist_llama.train.heartbeats import Heartbeats, attribute


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
