"""Recovery policy: what to do when a health check fires, decided identically on every rank.

Every rank contributes its flags (checks fired, preemption requested) to one all-reduce (MAX) at
the step boundary; every rank then applies the same deterministic policy to the same flags and
counters, so all ranks skip, retry, roll back, save or exit together. No rank acts on a flag of
its own.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dist_llama.config.names import ACTIONS
from dist_llama.train.step_health import CHECKS

# Exit codes (DESIGN.md): 0 finished (or stopped on a launcher's request), 2 bad configuration.
EXIT_OK = 0
EXIT_UNRECOVERABLE = 3
"""Abort: a fault the policy may not retry (action=abort), or restarts cannot help."""
EXIT_SAVE_FAILED = 74
"""Training finished but its final checkpoint could not be committed (say, a full disk): the work since
the last committed checkpoint is not saved; the message names that step and the cause."""
EXIT_RESTART = 75
"""Restart me (health abort, hang): the launcher restarts the job, which resumes from the newest valid checkpoint."""
EXIT_PREEMPTED = 76
"""Preempted: the state was saved and committed; requeue the job."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): the state was saved and committed at the next step boundary, as on preemption;
128 + SIGINT, the code a shell reports for an interrupted command. A second Ctrl-C stops at once."""

FLAGS = (*CHECKS, "sdc", "preempt", "save", "save_failed")
"""What ranks agree on at a step boundary: step health checks fired, corruption found, preemption
requested, a time-based save due, this rank's checkpoints failing."""


class TrainingExit(Exception):
    """Leave the training loop with an exit code (after the caller's cleanup)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def agree(flags: dict[str, bool], device: torch.device, group=None) -> dict[str, bool]:
    """OR of every rank's flags (one small all-reduce)."""
    t = torch.tensor([float(flags.get(f, False)) for f in FLAGS], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return {f: bool(v) for f, v in zip(FLAGS, t.tolist())}


@dataclass
class RecoveryPolicy:
    """Maps fired checks to an action, escalating when bounded attempts run out:
    retry → rollback after max_retries on the same step, rollback → restart after max_rollbacks."""

    health: object
    retries: int = 0
    """Retries of the current step so far."""
    rollbacks: int = 0
    """Rollbacks in this run so far (saved in checkpoints)."""
    _actions: dict = field(init=False)

    def __post_init__(self):
        h = self.health
        self._actions = {"nan": h.nan_action, "loss_spike": h.spike_action,
                         "grad_norm_explosion": h.grad_norm_action, "sdc": h.sdc_action}

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = int(state["rollbacks"])

    def decide(self, fired: list[str]) -> str:
        if not fired:
            self.retries = 0
            return "ok"
        action = max((self._actions[c] for c in fired), key=ACTIONS.index)
        if action == "retry" and self.retries >= self.health.max_retries:
            action = "rollback"
        if action == "rollback" and self.rollbacks >= self.health.max_rollbacks:
            action = "restart"
        if action == "retry":
            self.retries += 1
        else:
            self.retries = 0
        if action == "rollback":
            self.rollbacks += 1
        return action


STOP_FILE_ENV = "DIST_LLAMA_STOP_FILE"
"""A launcher's request to save and stop: the path of a file whose appearance means 'preempted'."""


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop agrees on it collectively at the next step boundary,
    saves, and exits with EXIT_PREEMPTED. Handlers are installed only in the main thread.

    A launcher can ask the same by creating the file named in $DIST_LLAMA_STOP_FILE (the Slurm batch
    script does on its preemption notice: signals cannot be sent through torchrun's agent, which
    dies on SIGUSR1). Then the trainer exits 0, not 76: torchrun restarts workers on any non-zero
    exit, and the launcher that wrote the file requeues the job itself.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, stop_file: Optional[str] = None):
        self.signal_name = None
        self._signalled = False
        self._stop_file = Path(stop_file) if stop_file else None
        self._previous = {}

    @property
    def by_stop_file(self) -> bool:
        return self._stop_file is not None and self._stop_file.exists()

    @property
    def requested(self) -> bool:
        return self._signalled or self.by_stop_file

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._signalled and signum == signal.SIGINT:  # a second Ctrl-C: do not wait for the save
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self._signalled and signum == signal.SIGTERM:
            # A second SIGTERM (a launcher stopping workers that could not reach a step boundary,
            # e.g. because a peer died): stop now, as the default handler would.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._signalled = True
        self.signal_name = signal.Signals(signum).name
