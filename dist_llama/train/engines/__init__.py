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


def build_engine(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, dtype: torch.dtype,
                 n_micro: int) -> Engine:
    """The engine parallel.engine names; without data parallelism (dp x cp = 1) FSDP and DDP have
    nothing to do, and the model trains as it is."""
    p, clip = cfg.parallel, cfg.optim.grad_clip
    if p.engine == "deepspeed":
        return ZeroEngine(ds_config(cfg, dims.dp, n_micro, dtype), dims, meshes, device)
    if not dims.data_parallel:
        alone = dims.tp == 1 and dims.pp == 1  # nothing to wait for
        return LocalEngine(dtype, clip, meshes.pp_group, ComputeClock(device) if alone else None)
    if p.engine == "ddp":
        return DDPEngine(meshes, device, dtype, clip)
    return FSDPEngine(dims, meshes, dtype, clip, p.reshard_after_forward)
