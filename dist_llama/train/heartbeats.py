"""Which rank a hang is about: every rank's last heartbeat, readable by the others.

When one rank stops, the others soon wait for it inside a collective, so every rank stops making
progress and every watchdog that fires looks stuck. A rank frozen from outside (SIGSTOP, a stalled
host) or stuck holding the GIL never reports at all. So each rank's watchdog thread publishes, about
once a second, `heartbeat-rank-XXXXX.json` in the hangs directory: its last beat (step, phase, when)
and when the thread last ran. A watchdog that fires reads all of them and names the suspects:

1. ranks that went silent (no file, or not refreshed for `stale_s`): frozen, dead or GIL-bound;
2. otherwise the ranks furthest behind in (step, phase): the others wait for them.

Ages compare wall clocks of different hosts: a skew of more than a second or so blurs rule 1.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

PHASES = ("step_start", "forward_backward", "health_agreement", "optimizer", "evaluate", "straggler_check",
          "sdc_check", "checkpoint")
"""The order of the watchdog's phases within a step: a hang report ranks ranks by progress."""


def progress(step: Optional[int], phase: Optional[str]) -> tuple[int, int]:
    """(step, phase index) for comparing how far ranks got; unknown phases sort first."""
    return (-1 if step is None else step, PHASES.index(phase) if phase in PHASES else -1)


class Heartbeats:
    """This rank's heartbeat file, and everyone's, in one directory shared by the job."""

    def __init__(self, directory: Path, rank: int, world_size: int):
        self.directory = Path(directory)
        self.rank = rank
        self.world_size = world_size
        self._host = socket.gethostname()

    def path(self, rank: int) -> Path:
        return self.directory / f"heartbeat-rank-{rank:05d}.json"

    def publish(self, step: Optional[int], phase: Optional[str], beat_time: Optional[float]) -> None:
        """Atomic replace: a reader sees the old record or the new one, never half of one."""
        record = {"rank": self.rank, "host": self._host, "pid": os.getpid(), "step": step, "phase": phase,
                  "beat": beat_time, "alive": time.time()}
        path = self.path(self.rank)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass  # a full or read-only disk must not take the watchdog down; the report says "silent"

    def read(self) -> dict[int, Optional[dict]]:
        out: dict[int, Optional[dict]] = {}
        for rank in range(self.world_size):
            try:
                out[rank] = json.loads(self.path(rank).read_text())
            except (OSError, ValueError):
                out[rank] = None
        return out


def attribute(beats: dict[int, Optional[dict]], stale_s: float, now: Optional[float] = None) -> dict:
    """{"suspects": [ranks], "reason": "silent" | "behind" | "all_equal", "ranks": {rank: last beat}}
    where each rank's last beat is {step, phase, age_s (since its last beat), silent_s (since its
    watchdog last ran)}, or None when it never published."""
    now = time.time() if now is None else now
    ranks: dict[int, Optional[dict]] = {}
    silent = []
    for rank, b in sorted(beats.items()):
        if b is None:
            ranks[rank] = None
            silent.append(rank)
            continue
        silent_s = round(now - b["alive"], 2)
        ranks[rank] = {"step": b["step"], "phase": b["phase"], "silent_s": silent_s,
                       "age_s": None if b["beat"] is None else round(now - b["beat"], 2)}
        if silent_s > stale_s:
            silent.append(rank)
    if silent:
        return {"suspects": silent, "reason": "silent", "ranks": ranks}
    where = {r: progress(b["step"], b["phase"]) for r, b in ranks.items()}
    behind = min(where.values())
    suspects = sorted(r for r, p in where.items() if p == behind)
    return {"suspects": suspects, "reason": "all_equal" if len(suspects) == len(where) else "behind",
            "ranks": ranks}
