"""The one place a layout is applied to a model part (a whole model, or one pipeline stage after the
split), in a fixed order: float8 linear layers → tensor/sequence parallel (async when asked) →
context parallel → activation checkpointing → torch.compile. The data-parallel engine shards or wraps
the result next (FSDP2/HSDP per part before weights are initialised; DDP or DeepSpeed around the
initialised model): see dist_llama.train.build.build_model_parts."""

from __future__ import annotations

from torch import nn

from dist_llama.config import ParallelConfig
from dist_llama.config.engines import engine_facts
from dist_llama.parallel.context import apply_cp
from dist_llama.parallel.data import apply_ac, apply_compile
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.parallel.tensor import apply_tp, enable_async_tp


def parallelize(part: nn.Module, dims: ParallelDims, meshes: Meshes, p: ParallelConfig, compile: bool,
                float8: bool = False, first_block: int = 0) -> None:
    """`first_block`: blocks this rank's earlier parts hold (activation checkpointing counts over
    the rank's blocks)."""
    if float8:
        from dist_llama.parallel.float8 import apply_float8, float8_all_gather  # torchao only when asked for

        apply_float8(part, fsdp_all_gather=float8_all_gather(engine_facts(p), dims))
    if dims.tp > 1:
        apply_tp(part, meshes.world["tp"], loss_parallel=True)
        if p.async_tp:
            enable_async_tp()
    if dims.cp > 1:
        apply_cp(part, meshes.world["cp"])
    if p.ac != "none":
        apply_ac(part, p.ac, p.ac_every, first_block)
    if compile:
        apply_compile(part)
