"""Data-parallel engines behind one interface (base.Engine): FSDP2/HSDP (fsdp.py), DDP (ddp.py),
DeepSpeed ZeRO (zero.py), and no data parallelism at all (base.LocalEngine)."""

from __future__ import annotations

import torch

from dist_llama.config import Config
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.train.compute_clock import ComputeClock
from dist_llama.train.engines.base import Engine, LocalEngine
from dist_llama.train.engines.ddp import DDPEngine
from dist_llama.train.engines.fsdp import FSDPEngine
from dist_llama.train.engines.zero import ZeroEngine, ds_config

__all__ = ["Engine", "LocalEngine", "FSDPEngine", "DDPEngine", "ZeroEngine", "build_engine"]


def _local(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, dtype: torch.dtype) -> Engine:
    alone = dims.tp == 1 and dims.pp == 1  # nothing to wait for
    return LocalEngine(dtype, cfg.optim.grad_clip, meshes.pp_group, ComputeClock(device) if alone else None)


def _fsdp(cfg, dims, meshes, device, dtype, n_micro) -> Engine:
    if not dims.data_parallel:
        return _local(cfg, dims, meshes, device, dtype)
    return FSDPEngine(dims, meshes, dtype, cfg.optim.grad_clip, cfg.parallel.reshard_after_forward,
                      cfg.parallel.reduce_every_micro_batch)


def _ddp(cfg, dims, meshes, device, dtype, n_micro) -> Engine:
    if not dims.data_parallel:
        return _local(cfg, dims, meshes, device, dtype)
    return DDPEngine(meshes, device, dtype, cfg.optim.grad_clip)


def _deepspeed(cfg, dims, meshes, device, dtype, n_micro) -> Engine:
    return ZeroEngine(ds_config(cfg, dims.dp, n_micro, dtype), dims, meshes, device)


ENGINE_CLASSES = {"fsdp": _fsdp, "ddp": _ddp, "deepspeed": _deepspeed}
"""parallel.engine → what builds it; without data parallelism (dp x cp = 1) FSDP and DDP have
nothing to do, and the model trains as it is (LocalEngine)."""


def build_engine(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, dtype: torch.dtype,
                 n_micro: int) -> Engine:
    """The engine parallel.engine names (ENGINE_CLASSES)."""
    return ENGINE_CLASSES[cfg.parallel.engine](cfg, dims, meshes, device, dtype, n_micro)
