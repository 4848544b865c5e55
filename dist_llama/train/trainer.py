"""The training loop: step, agree, act, log, save. Everything it drives is built elsewhere
(dist_llama.train.build) and passed in: the engine (data parallelism, backward, update), the step
strategy (micro-batches or the pipeline), the checkpointer, and callbacks for the rest."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from dist_llama.config import Config
from dist_llama.data.loader import BatchLoader
from dist_llama.faults import FaultInjector
from dist_llama.model.flops import mfu
from dist_llama.train.callbacks import Callback
from dist_llama.train import crashloop
from dist_llama.train.checkpoint import Checkpointer
from dist_llama.train.engines import Engine
from dist_llama.train.step_health import CHECKS, StepHealth
from dist_llama.train.watchdog import NoWatchdog, Watchdog
from dist_llama.train.metrics import MetricsLogger, peak_memory_gib
from dist_llama.train.optim import ScaledLambdaLR, Schedulers
from dist_llama.train.recovery import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_RESTART, EXIT_SAVE_FAILED,
                                       EXIT_UNRECOVERABLE, STOP_FILE_ENV, PreemptionFlag, RecoveryPolicy, TrainingExit,
                                       agree)
from dist_llama.train.resume_check import model_record
from dist_llama.train.state import Goodput, Progress
from dist_llama.train.step import Batch, StepStrategy

EXITS = {"restart": EXIT_RESTART, "abort": EXIT_UNRECOVERABLE}
"""Recovery actions that end the process, and their exit codes."""


@dataclass
class Prefetched:
    """The next step's batch, and what the loader said about it when it was drawn."""

    batch: Batch
    n_tokens: int
    """Global count of counted label tokens (the loss normaliser)."""
    tokens: int
    """Input tokens of the global batch (global batch x seq_len of its stage)."""
    seq_len: int
    tokens_by_source: dict[str, int]
    """Input tokens drawn from each source so far, this batch included."""
    position: dict
    """The loader's state before this batch: what a checkpoint taken before it is trained records."""


@dataclass
class StepResult:
    """What an applied step did: the callbacks read it beside the record."""

    loss: float
    grad_norm: float
    lr: float
    """The LR the update used."""
    step_time: float
    fetched: Prefetched
    flags: dict[str, bool]
    """What the ranks agreed at its boundary (preempt, save, ...)."""

    @property
    def rows(self) -> int:
        """Sequences in the global batch."""
        return self.fetched.tokens // self.fetched.seq_len


@dataclass
class TrainerParts:
    """What the loop needs; built by dist_llama.train.build."""

    cfg: Config
    device: torch.device
    engine: Engine
    step: StepStrategy
    schedulers: list[ScaledLambdaLR]
    """One per optimizer (pipeline stage): warmup + cosine, times the rollback scale."""
    loader: BatchLoader
    checkpointer: Checkpointer
    logger: MetricsLogger
    health: StepHealth
    """NaN / spike / explosion detection on the global loss and gradient norm."""
    policy: RecoveryPolicy
    faults: FaultInjector
    """Injected faults (inert unless configured): NaN losses here, the rest through callbacks."""
    watchdog: Watchdog | NoWatchdog
    callbacks: list[Callback]
    flops_per_token: Callable[[int], float]
    """Model FLOPs per token at a sequence length (attention grows with it)."""
    peak_flops: float
    world_size: int
    layout: dict
    resume: Optional[Path] = None
    """The checkpoint to resume from (the newest valid one when training was built), if any."""


class Trainer:
    def __init__(self, parts: TrainerParts):
        self.parts = parts
        self.cfg, self.engine, self.logger = parts.cfg, parts.engine, parts.logger
        self.progress = Progress()
        self.goodput = Goodput()
        self.history: list[dict] = []
        self.preemption = PreemptionFlag(os.environ.get(STOP_FILE_ENV))
        self._next: Prefetched | None = None
        self._last_save = (0, time.time())

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def lr(self) -> float:
        """The LR the next optimizer step uses (what the optimizer holds, not the schedule's plan)."""
        return self.parts.schedulers[0].optimizer.param_groups[0]["lr"]

    # --- one optimizer step -------------------------------------------------------------------
    def compute_gradients(self, batch: Batch, n_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward, no update yet. Returns (global mean loss, global grad norm) as device
        tensors: reading them waits for the device, so the caller decides when."""
        if n_tokens is None:
            n_tokens = int(self.parts.step.count_tokens(batch).item())
        with self.engine.compute_clock.window():  # this rank's own work, for the straggler check
            loss = self.parts.step.forward_backward(batch, n_tokens)
        poisoned = self.parts.faults.loss(self.step + 1, loss)
        if poisoned is not loss:  # an injected NaN reaches the gradients as a real one would
            loss = poisoned
            self.engine.poison_gradients()
        grad_norm = self.engine.grad_norm()
        return self.parts.step.global_loss(loss, n_tokens), grad_norm

    def apply_update(self) -> None:
        self.engine.step()
        for scheduler in self.parts.schedulers:
            scheduler.step()

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One unchecked step (benchmarks and tests): gradients, then the update."""
        loss, grad_norm = self.compute_gradients(batch)
        self.apply_update()
        return loss, grad_norm

    # --- state for checkpoints -------------------------------------------------------------
    def states(self) -> dict:
        """What a checkpoint holds besides the engine's state and the progress: key in
        trainer_state.json → an object that saves and loads itself (torchtitan's
        CheckpointManager.states)."""
        p = self.parts
        return {"scheduler": Schedulers(p.schedulers), "health": p.health, "policy": p.policy, "goodput": self.goodput}

    def trainer_state(self) -> dict:
        """trainer_state.json: the progress, the states, and what the run was (read, not loaded)."""
        p = self.parts
        return {"step": self.step, "tokens": self.progress.tokens, "data": self.progress.data,
                **{key: obj.state_dict() for key, obj in self.states().items()},
                "wandb_id": self.logger.wandb_id, "layout": p.layout, "world_size": p.world_size,
                "model": model_record(self.cfg)}

    def save(self, wait: bool = False) -> None:
        blocked = self.parts.checkpointer.save(self.step, self.engine, self.trainer_state())
        if wait:
            blocked += self.parts.checkpointer.wait()
        self.goodput.checkpoint_blocking_s += blocked
        self._last_save = (self.step, time.time())

    def load(self, path, keep_data_position: bool = False) -> None:
        """Load a checkpoint into this layout: weights, optimizer, schedule, data position, RNG,
        health statistics, goodput counters (so work after the checkpoint counts as lost)."""
        p = self.parts
        data_position = self.progress.data
        with self._unwatched():
            state, rng_restored = p.checkpointer.load(path, self.engine)
        p.loader.load_state_dict(data_position if keep_data_position else state["data"])
        self.progress = Progress(state["step"], state["tokens"], p.loader.state_dict())
        state.setdefault("policy", {"rollbacks": state.get("rollbacks", 0)})  # checkpoints before "policy"
        for key, obj in self.states().items():
            obj.load_state_dict(state[key])
        self._next = None
        self.logger.event("checkpoint_loaded", self.step, path=str(path), rng_restored=rng_restored,
                          saved_layout=state["layout"], layout=p.layout)

    # --- the loop ------------------------------------------------------------------------------
    def _prefetch(self, again: Prefetched | None = None) -> None:
        """Fetch the next step's batch (or take `again` again) while the device still works on
        this one, with the data position before it: what a checkpoint at this boundary records."""
        if again is not None:
            self.progress.data = again.position
            self._next = again
            return
        loader = self.parts.loader
        self.progress.data = position = loader.state_dict()
        batch = {k: v.to(self.parts.device, non_blocking=True) for k, v in loader.next_batch().items()}
        for source, epoch in loader.new_epochs:
            self.logger.event("data_epoch", self.step + 1, source=source, epoch=epoch)
        self._next = Prefetched(batch, int(self.parts.step.count_tokens(batch).item()),
                                loader.global_batch_size * loader.seq_len, loader.seq_len, loader.tokens_by_source,
                                position)

    @contextlib.contextmanager
    def _unwatched(self):
        """Long legitimate work (loading, a blocking save) must not look like a hang."""
        self.parts.watchdog.pause()
        try:
            yield
        finally:
            self.parts.watchdog.resume()

    def _beat(self, phase: str) -> None:
        self.parts.watchdog.beat(self.step, phase)

    def close(self) -> None:
        """When training is over (or left): join the background checkpoint write, close the logs."""
        self.parts.checkpointer.close()
        self.logger.close()

    def fit(self) -> list[dict]:
        """Train to cfg.train.steps. Raises TrainingExit for restart / preemption / abort."""
        self.preemption.install()
        run_dir, rank = Path(self.cfg.train.run_dir), self.logger.rank
        try:
            history = self._fit()
        except TrainingExit as exc:
            if exc.code in (EXIT_OK, EXIT_PREEMPTED, EXIT_INTERRUPTED) and rank == 0:
                crashloop.record_end(run_dir, self.step, exc.code)
            elif exc.code == EXIT_RESTART and rank == 0:  # every rank leaves together: one record
                crashloop.record_failure(run_dir, self.step + 1, rank, exc.reason)
            raise
        except Exception as exc:  # this rank's own failure: the crash-loop detector's cause
            crashloop.record_failure(run_dir, self.step + 1, rank, f"{type(exc).__name__}: {exc}")
            for callback in self.parts.callbacks:
                callback.on_exception(self.step + 1, exc)
            raise
        else:
            if rank == 0:
                crashloop.record_end(run_dir, self.step, EXIT_OK)
            return history
        finally:
            self.preemption.uninstall()
            self.parts.watchdog.stop()

    def _fit(self) -> list[dict]:
        self._start()
        while self.step < self.cfg.train.steps:
            result = self._step()
            if result is not None:
                self._after_step(result)
        self._finish()
        return self.history

    def _start(self) -> None:
        """Callbacks' start, the resume, the crash-loop verdict, the first batch."""
        for callback in self.parts.callbacks:
            callback.on_train_start()
        if self.parts.resume is not None:
            self.load(self.parts.resume)
        self._check_crash_loop()
        self._last_save = (self.step, time.time())
        self.logger.event("train_start", self.step, total_steps=self.cfg.train.steps, layout=self.parts.layout)
        if self._next is None:
            self._prefetch()

    def _step(self) -> Optional[StepResult]:
        """One optimizer step: gradients → agree → decide → update. Returns what it did, or None
        when the agreed action discarded the step (skip, retry, rollback; exits raise)."""
        p = self.parts
        self._beat("step_start")
        for callback in p.callbacks:
            callback.on_step_start(self.step + 1)
        self._beat("forward_backward")
        t0 = time.perf_counter()
        fetched = self._next
        loss_t, grad_norm_t = self.compute_gradients(fetched.batch, fetched.n_tokens)
        self._prefetch()
        loss, grad_norm = loss_t.item(), grad_norm_t.item()
        self._beat("health_agreement")
        flags = self._agree(loss, grad_norm)
        fired = [c for c in CHECKS if flags[c]]
        action = p.policy.decide(fired)
        if fired:
            self.logger.event("health_check", self.step + 1, checks=fired, action=action, loss=loss,
                              grad_norm=grad_norm)
        if action not in ("ok", "log"):
            self.engine.discard()
            self.goodput.lost_s += time.perf_counter() - t0
            if action == "retry":  # the same batch again; the loader resumes after it, and a
                # checkpoint before the rerun (preemption) records the position before it
                p.loader.load_state_dict(self.progress.data)
                self._prefetch(fetched)
            self._act(action, ",".join(fired))
            if flags["preempt"]:
                self._preempt()
            return None
        self._beat("optimizer")
        lr = self.lr
        self.apply_update()
        p.health.accept(loss, grad_norm)
        for callback in p.callbacks:
            callback.on_update(self.step + 1, time.perf_counter() - t0)
        return StepResult(loss, grad_norm, lr, time.perf_counter() - t0, fetched, flags)

    def _after_step(self, result: StepResult) -> None:
        """Count the step, record it (callbacks add to the record and log it), act on the
        callbacks' findings, then preemption and the checkpoint cadence."""
        p, ck = self.parts, self.cfg.checkpoint
        self.progress.step += 1
        self.progress.tokens += result.fetched.tokens
        self.goodput.productive_s += result.step_time
        record = self._record(result)
        for callback in p.callbacks:
            callback.on_record(record, result)
        for callback in p.callbacks:
            for finding in callback.on_step_end(record):
                action = p.policy.decide([finding.check])
                self.logger.event(finding.event, self.step, action=action, **finding.fields)
                self._act(action, finding.check)
        if result.flags["preempt"]:
            self._preempt()
        if ck.enabled and ((ck.interval and self.step % ck.interval == 0) or result.flags["save"]):
            self._beat("checkpoint")
            self._check_failed_saves()
            self.save()

    def _finish(self) -> None:
        """The final checkpoint (committed, or exit 74), the end events."""
        ck = self.cfg.checkpoint
        with self._unwatched():
            if ck.enabled and ck.save_final and self._last_save[0] != self.step:
                self.save()
            self.parts.checkpointer.wait()
        if ck.enabled and ck.save_final:
            self._check_final_save()
        losses = {"first_loss": self.history[0]["loss"], "last_loss": self.history[-1]["loss"]} if self.history else {}
        self.logger.event("train_end", self.step, tokens=self.progress.tokens, **losses)
        self.logger.event("goodput", self.step, **self.goodput.summary())

    def _check_failed_saves(self) -> None:
        """Training on while no checkpoint commits only piles up work that cannot be saved: after
        checkpoint.max_failed_saves failures in a row, stop and say which step is the last saved."""
        limit = self.cfg.checkpoint.max_failed_saves
        ckpt = self.parts.checkpointer
        failing = bool(limit) and ckpt.rank == 0 and ckpt.failed_in_a_row >= limit
        if agree({"save_failed": failing}, self.parts.device)["save_failed"]:
            committed = ckpt.committed_step()
            self.logger.event("checkpoints_failing", self.step, failed_in_a_row=ckpt.failed_in_a_row,
                              last_committed=committed, reason=ckpt.last_error)
            raise TrainingExit(EXIT_SAVE_FAILED, f"{ckpt.failed_in_a_row} checkpoints in a row failed "
                               f"({ckpt.last_error}); the last committed checkpoint is step {committed}")

    def _check_final_save(self) -> None:
        """Finishing without the final checkpoint committed loses work: say so with its own exit code."""
        # Rank 0 commits (the others' wait() returns once their own files are written): its view counts.
        committed = self.parts.checkpointer.committed_step()
        failed = self.parts.checkpointer.rank == 0 and committed != self.step
        if agree({"save_failed": failed}, self.parts.device)["save_failed"]:
            reason = self.parts.checkpointer.last_error or "see checkpoint_failed in events.jsonl"
            self.logger.event("final_checkpoint_failed", self.step, last_committed=committed, reason=reason)
            raise TrainingExit(EXIT_SAVE_FAILED, f"the final checkpoint (step {self.step}) was not committed "
                               f"({reason}); the last committed checkpoint is step {committed}")

    def _agree(self, loss: float, grad_norm: float) -> dict[str, bool]:
        """Every rank's health checks, preemption request and time-based save, agreed by all."""
        flags = {check: True for check in self.parts.health.check(loss, grad_norm)}
        flags["preempt"] = self.preemption.requested
        ck = self.cfg.checkpoint
        flags["save"] = bool(ck.enabled and ck.interval_s and time.time() - self._last_save[1] >= ck.interval_s)
        return agree(flags, self.parts.device)

    def _check_crash_loop(self) -> None:
        """Rank 0 reads the failure record before adding this attempt to it; every rank gets its
        verdict (one broadcast), so all exit together or none does."""
        run_dir, n = Path(self.cfg.train.run_dir), self.cfg.health.max_failures_at_step
        verdict = None
        if self.logger.rank == 0 and n > 0:
            verdict = crashloop.crash_loop(crashloop.read_attempts(run_dir), self.step, n)
        if torch.distributed.is_initialized():
            box = [verdict]
            torch.distributed.broadcast_object_list(box, src=0)
            verdict = box[0]
        if verdict:
            self.logger.event("crash_loop", self.step, reason=verdict)
            raise TrainingExit(EXIT_UNRECOVERABLE, verdict)
        if self.logger.rank == 0:
            crashloop.record_start(run_dir, self.step, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def _record(self, result: StepResult) -> dict:
        """The step's record (metrics.jsonl's line, once the callbacks have added to it)."""
        p, fetched, step_time = self.parts, result.fetched, result.step_time
        record = {"step": self.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens": self.progress.tokens, "tokens_per_sec": fetched.tokens / step_time,
                  "mfu": mfu(fetched.tokens / step_time / p.world_size, p.flops_per_token(fetched.seq_len),
                             p.peak_flops),
                  "seq_len": fetched.seq_len, "tokens_by_source": fetched.tokens_by_source,
                  "step_time_s": step_time, "compute_s": self.engine.compute_clock.seconds,
                  "mem_gib": peak_memory_gib(p.device), "mem_reserved_gib": peak_memory_gib(p.device, reserved=True),
                  "time": time.time(),
                  "goodput": self.goodput.effective(), **p.step.metrics}
        self.history.append(record)
        return record

    def _act(self, action: str, reason: str) -> None:
        """What every rank does for an agreed recovery action (after the step's update or discard)."""
        if action == "rollback":
            self._rollback(reason)
        elif action in EXITS:
            raise TrainingExit(EXITS[action], f"{action} after {reason} at step {self.step + 1}")

    def _rollback(self, reason: str) -> None:
        p, h = self.parts, self.cfg.health
        with self._unwatched():
            p.checkpointer.wait()
            path = p.checkpointer.latest()
        if path is None:
            raise TrainingExit(EXIT_RESTART, f"rollback needed ({reason}) but no valid checkpoint exists")
        failed_step, rollbacks = self.step + 1, p.policy.rollbacks
        self.load(path, keep_data_position=h.rollback_skip_data)
        p.policy.rollbacks = rollbacks  # the count lives on across the rollback itself
        for scheduler in p.schedulers:
            scheduler.rescale(h.rollback_lr_scale)
        self.logger.event("rollback", self.step, reason=reason, failed_step=failed_step, checkpoint=str(path),
                          lr_scale=p.schedulers[0].scale, skipped_data=h.rollback_skip_data)
        self._prefetch()

    def _preempt(self) -> None:
        """Every rank agreed a preemption signal arrived: save, commit, exit for requeue."""
        with self._unwatched():
            if self.cfg.checkpoint.enabled and self._last_save[0] != self.step:
                self.save(wait=True)
            self.parts.checkpointer.wait()
        # Ranks agree on the flag, not on its source: the stop file decides the exit code everywhere
        # only if every rank can see it, which a shared run directory guarantees.
        source = "stop_file" if self.preemption.by_stop_file else self.preemption.signal_name
        self.logger.event("preempted", self.step, signal=source)
        if source == "stop_file":
            raise TrainingExit(EXIT_OK, f"stopped at step {self.step}: the launcher asked (stop file), state saved")
        if source == "SIGINT":  # Ctrl-C: the user stops the run, no launcher requeues it
            raise TrainingExit(EXIT_INTERRUPTED, f"interrupted (SIGINT) at step {self.step}, state saved")
        raise TrainingExit(EXIT_PREEMPTED, f"preempted ({source}) at step {self.step}")
