"""Dry run of one rank of a huge job: the real model and the real parallelize code (pipeline
split, TP/SP, CP, AC, FSDP) on the meta device over a fake process group of the full world size.
Nothing is allocated or communicated; what it yields is this rank's exact shard shapes."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor

from dist_llama.config import Config, micro_batches


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _padded_local_numel(p: torch.Tensor) -> int:
    """What a rank allocates: sharded dims are cut in ceil-sized chunks, and FSDP2 pads every
    rank's shard to that size (the last ranks of an uneven dim hold less data, not less memory)."""
    if not isinstance(p, DTensor):
        return p.numel()
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(p.placements):
        if hasattr(placement, "dim"):  # Shard and _StridedShard
            shape[placement.dim] = -(-shape[placement.dim] // p.device_mesh.size(mesh_dim))
    return math.prod(shape)


def dry_run(cfg: Config, world_size: int, rank: int) -> dict:
    """This rank's parameter count and bytes of fp32 parameters, gradients and AdamW states, from
    the real build of its model parts. Initialises the (process-global) fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dist_llama.parallel.dims import ParallelDims
    from dist_llama.train.build import build_model_parts
    from dist_llama.train.engines import build_engine

    t0 = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dims = ParallelDims.from_config(cfg.parallel)
        meshes = dims.build_mesh("cpu")
        # Built "on" the meta device: the CPU code path (build, then split and shard) without memory.
        meta = torch.device("meta")
        n_micro = micro_batches(cfg.train.global_batch_size // dims.dp, cfg.train.micro_batch_size, dims.pp)
        engine = build_engine(cfg, dims, meshes, meta, torch.float32, n_micro)
        parts, stage_ids, _ = build_model_parts(cfg, dims, meshes, meta, engine)
        params = sum(_local_numel(p) for part in parts for p in part.parameters())
        padded = sum(_padded_local_numel(p) for part in parts for p in part.parameters())
        blocks = [block for part in parts for block in part.layers.values()]
        recomputed = sum(isinstance(block, CheckpointWrapper) for block in blocks)
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "world_size": world_size, "stage_ids": stage_ids, "params_local": params,
            "params_allocated": padded, "param_bytes_fp32": 4 * padded, "grad_bytes_fp32": 4 * padded,
            "adam_bytes_fp32": 8 * padded, "blocks": len(blocks), "recomputed_blocks": recomputed,
            "seconds": time.perf_counter() - t0}
