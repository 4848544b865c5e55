"""FSDP2 (`fully_shard`) over dp_shard x cp, or HSDP over (dp_replicate, dp_shard x cp): the
default engine. Parameters, gradients and optimizer states are sharded; the mixed-precision policy
casts weights to the compute dtype, so no autocast is needed.

By default gradients are reduce-scattered after every micro-batch and accumulate in the fp32
shards (as in torchtitan and DeepSpeed ZeRO-2/3). `parallel.reduce_every_micro_batch=false` defers
the reduction to the last micro-batch, as Megatron's distributed optimizer does: one reduce-scatter
per step instead of one per micro-batch, for an unsharded fp32 gradient of every weight the rank
computes with held across the micro-batches (Llama 3 70B on FSDP-64: 263 GiB per rank, against
4.1 GiB sharded). (Under pipeline parallelism torch's stages defer it themselves; the planner
counts both.)

The engine's all-gathers and reduce-scatters go through `_TimedAllGather` / `_TimedReduceScatter`, so
its compute clock knows how long this rank was blocked in them (train/compute_clock.py)."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from dist_llama.parallel.data import apply_fsdp
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.train.compute_clock import ComputeClock, Unmeasured
from dist_llama.train.engines.base import LocalEngine


def _unmeasured_reason(dims: ParallelDims, device_type: str):
    """Why this FSDP layout has collectives its comm objects do not see, or None."""
    if device_type == "cuda":
        return "FSDP on CUDA: the compute stream waits for all-gathers inside FSDP, where no event can be put"
    others = {"tp": dims.tp, "cp": dims.cp, "pp": dims.pp, "dp_replicate": dims.dp_replicate}
    named = [f"{k}={v}" for k, v in others.items() if v > 1]
    if named:
        return (f"FSDP with {', '.join(named)}: tensor/context/pipeline parallel and HSDP's replica all-reduce "
                "are collectives the engine does not time")
    return None


class FSDPEngine(LocalEngine):
    def __init__(self, dims: ParallelDims, meshes: Meshes, dtype: torch.dtype, grad_clip: float,
                 reshard_after_forward: bool, reduce_every_micro_batch: bool = True):
        super().__init__(dtype, grad_clip, meshes.pp_group)
        self.autocast_dtype = None  # FSDP's mixed-precision policy casts the weights instead
        self.dims, self.meshes, self.dtype = dims, meshes, dtype
        self.reshard_after_forward = reshard_after_forward
        self.reduce_every_micro_batch = reduce_every_micro_batch
        # HSDP: the ranks along dp_replicate hold the same shard (same pp stage, tp slice, shard
        # index); plain FSDP has no two ranks holding the same parameters.
        self.replica_group = meshes.world["dp_replicate"].get_group() if dims.dp_replicate > 1 else None
        reason = _unmeasured_reason(dims, meshes.world.device_type)
        self.compute_clock = Unmeasured(reason) if reason else ComputeClock(torch.device(meshes.world.device_type))

    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        part.set_requires_gradient_sync(self.reduce_every_micro_batch or last_micro_batch)
        return contextlib.nullcontext()

    def shard(self, part: nn.Module) -> None:
        apply_fsdp(part, self.dims, self.meshes, param_dtype=self.dtype,
                   reshard_after_forward=self.reshard_after_forward)
        if self.compute_clock.unmeasured is None:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.set_custom_all_gather(_TimedAllGather(self.compute_clock))
                    module.set_custom_reduce_scatter(_TimedReduceScatter(self.compute_clock))


class _TimedAllGather(AllGather):
    """FSDP's all-gather, synchronous and timed as blocked. Synchronous because the wait of an
    asynchronous one happens inside FSDP; on CPU FSDP asks for synchronous ones anyway (its
    default, unshard_async_op=False), so nothing changes there."""

    def __init__(self, clock: ComputeClock):
        self.clock = clock

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        with self.clock.blocked():
            dist.all_gather_single(output_tensor, input_tensor, group=group)
        return None  # done: FSDP then skips its wait


class _TimedReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter (always called synchronously), timed as blocked."""

    def __init__(self, clock: ComputeClock):
        self.clock = clock

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        with self.clock.blocked():
            dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group)
        return None
