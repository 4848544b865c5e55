"""The training loop, and nothing else: everything it uses is built elsewhere and passed in."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.model.flops import mfu
from dist_llama.parallel.context import cp_shard_batch
from dist_llama.parallel.tensor import loss_parallel_context, token_loss_sum
from dist_llama.train.health import check_replicas, find_stragglers
from dist_llama.train.optim import clip_grad_norm_
from dist_llama.train.recovery import (EXIT_OK, EXIT_PREEMPTED, EXIT_RESTART, EXIT_UNRECOVERABLE, STOP_FILE_ENV,
                                       PreemptionFlag, RecoveryPolicy, TrainingExit, agree)

HEALTH_CHECKS = ("nan", "loss_spike", "grad_norm_explosion")
PHASES = ("step_start", "forward_backward", "health_agreement", "optimizer", "straggler_check", "sdc_check",
          "checkpoint")
"""The order of the watchdog's phases within a step (a hang report ranks ranks by progress)."""


@dataclass
class TrainerParts:
    """What the loop needs; built by dist_llama.train.build."""

    cfg: object
    device: torch.device
    model_parts: list[nn.Module]
    """This rank's model, or its pipeline stages; each forward(tokens, doc_ids, positions)."""
    optimizers: list[torch.optim.Optimizer]
    """One per model part."""
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    loader: object
    checkpointer: object
    logger: object
    loss_scale: float
    """Multiplies each token's loss: (dp x cp ranks the gradients are averaged over) / tokens per step."""
    n_micro: int
    """Micro-batches per step (gradient accumulation, or pipeline micro-batches)."""
    loss_groups: list[dist.ProcessGroup]
    """All-reducing the scaled loss over these (dp x cp, then pp) gives dp x cp times the global mean."""
    pp_group: Optional[dist.ProcessGroup]
    schedule: object
    """The pipeline schedule, or None without pipeline parallelism."""
    has_first_stage: bool
    has_last_stage: bool
    cp_rank: int
    cp: int
    tp: int
    autocast_dtype: Optional[torch.dtype]
    """bf16 autocast when no FSDP mixed-precision policy handles the dtype; None = off."""
    flops_per_token: float
    peak_flops: float
    world_size: int
    layout: dict
    health: object
    """StepHealth: NaN / spike / explosion detection on the global loss and gradient norm."""
    policy: RecoveryPolicy
    faults: object
    """FaultInjector (inert unless faults are configured)."""
    watchdog: object
    """Heartbeat watchdog, or None when health.hang_timeout_s is 0."""
    replica_group: Optional[dist.ProcessGroup]
    """Ranks holding identical local parameters (silent-data-corruption check), or None."""
    zero: object = None
    """parallel.engine=deepspeed: the ZeroEngine (dist_llama.parallel.zero) that runs backward,
    clipping and the update; model_parts is then [its DeepSpeedEngine]."""


class Trainer:
    def __init__(self, parts: TrainerParts):
        self.p = parts
        self.cfg = parts.cfg
        self.step = 0
        self.tokens = 0
        self.history: list[dict] = []
        self._next_batch: dict[str, torch.Tensor] | None = None
        self._data_state: dict | None = None
        self._last_save = (0, time.time())
        self.lr_scale = 1.0
        self.preemption = PreemptionFlag(os.environ.get(STOP_FILE_ENV))
        self.goodput = {"run_start": time.time(), "productive_s": 0.0, "lost_s": 0.0,
                        "checkpoint_blocking_s": 0.0}
        for scheduler in parts.schedulers:  # rollbacks may scale the LR; the factor is checkpointed
            scheduler.lr_lambdas = [lambda step, f=f: f(step) * self.lr_scale for f in scheduler.lr_lambdas]
        self.params = [q for m in parts.model_parts for q in m.parameters() if q.requires_grad]
        # Every label is a real next token (packed windows, no padding), so this count is exact.
        self.tokens_per_step = self.cfg.train.global_batch_size * self.cfg.data.seq_len

    # --- one optimizer step -------------------------------------------------------------------
    def _grad_sync(self, model: nn.Module, enabled: bool):
        if self.p.zero is not None:
            self.p.zero.set_last_micro_batch(enabled)
            return contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if hasattr(model, "no_sync") and not enabled:  # DDP
            return model.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Accumulate gradients over the micro-batches; returns the summed scaled loss."""
        p = self.p
        (model,) = p.model_parts
        loss_acc = torch.zeros((), device=p.device)
        micro_batches = [dict(zip(batch, parts)) for parts in
                         zip(*(t.chunk(p.n_micro) for t in batch.values()))]
        autocast = (torch.autocast(p.device.type, dtype=p.autocast_dtype) if p.autocast_dtype
                    else contextlib.nullcontext())
        for i, mb in enumerate(micro_batches):
            with self._grad_sync(model, i == len(micro_batches) - 1):
                with autocast:
                    logits = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"])
                loss = token_loss_sum(logits, mb["labels"]) * p.loss_scale
                if p.zero is not None:
                    p.zero.backward(loss)
                else:
                    loss.backward()
            loss_acc += _local(loss.detach())
        return loss_acc

    def _pipeline_forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The schedule splits the batch into micro-batches; tokens enter the first stage, labels
        the last; document ids and positions go to every stage."""
        p = self.p
        losses: list[torch.Tensor] = []
        args = (batch["tokens"],) if p.has_first_stage else ()
        target = batch["labels"] if p.has_last_stage else None
        p.schedule.step(*args, target=target, losses=losses, doc_ids=batch["doc_ids"],
                        positions=batch["positions"])
        if not p.has_last_stage:
            return torch.zeros((), device=p.device)
        return torch.stack([_local(loss.detach()) for loss in losses]).sum()

    def compute_gradients(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward and clipping, no update yet. Returns (global loss, grad norm) as device
        tensors: reading them waits for the device, so the caller decides when.

        The loss is the mean over every token of the global batch: each micro-batch contributes its
        token-loss sum times loss_scale, whose dp x cp factor the gradient averaging of DDP/FSDP
        divides out again. So accumulation, pipelining and data/context parallelism change nothing.
        """
        p = self.p
        if p.cp > 1:
            batch = cp_shard_batch(batch, p.cp_rank, p.cp)
        with loss_parallel_context(p.tp > 1):
            if p.schedule is not None:
                loss_acc = self._pipeline_forward_backward(batch)
            else:
                loss_acc = self._forward_backward(batch)
        poisoned = p.faults.loss(self.step + 1, loss_acc)
        if poisoned is not loss_acc:  # an injected NaN reaches the gradients as a real one would
            loss_acc = poisoned
            if p.zero is not None:
                p.zero.poison_gradients()
            else:
                next(q for q in self.params if q.grad is not None).grad.mul_(float("nan"))
        if p.zero is not None:  # DeepSpeed clips inside its step, by this same global norm
            grad_norm = p.zero.grad_norm()
        else:
            grad_norm = clip_grad_norm_(self.params, self.cfg.optim.grad_clip, p.pp_group)
        for group in p.loss_groups:
            dist.all_reduce(loss_acc, group=group)
        return loss_acc / (p.loss_scale * self.tokens_per_step), grad_norm

    def apply_update(self) -> None:
        for optimizer, scheduler in zip(self.p.optimizers, self.p.schedulers):
            if self.p.zero is not None:
                # DeepSpeed clips, updates through `optimizer` and clears its own gradient buffers
                # (the optimizer's zero_grad would drop the ones ZeRO-Offload keeps).
                self.p.zero.step()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()

    def discard_update(self) -> None:
        if self.p.zero is not None:
            self.p.zero.discard()
            return
        for optimizer in self.p.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One unchecked step (benchmarks and tests): gradients, then the update."""
        loss, grad_norm = self.compute_gradients(batch)
        self.apply_update()
        return loss, grad_norm

    # --- state for checkpoints -------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "data": self._data_state,
                "scheduler": self.p.schedulers[0].state_dict(), "wandb_id": self.p.logger.wandb_id,
                "layout": self.p.layout, "world_size": self.p.world_size, "health": self.p.health.state_dict(),
                "rollbacks": self.p.policy.rollbacks, "lr_scale": self.lr_scale, "goodput": dict(self.goodput)}

    def save(self, wait: bool = False) -> None:
        blocked = self.p.checkpointer.save(self.step, self.p.model_parts, self.p.optimizers, self.trainer_state())
        if wait:
            blocked += self.p.checkpointer.wait()
        self.goodput["checkpoint_blocking_s"] += blocked
        self._last_save = (self.step, time.time())

    def load(self, path, keep_data_position: bool = False) -> None:
        """Load a checkpoint into this layout: weights, optimizer, schedule, data position, RNG,
        health statistics, goodput counters (so work after the checkpoint counts as lost)."""
        p = self.p
        data_position = self._data_state
        state, rng_restored = p.checkpointer.load(path, p.model_parts, p.optimizers)
        self.step, self.tokens = state["step"], state["tokens"]
        p.loader.load_state_dict(data_position if keep_data_position else state["data"])
        self._data_state = p.loader.state_dict()
        self._next_batch = None
        for scheduler in p.schedulers:
            scheduler.load_state_dict(state["scheduler"])
        if "health" in state:
            p.health.load_state_dict(state["health"])
            p.policy.rollbacks = state["rollbacks"]
            self.lr_scale = state["lr_scale"]
            self.goodput.update(state["goodput"])
        p.logger.event("checkpoint_loaded", self.step, path=str(path), rng_restored=rng_restored,
                       saved_layout=state["layout"], layout=p.layout)

    def maybe_resume(self) -> None:
        ck = self.cfg.checkpoint
        if not (ck.enabled and ck.resume):
            return
        path = self.p.checkpointer.latest()
        if path is not None:
            self.load(path)

    # --- the loop ------------------------------------------------------------------------------
    def _prefetch(self) -> None:
        """Fetch the next step's batch while the device still works on this one, and remember the
        data position before it: that is what a checkpoint taken at this step boundary records."""
        self._data_state = self.p.loader.state_dict()
        self._next_batch = {k: v.to(self.p.device, non_blocking=True)
                            for k, v in self.p.loader.next_batch().items()}

    def _beat(self, phase: str) -> None:
        if self.p.watchdog is not None:
            self.p.watchdog.beat(self.step, phase)

    @contextlib.contextmanager
    def _unwatched(self):
        """Long legitimate work (loading, a blocking save) must not look like a hang."""
        if self.p.watchdog is not None:
            self.p.watchdog.pause()
        try:
            yield
        finally:
            if self.p.watchdog is not None:
                self.p.watchdog.resume()

    def _rollback(self, reason: str) -> None:
        p, h = self.p, self.cfg.health
        with self._unwatched():
            p.checkpointer.wait()
            path = p.checkpointer.latest()
        if path is None:
            raise TrainingExit(EXIT_RESTART, f"rollback needed ({reason}) but no valid checkpoint exists")
        failed_step = self.step + 1
        rollbacks = p.policy.rollbacks
        with self._unwatched():
            self.load(path, keep_data_position=h.rollback_skip_data)
        p.policy.rollbacks = rollbacks  # the count lives on across the rollback itself
        self.lr_scale *= h.rollback_lr_scale
        p.logger.event("rollback", self.step, reason=reason, failed_step=failed_step, checkpoint=str(path),
                       lr_scale=self.lr_scale, skipped_data=h.rollback_skip_data)

    def _step_flags(self, loss: float, grad_norm: float) -> dict[str, bool]:
        flags = {check: True for check in self.p.health.check(loss, grad_norm)}
        flags["preempt"] = self.preemption.requested
        ck = self.cfg.checkpoint
        flags["save"] = bool(ck.enabled and ck.interval_s and time.time() - self._last_save[1] >= ck.interval_s)
        return agree(flags, self.p.device)

    def fit(self) -> list[dict]:
        """Train to cfg.train.steps. Raises TrainingExit for restart / preemption / abort."""
        p = self.p
        self.preemption.install()
        try:
            return self._fit()
        finally:
            self.preemption.uninstall()
            if p.watchdog is not None:
                p.watchdog.stop()

    def _fit(self) -> list[dict]:
        cfg, p, h = self.cfg, self.p, self.cfg.health
        self._report_hangs()
        self.maybe_resume()
        self._last_save = (self.step, time.time())
        p.logger.event("train_start", self.step, total_steps=cfg.train.steps, layout=p.layout)
        tokens_per_step = self.tokens_per_step
        started, steps_done = time.perf_counter(), 0
        if self._next_batch is None:
            self._prefetch()
        while self.step < cfg.train.steps:
            self._beat("step_start")
            p.faults.at_step_start(self.step + 1)
            self._beat("forward_backward")
            straggler_check = h.straggler_interval and (self.step + 1) % h.straggler_interval == 0
            if straggler_check:  # start together, so each rank's step time is its own, not a wait for others
                dist.barrier()
            t0 = time.perf_counter()
            batch = self._next_batch
            loss_t, grad_norm_t = self.compute_gradients(batch)
            self._prefetch()
            loss, grad_norm = loss_t.item(), grad_norm_t.item()
            self._beat("health_agreement")
            flags = self._step_flags(loss, grad_norm)
            fired = [c for c in HEALTH_CHECKS if flags[c]]
            action = p.policy.decide(fired)
            if fired:
                p.logger.event("health_check", self.step + 1, checks=fired, action=action, loss=loss,
                               grad_norm=grad_norm)
            if action in ("ok", "log"):
                self._beat("optimizer")
                self.apply_update()
                p.health.accept(loss, grad_norm)
            else:
                self.discard_update()
                self.goodput["lost_s"] += time.perf_counter() - t0
                if action == "retry":  # the same batch again; the loader resumes after it
                    p.loader.load_state_dict(self._data_state)
                    self._next_batch = batch
                elif action == "rollback":
                    self._rollback(reason=",".join(fired))
                    self._prefetch()
                elif action in ("restart", "abort"):
                    code = EXIT_RESTART if action == "restart" else EXIT_UNRECOVERABLE
                    raise TrainingExit(code, f"{action} after {','.join(fired)} at step {self.step + 1}")
                if flags["preempt"]:
                    self._preempt()
                continue
            p.faults.after_step(self.step + 1, time.perf_counter() - t0, p.model_parts)
            step_time = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            steps_done += 1
            self.goodput["productive_s"] += step_time
            record = {"step": self.step, "loss": loss, "lr": p.schedulers[0].get_last_lr()[0],
                      "grad_norm": grad_norm, "tokens": self.tokens,
                      "tokens_per_sec": tokens_per_step / step_time,
                      "mfu": mfu(tokens_per_step / step_time / p.world_size, p.flops_per_token, p.peak_flops),
                      "step_time_s": step_time, "mem_gib": _memory_gib(p.device), "time": time.time(),
                      "goodput": self.effective_training_time()}
            self.history.append(record)
            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - started
                p.logger.log_step(record, eta_s=elapsed / steps_done * (cfg.train.steps - self.step))
            self._periodic_checks(step_time)
            if flags["preempt"]:
                self._preempt()
            ck = cfg.checkpoint
            if ck.enabled and ((ck.interval and self.step % ck.interval == 0) or flags["save"]):
                self._beat("checkpoint")
                self.save()
        with self._unwatched():
            if cfg.checkpoint.enabled and cfg.checkpoint.save_final and self._last_save[0] != self.step:
                self.save()
            self.p.checkpointer.wait()
        losses = {"first_loss": self.history[0]["loss"], "last_loss": self.history[-1]["loss"]} if self.history else {}
        p.logger.event("train_end", self.step, tokens=self.tokens, **losses)
        g = self.goodput
        wall = time.time() - g["run_start"]
        p.logger.event("goodput", self.step, effective_training_time=self.effective_training_time(),
                       wall_s=round(wall, 3), productive_s=round(g["productive_s"], 3),
                       checkpoint_blocking_s=round(g["checkpoint_blocking_s"], 3),
                       retried_or_skipped_s=round(g["lost_s"], 3),
                       # what remains: restarts, steps recomputed after them or after rollbacks, start-up
                       restarts_recompute_startup_s=round(wall - g["productive_s"] - g["checkpoint_blocking_s"]
                                                          - g["lost_s"], 3))
        return self.history

    def _report_hangs(self) -> None:
        """After a restart caused by a hang: which ranks were stuck. Every rank's watchdog fires
        (the others wait for it in a collective), but the stuck ranks are those furthest behind."""
        events_file = self.p.logger.run_dir / "events.jsonl"
        if self.p.logger.rank != 0 or not events_file.exists():
            return
        hangs = []
        for line in events_file.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "train_start":
                hangs = []
            elif event["event"] == "hang_detected":
                hangs.append(event)
        if not hangs:
            return
        progress = {e["rank"]: (e["step"], PHASES.index(e["last_phase"]) if e["last_phase"] in PHASES else -1)
                    for e in hangs}
        behind = min(progress.values())
        self.p.logger.event("hang_report", hangs[0]["step"], stuck_ranks=sorted(r for r, v in progress.items() if v == behind),
                            last_phases={r: e["last_phase"] for r, e in ((e["rank"], e) for e in hangs)},
                            dumps=sorted(e["dump"] for e in hangs))

    def _periodic_checks(self, step_time: float) -> None:
        """Straggler and silent-data-corruption checks, collectively, every N steps."""
        p, h = self.p, self.cfg.health
        if h.straggler_interval and self.step % h.straggler_interval == 0:
            self._beat("straggler_check")
            slow = find_stragglers(step_time, factor=h.straggler_factor)
            if slow:
                p.logger.event("stragglers", self.step, ranks=[r for r, _ in slow],
                               step_times=[round(t, 4) for _, t in slow], factor=h.straggler_factor)
        if h.sdc_interval and self.step % h.sdc_interval == 0 and p.replica_group is not None:
            self._beat("sdc_check")
            divergent = check_replicas(p.model_parts, p.replica_group)
            flags = agree({"sdc": bool(divergent)}, p.device)
            if flags["sdc"]:
                action = p.policy.decide(["sdc"])
                p.logger.event("sdc_detected", self.step, divergent_ranks=divergent, action=action, all_ranks=bool(divergent))
                if action == "rollback":
                    self._rollback(reason="sdc")
                    self._prefetch()
                elif action in ("restart", "abort"):
                    raise TrainingExit(EXIT_RESTART if action == "restart" else EXIT_UNRECOVERABLE,
                                       f"silent data corruption on ranks {divergent}")

    def _preempt(self) -> None:
        """Every rank agreed a preemption signal arrived: save, commit, exit for requeue."""
        with self._unwatched():
            if self.cfg.checkpoint.enabled and self._last_save[0] != self.step:
                self.save(wait=True)
            self.p.checkpointer.wait()
        # Ranks agree on the flag, not on its source: the stop file decides the exit code everywhere
        # only if every rank can see it, which a shared run directory guarantees.
        source = "stop_file" if self.preemption.by_stop_file else self.preemption.signal_name
        self.p.logger.event("preempted", self.step, signal=source)
        if source == "stop_file":
            raise TrainingExit(EXIT_OK, f"stopped at step {self.step}: the launcher asked (stop file), state saved")
        raise TrainingExit(EXIT_PREEMPTED, f"preempted ({source}) at step {self.step}")

    def effective_training_time(self) -> float:
        """Productive step time over wall time since the run directory's first start (restarts,
        recomputed steps, checkpoint blocking and stalls all count against it)."""
        return self.goodput["productive_s"] / max(1e-9, time.time() - self.goodput["run_start"])


def _memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss computed under loss parallel is a replicated DTensor; the loop keeps plain tensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t
