"""Watching processes in tests through /proc: alive, gone within a deadline, children."""

import subprocess
import time


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie (a dead process its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def descendants(pid: int) -> list[int]:
    """Children, their children, and so on (a snapshot)."""
    out = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out
