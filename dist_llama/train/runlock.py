"""One job per run directory, and no worker outliving its launcher.

RunLock: rank 0 takes an exclusive `flock` on `<run_dir>/.lock` before anything is written to the
run directory and holds the open file for the job's life. The kernel releases the lock when the
process ends however it ends (SIGKILL included), so a lock left by a dead job never blocks: there is
no stale-lock cleanup to get wrong. The file's contents (host, pid, job id, start time) are only for
the message a second job prints; the lock itself is the flock.

Filesystems: on a local filesystem and on NFSv4 (Linux emulates flock with NFS byte-range locks)
the lock holds across hosts. Where locks are not honoured across hosts (NFSv3 without lockd,
some FUSE filesystems) it only keeps two jobs on the same host apart.

die_with_launcher: torchrun starts its workers in sessions of their own, so when the agent is
SIGKILLed its workers train on, unsupervised, and write into a run directory a new job may take.
Under torchrun each worker asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG),
and a thread polls the parent pid as a fallback (the parent died before the request, or no prctl).

stop_launcher: a run that stops for good (exit 2 or 3: a configuration the checkpoint refuses, a
crash loop) stops the same way on every attempt, yet torchrun restarts any failed group until
--max-restarts is spent. So the worker ends its agent instead of just exiting: no attempt follows.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1
"""From <linux/prctl.h>."""


class RunDirInUse(Exception):
    """Another live process holds the run directory's lock; the message names it."""


def _job_id() -> str:
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(key):
            return os.environ[key]
    return f"pid-{os.getpid()}"


def _describe(holder: dict) -> str:
    since = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, job {holder.get('job', '?')}, "
            f"since {since}")


class RunLock:
    """The exclusive lock on a run directory, held until `release()` or the process's end."""

    def __init__(self, run_dir: Path, wait_own_job_s: float = 30.0):
        """wait_own_job_s: a holder that is this job's own previous attempt (same job id and host:
        torchrun restarting its workers) is waited for this long, as it may still be exiting."""
        self.path = Path(run_dir) / LOCK_NAME
        self.wait_own_job_s = wait_own_job_s
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirInUse naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (os.open's default): a program this process execs does not inherit the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_own_job_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
            holder = self.holder()
            own_job = holder.get("job") == _job_id() and holder.get("host") == socket.gethostname()
            if not own_job or time.monotonic() > deadline:
                os.close(fd)
                raise RunDirInUse(f"run directory {self.path.parent} is in use by another job "
                                  f"({_describe(holder)}); wait for it to end or use another train.run_dir")
            time.sleep(0.2)
        self._fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(), "started": time.time(),
                  "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:  # a full disk: the flock is the lock, the record only names its holder
            pass

    def holder(self) -> dict:
        """What the lock file says about the job that took the lock last ({} when unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """The file stays: unlinking it would let a job that opened the old file and one that
        creates a new one both hold 'the' lock."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher(poll_s: float = 0.5) -> None:
    """From now on this process ends (SIGKILL) when its parent does. Call from the main thread at
    start: PR_SET_PDEATHSIG fires when the parent *thread* that forked us exits, which under
    torchrun is the agent's main thread, i.e. the agent's own end."""
    parent = os.getppid()
    if parent == 1:  # already orphaned (reparented to init) before we could ask
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread below still applies
    # The parent may have died before the request; and without prctl this is the only check.
    threading.Thread(target=_watch_parent, args=(parent, poll_s), name="die-with-launcher", daemon=True).start()


def stop_launcher(grace_s: float = 0.5, wait_s: float = 10.0) -> None:
    """Keep torchrun from restarting a run that stopped for good; call as the last thing before
    exiting with that code. The agent restarts the whole group the moment any worker exits, so no
    worker may exit first: local rank 0 waits grace_s (the agent's log tail prints the reason to the
    console) and SIGKILLs the agent (SIGTERM makes torchrun print a traceback of its own); the node's
    other ranks wait up to wait_s and end with the agent (die_with_launcher). A no-op unless the
    parent is torchrun's agent."""
    if not launched_by_torchrun() or not _parent_is_torchrun():
        return
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(wait_s)  # normally SIGKILLed before this ends
        return
    time.sleep(grace_s)
    try:
        os.kill(os.getppid(), signal.SIGKILL)
    except OSError:
        pass


def _parent_is_torchrun() -> bool:
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:  # no /proc: leave the launcher alone
        return False
    return any(b"torch.distributed.run" in arg or arg.endswith(b"torchrun") for arg in argv)


def _watch_parent(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGKILL)
