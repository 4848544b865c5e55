"""Step strategies: how one optimizer step's forward and backward run on this rank, and the loss
normalisation every layout shares. Two implementations behind one interface: micro-batch
accumulation (`MicroBatchStep`) and the pipeline schedule (`PipelineStep`). What one micro-batch's
loss is, and what it is averaged over, is the objective's (train/objectives/); where the step runs is
its `StepLayout`, built once from the mesh.

The loss is the mean over the objective's items of the global batch (counted label tokens: labels
equal to IGNORE_INDEX don't count; or preference pairs), whatever the layout: the ranks agree on that
count N first, then each item's loss is scaled by (dp x cp) / N, the factor the gradient averaging of
DDP/FSDP/ZeRO over the dp x cp ranks divides out again. So accumulation, pipelining and data/context parallelism change
nothing. Context-parallel ranks shard the sequence here; tensor parallel computes the loss on
vocab-sharded logits (loss parallel). With `loss_chunk` > 0 the model stops before its output
projection and the loss applies it a chunk of tokens at a time (parallel/loss.py), so the whole
micro-batch's logits never exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_llama.config.validation import micro_batches, micro_rows
from dist_llama.parallel.context import cp_shard_batch
from dist_llama.parallel.loss import chunked_loss_sum
from dist_llama.parallel.pipeline import build_schedule, build_stages
from dist_llama.parallel.tensor import loss_parallel_context, token_loss_sum
from dist_llama.train.engines import Engine
from dist_llama.train.objectives import Objective
from dist_llama.train.objectives.base import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepLayout:
    """Where this rank's step runs: built once from the mesh (`step_layout`)."""

    device: torch.device
    dp_group: Any
    """Data-parallel ranks (different batches): the item count is summed over them."""
    loss_groups: tuple
    """The groups whose loss shares add up: dp x cp, then the pipeline's."""
    cp: int
    cp_rank: int
    tp: int
    n_micro: int
    """Micro-batches per step (gradient accumulation, or pipeline micro-batches)."""
    micro_batch_size: int
    """train.micro_batch_size as set (-1 included): `micro_rows` resolves it for each batch, whose
    size a curriculum stage may change."""
    pp: int


def step_layout(device: torch.device, dims, meshes, n_micro: int, micro_batch_size: int) -> StepLayout:
    groups = (meshes.dp_cp.get_group(),) + ((meshes.pp_group,) if meshes.pp_group is not None else ())
    return StepLayout(device, meshes.dp.get_group(), groups, dims.cp, meshes.world["cp"].get_local_rank(), dims.tp,
                      n_micro, micro_batch_size, dims.pp)


class StepStrategy(Protocol):
    metrics: dict[str, float]
    """The objective's metrics of the last step (means over the global batch's items)."""

    def count_tokens(self, batch: Batch) -> torch.Tensor:
        """The global number of the objective's items (counted label tokens, or pairs) in this
        step's batch. Collective."""

    def forward_backward(self, batch: Batch, n_tokens: int) -> torch.Tensor:
        """Gradients of the global mean loss into the engine; returns this rank's share of the
        loss, still scaled (reduce it with `global_loss`)."""

    def global_loss(self, local: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The global mean loss from every rank's share. Collective."""

    def evaluate(self, batch: Batch) -> tuple[float, int]:
        """Forward only, no gradients, no state changed: (summed token loss, counted tokens) of the
        global batch. Collective."""

    def evaluate_rows(self, batch: Batch) -> torch.Tensor:
        """Forward only, as `evaluate`, of a global batch every rank holds whole (each data-parallel
        rank runs its contiguous share of the rows): each row's summed token loss, on every rank.
        Collective."""


class _Step:
    """What both strategies share: counting, scaling, context parallel and loss parallel."""

    def __init__(self, engine: Engine, layout: StepLayout, objective: Objective, loss_chunk: int = 0):
        self.engine, self.layout, self.objective = engine, layout, objective
        self.loss_chunk = loss_chunk
        """Tokens per cross-entropy chunk (0: the plain loss on the model's logits)."""
        self.n_micro = layout.n_micro
        self.device = layout.device
        self.dp_group, self.loss_groups = layout.dp_group, list(layout.loss_groups)
        self.cp, self.cp_rank, self.tp = layout.cp, layout.cp_rank, layout.tp
        self.dp_cp = dist.get_world_size(self.loss_groups[0])
        """dp x cp: what the gradient averaging divides by."""
        self.scale = 0.0
        """This step's factor on each item's loss: dp x cp / the global item count."""
        self.metrics: dict[str, float] = {}
        self.per_row = False
        """Whether `loss` returns each row's summed loss (evaluate_rows) instead of their total."""

    def count_tokens(self, batch: Batch) -> torch.Tensor:
        count = self.objective.count(batch)
        dist.all_reduce(count, group=self.dp_group)
        return count

    def forward_backward(self, batch: Batch, n_tokens: int) -> torch.Tensor:
        self.scale = self.dp_cp / max(n_tokens, 1)
        self.objective.reset(self.device)
        if self.cp > 1:
            batch = cp_shard_batch(batch, self.cp_rank, self.cp)
        with loss_parallel_context(self.tp > 1):
            return self.objective.forward_backward(self, batch)

    def _run(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, batch: Batch) -> tuple[float, int]:
        count = self.count_tokens(batch)
        scale, self.scale = self.scale, 1.0  # plain sums: the loss function reads the scale
        self.objective.reset(self.device)
        try:
            if self.cp > 1:
                batch = cp_shard_batch(batch, self.cp_rank, self.cp)
            with torch.no_grad(), loss_parallel_context(self.tp > 1):
                local = self._forward(batch)
        finally:
            self.scale = scale
        for group in self.loss_groups:  # as the training loss: dp x cp shares, then the last stage's
            dist.all_reduce(local, group=group)
        return local.item(), int(count.item())

    def _forward(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate_rows(self, batch: Batch) -> torch.Tensor:
        rows = len(batch["tokens"])
        dp, dp_rank = dist.get_world_size(self.dp_group), dist.get_rank(self.dp_group)
        share = rows // dp
        local = {k: v[dp_rank * share : (dp_rank + 1) * share] for k, v in batch.items()}
        scale, self.scale, self.per_row = self.scale, 1.0, True
        try:
            if self.cp > 1:
                local = cp_shard_batch(local, self.cp_rank, self.cp)
            with torch.no_grad(), loss_parallel_context(self.tp > 1):
                losses = self._forward(local)
        finally:
            self.scale, self.per_row = scale, False
        out = torch.zeros(rows, device=self.device)
        out[dp_rank * share : (dp_rank + 1) * share] = losses
        for group in self.loss_groups:  # dp ranks fill their rows, cp ranks add their tokens, the last stage gives
            dist.all_reduce(out, group=group)
        return out

    def autocast(self):
        """The one mixed-precision decision for every strategy: the engine's (autocast to its dtype,
        or nothing when it casts the weights itself or computes in fp32)."""
        dtype = self.engine.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scaled summed loss of the model's output: logits, or with loss_chunk the hidden states
        (with `per_row`: each row's)."""
        return self._row_losses(out, labels) if self.per_row else self._loss_sum(out, labels)

    def _loss_sum(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the compute dtype (the pipeline schedule calls this inside autocast).
        with torch.autocast(self.device.type, enabled=False):
            if self.loss_chunk:
                total = chunked_loss_sum(out, self.engine.unwrapped(self._head_part()).output.weight, labels, self.loss_chunk,
                                         IGNORE_INDEX, compute_dtype=self.engine.autocast_dtype)
            else:
                total = token_loss_sum(out, labels, ignore_index=IGNORE_INDEX)
            return total * self.scale

    def _row_losses(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each row's summed loss (the same token loss, one row at a time)."""
        return torch.stack([_local(self._loss_sum(out[i : i + 1], labels[i : i + 1])) for i in range(len(labels))])

    def _head_part(self) -> torch.nn.Module:
        """The model part that holds the output projection."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        return {"return_hidden": True} if self.loss_chunk else {}

    def global_loss(self, local: torch.Tensor, n_tokens: int) -> torch.Tensor:
        if self.objective.metric_names:
            stats = self.objective.stats.clone()
            dist.all_reduce(stats, group=self.dp_group)  # tensor-parallel ranks hold the same values
            self.metrics = self.objective.summarize(stats, n_tokens)
        for group in self.loss_groups:
            dist.all_reduce(local, group=group)
        return local / (self.scale * n_tokens) if n_tokens else local


class MicroBatchStep(_Step):
    """The local batch cut into micro-batches of `micro_batch_size` sequences (-1: one micro-batch;
    a curriculum stage with a larger batch gets more of them); gradients accumulate, and the engine
    reduces them after the last one."""

    def __init__(self, engine: Engine, layout: StepLayout, objective: Objective, loss_chunk: int = 0):
        super().__init__(engine, layout, objective, loss_chunk)
        self.micro_batch_size = layout.micro_batch_size

    def _head_part(self) -> torch.nn.Module:
        return self.engine.parts[0]

    def micro_batches(self, batch: Batch) -> list[Batch]:
        n = micro_batches(len(batch["tokens"]), self.micro_batch_size, self.layout.pp)
        return [dict(zip(batch, parts)) for parts in zip(*(t.chunk(n) for t in batch.values()))]

    def _run(self, batch: Batch) -> torch.Tensor:
        (model,) = self.engine.parts
        loss_acc = torch.zeros((), device=self.device)
        micro_batches = self.micro_batches(batch)
        for i, mb in enumerate(micro_batches):
            with self.engine.grad_sync(model, i == len(micro_batches) - 1):
                loss = self.objective.micro_loss(self, model, mb)
                self.engine.backward(loss)
            loss_acc += _local(loss.detach())
        return loss_acc

    def _forward(self, batch: Batch) -> torch.Tensor:
        # The engine's wrapper is called as in training (DDP skips its reducer under no_grad,
        # FSDP gathers and frees as usual); no grad_sync: nothing reaches the gradients.
        (model,) = self.engine.parts
        if self.per_row:  # the language model's token loss, whatever the objective
            return torch.cat([Objective.micro_loss(self.objective, self, model, mb) for mb in self.micro_batches(batch)])
        loss_acc = torch.zeros((), device=self.device)
        for mb in self.micro_batches(batch):
            loss_acc += _local(self.objective.micro_loss(self, model, mb))
        return loss_acc


class PipelineStep(_Step):
    """The schedule splits the batch into micro-batches; tokens enter the first stage, labels the
    last; document ids and positions go to every stage. The stages learn their activation shapes at
    the first step, so a curriculum stage with another sequence length or batch gets its own
    pipeline stages and schedule (built once, at its first step)."""

    def __init__(self, engine: Engine, layout: StepLayout, objective: Objective, schedule_name: str,
                 stage_ids: list[int], n_stages: int, pp_mesh, loss_chunk: int = 0):
        super().__init__(engine, layout, objective, loss_chunk)
        self.schedule_name, self.stage_ids, self.n_stages, self.pp_mesh = schedule_name, stage_ids, n_stages, pp_mesh
        self.micro_rows = micro_rows(layout.micro_batch_size, 0, layout.pp)
        """Sequences per micro-batch."""
        self._schedules: dict[tuple[int, ...], object] = {}
        self.has_first_stage = 0 in stage_ids
        self.has_last_stage = n_stages - 1 in stage_ids

    def schedule_for(self, shape: tuple[int, ...]):
        """The schedule for batches of this [rows, seq_len] shape."""
        if shape not in self._schedules:
            stages = build_stages(self.engine.parts, self.stage_ids, self.n_stages, self.pp_mesh, self.device)
            self.n_micro = shape[0] // self.micro_rows
            self._schedules[shape] = build_schedule(self.schedule_name, stages, self.n_micro, self.loss)
        return self._schedules[shape]

    def _head_part(self) -> torch.nn.Module:
        return self.engine.parts[self.stage_ids.index(self.n_stages - 1)]

    @property
    def schedule(self):
        """The schedule of the latest batch shape (benchmarks and tests look at it)."""
        return next(reversed(self._schedules.values()))

    def _run(self, batch: Batch) -> torch.Tensor:
        # Forward and backward interleave inside the schedule, so autocast covers both; backward
        # ops keep the dtypes their forward ops were given. The last stage's outputs are not kept
        # for a merge nobody reads (n_micro x tokens x dim on that rank: 4 GiB on Llama 3 405B's).
        return self._through_schedule(batch, "step", return_outputs=False)

    def _forward(self, batch: Batch) -> torch.Tensor:
        # The schedule's forward-only pass (it rebuilds its stages' buffers when switching between
        # eval and step, under a forked RNG); the outputs are not kept, only the losses.
        return self._through_schedule(batch, "eval", return_outputs=False)

    def _through_schedule(self, batch: Batch, method: str, **extra) -> torch.Tensor:
        """The batch through the schedule's `step` or `eval`: tokens into the first stage, labels
        into the last; returns this rank's summed micro-batch losses."""
        schedule = self.schedule_for(tuple(batch["tokens"].shape))
        losses: list[torch.Tensor] = []
        args = (batch["tokens"],) if self.has_first_stage else ()
        target = batch["labels"] if self.has_last_stage else None
        with self.autocast():
            getattr(schedule, method)(*args, target=target, losses=losses, doc_ids=batch["doc_ids"],
                                      positions=batch["positions"], **self.model_kwargs(), **extra)
        return self._sum(losses, len(batch["tokens"]))

    def _sum(self, losses: list[torch.Tensor], rows: int) -> torch.Tensor:
        """The micro-batch losses of the last stage; zero on the other stages (with `per_row`: the
        rows' losses in order)."""
        if self.per_row:
            return torch.cat(losses) if self.has_last_stage else torch.zeros(rows, device=self.device)
        if not self.has_last_stage:
            return torch.zeros((), device=self.device)
        return torch.stack([_local(loss.detach()) for loss in losses]).sum()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss computed under loss parallel is a replicated DTensor; the loop keeps plain tensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def build_step(engine: Engine, layout: StepLayout, objective: Objective, pp: int, schedule_name: str,
               stage_ids: list[int], n_stages: int, pp_mesh, loss_chunk: int = 0) -> StepStrategy:
    """The pipeline schedule when pp > 1, else micro-batch accumulation."""
    if pp > 1:
        return PipelineStep(engine, layout, objective, schedule_name, stage_ids, n_stages, pp_mesh, loss_chunk)
    return MicroBatchStep(engine, layout, objective, loss_chunk)
