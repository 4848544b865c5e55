"""The interface of data-parallel engines; and LocalEngine for a model with no data parallelism (one
rank, or tensor / pipeline parallel only), which FSDP and DDP build on.

An engine owns what differs between data-parallel implementations: how model parts are sharded or
wrapped, gradient synchronisation per micro-batch, backward, the global gradient norm, the update,
dropping a step, its checkpoint state, the replicas the corruption check compares, whether
autocast or the engine itself handles the compute dtype, and the clock that times this rank's own
compute without the time it waits for others in the engine's collectives (train/compute_clock.py). The loop and the step strategies call only
this interface; adding an engine means adding one module, one row in config/engines.py, one line in
ENGINE_CLASSES (engines/__init__.py) and its costs in plan/engine_costs.py.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, ContextManager, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager

from dist_llama.train.checkpoint_dcp import DCPState
from dist_llama.checkpoint_format.integrity import Digests
from dist_llama.train.compute_clock import ComputeClock, Unmeasured
from dist_llama.train.optim import clip_grads_with_norm_, global_grad_norm


class Engine(Protocol):
    """One data-parallel implementation, built in two phases around weight initialisation: `shard`
    each model part (where parallelisms are applied, before init), then `wrap` the initialised
    parts with their optimizers. Then, per step: grad_sync / backward per micro-batch, grad_norm,
    and step or discard."""

    parts: list[nn.Module]
    """What the step strategies call: the model parts as the engine wrapped them."""
    optimizers: list[torch.optim.Optimizer]
    """Torch optimizers, one per part (the LR schedulers step them)."""
    autocast_dtype: Optional[torch.dtype]
    """The dtype to autocast forward to, or None when the engine casts weights itself (or fp32)."""
    replica_group: Optional[dist.ProcessGroup]
    """Ranks whose local parameters must be byte-identical to this rank's (corruption check), or None."""
    format: str
    """The checkpoint state format, recorded in the manifest."""
    required: tuple[str, ...]
    """Files a checkpoint of this format cannot be valid without."""
    compute_clock: ComputeClock
    """Around forward/backward (`window()`): this rank's own compute time, without its waits in
    collectives (the straggler check's input); `unmeasured` says why a layout has none."""

    def shard(self, part: nn.Module) -> None: ...
    def wrap(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None: ...
    def unwrapped(self, part: nn.Module) -> nn.Module:
        """The model part inside what `wrap` made of it (DDP's and DeepSpeed's .module)."""
    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        """Around one micro-batch's forward and backward: where the engine reduces gradients only after
        the last one (DDP; FSDP with parallel.reduce_every_micro_batch=false), the others run without it."""
    def backward(self, loss: torch.Tensor) -> None: ...
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of this step's gradients over all ranks, before clipping. Collective."""
    def step(self) -> None:
        """Clip to that norm, update, release the gradients."""
    def discard(self) -> None:
        """Drop this step's gradients without an update (skip, retry, rollback)."""
    def poison_gradients(self) -> None:
        """Make this step's gradients NaN where the engine keeps them (fault drills)."""
    def save(self, directory: Path, on_written: Callable[[Digests], None], group,
             stager: Optional[DefaultStager]) -> Future:
        """Write this rank's model and optimizer state (train.checkpoint.CheckpointState)."""
    def load(self, directory: Path, manifest: dict) -> None: ...


class LocalEngine:
    """No data parallelism: gradients stay where backward leaves them (`.grad`, DTensors under TP).
    Pipeline stages hold disjoint parameters, so the norm adds up over the pp group. Its compute
    clock is given: one rank has nothing to wait for, while tensor or pipeline parallel ranks wait
    inside the model or the schedule, where no clock sees it."""

    format = DCPState.format
    required = DCPState.required

    def __init__(self, dtype: torch.dtype, grad_clip: float, pp_group: Optional[dist.ProcessGroup],
                 compute_clock: Optional[ComputeClock] = None):
        self.compute_clock = compute_clock or Unmeasured("tensor or pipeline parallel without data parallelism: "
                                                         "their collectives are inside the model or the schedule")
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        self.grad_clip = grad_clip
        self.pp_group = pp_group
        self.replica_group: Optional[dist.ProcessGroup] = None
        self.parts: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self._params: list[nn.Parameter] = []
        self._norm: Optional[torch.Tensor] = None

    def shard(self, part: nn.Module) -> None:
        pass

    def wrap(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.parts, self.optimizers = parts, optimizers
        self._params = [q for part in parts for q in part.parameters() if q.requires_grad]

    def unwrapped(self, part: nn.Module) -> nn.Module:
        return part

    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        self._norm = global_grad_norm(self._params, self.pp_group)
        return self._norm

    def step(self) -> None:
        if self.grad_clip > 0:
            clip_grads_with_norm_(self._params, self.grad_clip, self._norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def poison_gradients(self) -> None:
        next(q for q in self._params if q.grad is not None).grad.mul_(float("nan"))

    def save(self, directory: Path, on_written: Callable[[Digests], None], group,
             stager: Optional[DefaultStager]) -> Future:
        return DCPState(self.parts, self.optimizers).save(directory, on_written, group, stager)

    def load(self, directory: Path, manifest: dict) -> None:
        DCPState(self.parts, self.optimizers).load(directory, manifest)
