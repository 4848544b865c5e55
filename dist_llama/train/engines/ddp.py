"""DDP: every data-parallel and context-parallel rank (dp_replicate x dp_shard x cp) holds a full
replica; gradients are all-reduced in buckets during the last micro-batch's backward.

The all-reduce is DDP's default (average, then sum), through a comm hook that first tells the
compute clock the rank's own work may end here: the last bucket to become ready marks the end of
its backward, and DDP waits for the all-reduces only after that (train/compute_clock.py)."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dist_llama.parallel.data import apply_ddp
from dist_llama.parallel.dims import Meshes
from dist_llama.train.compute_clock import ComputeClock, Unmeasured
from dist_llama.train.engines.base import LocalEngine


class DDPEngine(LocalEngine):
    def __init__(self, meshes: Meshes, device: torch.device, dtype: torch.dtype, grad_clip: float):
        super().__init__(dtype, grad_clip, pp_group=None)  # DDP composes with data/context parallel only
        self.meshes, self.device = meshes, device
        self.replica_group = meshes.dp_cp.get_group()  # every replica holds the same full model
        self.compute_clock = (Unmeasured("DDP with cp > 1: context parallel all-gathers inside attention are not timed")
                              if meshes.world["cp"].size() > 1 else ComputeClock(device))

    def wrap(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        wrapped = []
        for part in parts:  # the model; a second one trains beside it under PPO (its value model)
            ddp = apply_ddp(part, self.meshes, self.device)
            ddp.register_comm_hook((self.compute_clock, self.replica_group), _timed_allreduce)
            wrapped.append(ddp)
        super().wrap(wrapped, optimizers)

    def unwrapped(self, part: nn.Module) -> nn.Module:
        return part.module

    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        return contextlib.nullcontext() if last_micro_batch else part.no_sync()


def _timed_allreduce(state, bucket):
    clock, group = state
    clock.work_done()
    return allreduce_hook(group, bucket)
