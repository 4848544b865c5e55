"""FSDP2 (`fully_shard`) over dp_shard x cp, or HSDP over (dp_replicate, dp_shard x cp): the
default engine. Parameters, gradients and optimizer states are sharded; the mixed-precision policy
casts weights to the compute dtype, so no autocast is needed."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from dist_llama.parallel.data import apply_fsdp
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.train.engines.base import LocalEngine


class FSDPEngine(LocalEngine):
    def __init__(self, dims: ParallelDims, meshes: Meshes, dtype: torch.dtype, grad_clip: float,
                 reshard_after_forward: bool):
        super().__init__(dtype, grad_clip, meshes.pp_group)
        self.autocast_dtype = None  # FSDP's mixed-precision policy casts the weights instead
        self.dims, self.meshes, self.dtype = dims, meshes, dtype
        self.reshard_after_forward = reshard_after_forward
        # HSDP: the ranks along dp_replicate hold the same shard (same pp stage, tp slice, shard
        # index); plain FSDP has no two ranks holding the same parameters.
        self.replica_group = meshes.world["dp_replicate"].get_group() if dims.dp_replicate > 1 else None

    def shard(self, part: nn.Module) -> None:
        apply_fsdp(part, self.dims, self.meshes, param_dtype=self.dtype,
                   reshard_after_forward=self.reshard_after_forward)

    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        part.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()
