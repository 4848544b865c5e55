"""DDP: every data-parallel and context-parallel rank (dp_replicate x dp_shard x cp) holds a full
replica; gradients are all-reduced in buckets during the last micro-batch's backward."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from dist_llama.parallel.data import apply_ddp
from dist_llama.parallel.dims import Meshes
from dist_llama.train.engines.base import LocalEngine


class DDPEngine(LocalEngine):
    def __init__(self, meshes: Meshes, device: torch.device, dtype: torch.dtype, grad_clip: float):
        super().__init__(dtype, grad_clip, pp_group=None)  # DDP composes with data/context parallel only
        self.meshes, self.device = meshes, device
        self.replica_group = meshes.dp_cp.get_group()  # every replica holds the same full model

    def wrap(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        (part,) = parts
        super().wrap([apply_ddp(part, self.meshes, self.device)], optimizers)

    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        return contextlib.nullcontext() if last_micro_batch else part.no_sync()
