"""Crash-loop detection: stop restarting a run that fails at the same step every time.

A launcher restarts a failed run (torchrun up to --max-restarts, the Slurm batch script requeues
after that), and the run resumes from its newest checkpoint. A fault that recurs deterministically
(a bad batch, a bug at one step, a kernel that always faults on one shape) fails the same way each
time, so restarts only burn allocations. The run directory keeps a record, <run_dir>/failures.jsonl,
one JSON line per entry:

    {"kind": "start", "step": S}             rank 0, when training starts, S = the step resumed from
    {"kind": "failure", "step": N, "cause"}  any rank that leaves training with an exception (N = the
                                             step being computed), or rank 0 for a collective
                                             restart exit (hang, health action `restart`)
    {"kind": "end", "step": S, "code"}       rank 0, when training ends cleanly (finished or preempted)

Each rank appends whole lines of its own in one write (as events.jsonl is written), and only
failures are written by more than one rank. At start, before its own "start" line, rank 0 reads
the record: if the last N attempts (health.max_failures_at_step) all failed without ending, all
resumed from the step this one resumes from (no checkpoint progress between them), and all failed
at the same step (as far as recorded: a SIGKILLed process records nothing), the run is a crash
loop. Rank 0 shares the verdict with every rank, which exit EXIT_UNRECOVERABLE naming the step and
the first recorded cause. Deleting failures.jsonl (or raising the setting) allows N more attempts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FAILURES_FILE = "failures.jsonl"
CAUSE_CHARS = 300
"""Causes are cut to this: one line in a log and in the exit message, not a traceback."""


def _append(run_dir: Path, record: dict) -> None:
    line = json.dumps({**record, "time": time.time(), "pid": os.getpid()}) + "\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    # One write() on an O_APPEND descriptor: lines from concurrent ranks do not interleave.
    fd = os.open(run_dir / FAILURES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record_start(run_dir: Path, step: int, restart_count: int) -> None:
    _append(run_dir, {"kind": "start", "step": step, "restart_count": restart_count})


def record_failure(run_dir: Path, step: int, rank: int, cause: str) -> None:
    cause = " ".join(str(cause).split())[:CAUSE_CHARS]  # one line
    _append(run_dir, {"kind": "failure", "step": step, "rank": rank, "cause": cause})


def record_end(run_dir: Path, step: int, code: int) -> None:
    _append(run_dir, {"kind": "end", "step": step, "code": code})


@dataclass
class Attempt:
    start: int
    failures: list[dict] = field(default_factory=list)
    ended: bool = False


def read_attempts(run_dir: Path) -> list[Attempt]:
    """The record as attempts, oldest first; unreadable lines (a write cut short by a kill) are skipped."""
    path = run_dir / FAILURES_FILE
    if not path.exists():
        return []
    attempts: list[Attempt] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            kind, step = record["kind"], int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if kind == "start":
            attempts.append(Attempt(step))
        elif attempts and kind == "failure":
            attempts[-1].failures.append(record)
        elif attempts and kind == "end":
            attempts[-1].ended = True
    return attempts


def crash_loop(attempts: list[Attempt], resume_step: int, n: int) -> Optional[str]:
    """The reason to stop, or None. A crash loop: the last n attempts all failed, at one step S that
    this attempt, resuming before S, would reach again. Where an attempt recorded no failure (it was
    killed), its step is unknown: then all n must also have resumed from this attempt's step."""
    last = attempts[-n:] if n > 0 else []
    if len(last) < n or not last or any(a.ended for a in last):
        return None
    steps = {a.failures[0]["step"] for a in last if a.failures}
    if len(steps) > 1:
        return None
    if steps and all(a.failures for a in last):
        if resume_step >= next(iter(steps)):  # resuming past the failing step: progress
            return None
    elif any(a.start != resume_step for a in last):
        return None
    causes = [a.failures[0].get("cause", "?") for a in reversed(last) if a.failures]
    where = f"step {steps.pop()}" if steps else f"an unknown step after {resume_step} (nothing recorded: killed?)"
    cause = causes[0] if causes else "no cause recorded (a process was killed, e.g. SIGKILL or out of memory)"
    return f"crash loop: the last {n} attempts all failed at {where}, resuming from step {resume_step}; cause: {cause}"
