"""The training loop, and nothing else: everything it uses is built elsewhere and passed in."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dist_llama.model.flops import mfu
from dist_llama.parallel.context import cp_shard_batch
from dist_llama.parallel.tensor import token_loss_sum
from dist_llama.train.optim import clip_grad_norm_


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


class Trainer:
    def __init__(self, parts: TrainerParts):
        self.p = parts
        self.cfg = parts.cfg
        self.step = 0
        self.tokens = 0
        self.history: list[dict] = []
        self._next_batch: dict[str, torch.Tensor] | None = None
        self._data_state: dict | None = None
        self.params = [q for m in parts.model_parts for q in m.parameters() if q.requires_grad]
        # Every label is a real next token (packed windows, no padding), so this count is exact.
        self.tokens_per_step = self.cfg.train.global_batch_size * self.cfg.data.seq_len

    # --- one optimizer step -------------------------------------------------------------------
    def _grad_sync(self, model: nn.Module, enabled: bool):
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

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward, clip, step. Returns (global loss, grad norm) as device tensors:
        reading them waits for the device, so the caller decides when.

        The loss is the mean over every token of the global batch: each micro-batch contributes its
        token-loss sum times loss_scale, whose dp x cp factor the gradient averaging of DDP/FSDP
        divides out again. So accumulation, pipelining and data/context parallelism change nothing.
        """
        p = self.p
        if p.cp > 1:
            batch = cp_shard_batch(batch, p.cp_rank, p.cp)
        with loss_parallel() if p.tp > 1 else contextlib.nullcontext():
            if p.schedule is not None:
                loss_acc = self._pipeline_forward_backward(batch)
            else:
                loss_acc = self._forward_backward(batch)
        grad_norm = clip_grad_norm_(self.params, self.cfg.optim.grad_clip, p.pp_group)
        for optimizer, scheduler in zip(p.optimizers, p.schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for group in p.loss_groups:
            dist.all_reduce(loss_acc, group=group)
        return loss_acc / (p.loss_scale * self.tokens_per_step), grad_norm

    # --- state for checkpoints -------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "data": self._data_state,
                "scheduler": self.p.schedulers[0].state_dict(), "wandb_id": self.p.logger.wandb_id,
                "layout": self.p.layout, "world_size": self.p.world_size}

    def save(self) -> None:
        path = self.p.checkpointer.save(self.step, self.p.model_parts, self.p.optimizers, self.trainer_state())
        self.p.logger.event("checkpoint_saved", self.step, path=str(path))

    def maybe_resume(self) -> None:
        ck = self.cfg.checkpoint
        if not (ck.enabled and ck.resume):
            return
        path = self.p.checkpointer.latest()
        if path is None:
            return
        state, rng_restored = self.p.checkpointer.load(path, self.p.model_parts, self.p.optimizers)
        self.step, self.tokens = state["step"], state["tokens"]
        self.p.loader.load_state_dict(state["data"])
        self._next_batch = None
        for scheduler in self.p.schedulers:
            scheduler.load_state_dict(state["scheduler"])
        self.p.logger.event("checkpoint_loaded", self.step, path=str(path), rng_restored=rng_restored,
                            saved_layout=state["layout"], layout=self.p.layout)

    # --- the loop ------------------------------------------------------------------------------
    def _prefetch(self) -> None:
        """Fetch the next step's batch while the device still works on this one, and remember the
        data position before it: that is what a checkpoint taken at this step boundary records."""
        self._data_state = self.p.loader.state_dict()
        self._next_batch = {k: v.to(self.p.device, non_blocking=True)
                            for k, v in self.p.loader.next_batch().items()}

    def fit(self) -> list[dict]:
        cfg, p = self.cfg, self.p
        self.maybe_resume()
        p.logger.event("train_start", self.step, total_steps=cfg.train.steps, layout=p.layout)
        tokens_per_step = self.tokens_per_step
        started, steps_done, last_saved = time.perf_counter(), 0, self.step
        if self._next_batch is None:
            self._prefetch()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step(self._next_batch)
            self._prefetch()
            loss, grad_norm = loss.item(), grad_norm.item()
            step_time = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            steps_done += 1
            record = {"step": self.step, "loss": loss, "lr": p.schedulers[0].get_last_lr()[0],
                      "grad_norm": grad_norm, "tokens": self.tokens,
                      "tokens_per_sec": tokens_per_step / step_time,
                      "mfu": mfu(tokens_per_step / step_time / p.world_size, p.flops_per_token, p.peak_flops),
                      "step_time_s": step_time, "mem_gib": _memory_gib(p.device)}
            self.history.append(record)
            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - started
                p.logger.log_step(record, eta_s=elapsed / steps_done * (cfg.train.steps - self.step))
            if cfg.checkpoint.enabled and cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
                last_saved = self.step
        if cfg.checkpoint.enabled and cfg.checkpoint.save_final and last_saved != self.step:
            self.save()
        losses = {"first_loss": self.history[0]["loss"], "last_loss": self.history[-1]["loss"]} if self.history else {}
        p.logger.event("train_end", self.step, tokens=self.tokens, **losses)
        return self.history


def _memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss computed under loss parallel is a replicated DTensor; the loop keeps plain tensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t
