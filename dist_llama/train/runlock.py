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
--max-restarts is spent. So when restarts remain (torchrun tells its workers TORCHELASTIC_MAX_RESTARTS
and TORCHELASTIC_RESTART_COUNT) the worker ends its agent with SIGTERM: torchrun stops its workers and
exits 1 ("failed"), never 137 (SIGKILL), which people and schedulers read as out of memory. When none
remain (torchrun's default --max-restarts 0 included) the agent is left alone: it exits 1 with the
worker's own exit code in its failure table.

die_with_parent (before exec) is the same request for a launcher's own child: launch/local.py starts
torchrun with it, so a SIGKILLed launcher takes torchrun with it, and torchrun's workers follow their
agent (die_with_launcher).
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


def _prctl_pdeathsig(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent thread ends (Linux; else nothing)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def die_with_launcher(poll_s: float = 0.5) -> None:
    """From now on this process ends (SIGKILL) when its parent does. Call from the main thread at
    start: PR_SET_PDEATHSIG fires when the parent *thread* that forked us exits, which under
    torchrun is the agent's main thread, i.e. the agent's own end."""
    parent = os.getppid()
    if parent == 1:  # already orphaned (reparented to init) before we could ask
        os.kill(os.getpid(), signal.SIGKILL)
    _prctl_pdeathsig(signal.SIGKILL)  # the polling thread below still applies where it is missing
    # The parent may have died before the request; and without prctl this is the only check.
    threading.Thread(target=_watch_parent, args=(parent, poll_s), name="die-with-launcher", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """For subprocess's preexec_fn (in the child, between fork and exec): SIGKILL this child when
    `parent` (the pid of the process starting it, taken before the fork) ends, also if it ended
    already. The request survives exec. SIGKILL, like the launcher's own: the launcher could forward
    nothing, so its child gets what it got."""
    _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died between the fork and the request
        os.kill(os.getpid(), signal.SIGKILL)


def restarts_left(environ=os.environ) -> int:
    """How many more times torchrun's agent would restart this worker group (0 without torchrun)."""
    try:
        return int(environ["TORCHELASTIC_MAX_RESTARTS"]) - int(environ["TORCHELASTIC_RESTART_COUNT"])
    except (KeyError, ValueError):
        return 0


def stop_launcher(end_agent: bool, grace_s: float = 0.5, wait_s: float = 10.0) -> None:
    """Keep torchrun from restarting a run that stopped for good; call as the last thing before
    exiting with that code. Without restarts left, nothing to do: the agent reports the exit code
    and gives up. With restarts left, the agent would restart the whole group the moment any worker
    exits, so no worker may exit first: the rank that `end_agent`s (local rank 0 for a stop every
    rank made, or the one rank that found the reason) waits grace_s (the agent's log tail prints the
    reason to the console) and SIGTERMs the agent, which stops its workers and exits 1 (printing
    the SignalException's traceback: torchrun's own, and the only way to make it exit with a code
    rather than a signal); every rank then waits up to wait_s to be stopped by it (or to end with
    it, die_with_launcher). Without restarts left the other ranks still wait: the agent then stops
    them when the reporting rank exits, after it printed why (a rank that exited first would have the
    agent stop the reporting one before it could). A no-op unless the parent is torchrun's agent."""
    if not launched_by_torchrun() or not _parent_is_torchrun():
        return
    if restarts_left() <= 0:
        if not end_agent:
            time.sleep(wait_s)
        return
    if end_agent:
        time.sleep(grace_s)
        try:
            os.kill(os.getppid(), signal.SIGTERM)
        except OSError:
            return
    time.sleep(wait_s)  # normally stopped by the agent before this ends


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
