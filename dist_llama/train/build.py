"""Build everything the training loop needs from a validated config, in the fixed order of DESIGN.md:
model → (compile) → data parallelism → weights → optimizer, schedule, data, checkpoints, logs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from dist_llama.config import Config, save_resolved
from dist_llama.data import PackedLoader
from dist_llama.model import Transformer
from dist_llama.model.flops import H100_BF16_PEAK, flops_per_token, measure_cpu_peak_flops
from dist_llama.parallel.data import apply_compile, apply_ddp, apply_fsdp
from dist_llama.parallel.dims import ParallelDims
from dist_llama.parallel.env import DistEnv
from dist_llama.train.checkpoint import Checkpointer
from dist_llama.train.metrics import MetricsLogger
from dist_llama.train.optim import build_optimizer, build_scheduler
from dist_llama.train.trainer import Trainer, TrainerParts


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def build_model(cfg: Config, dims: ParallelDims, meshes, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Weights are identical for every layout of the same seed.

    On CPU the full model is initialised before sharding, so any layout starts from exactly the
    single-process weights (what the layout tests compare against). On CUDA the model is built on
    the meta device and initialised after sharding, so no rank ever holds the full model.
    """
    torch.manual_seed(cfg.train.seed)
    on_meta = device.type == "cuda"
    with torch.device("meta" if on_meta else device):
        model = Transformer(cfg.model)
    if not on_meta:
        model.init_weights()
    use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
    if use_compile:
        apply_compile(model)
    engine = cfg.parallel.engine
    if dims.dp > 1 and engine == "fsdp":
        apply_fsdp(model, dims, meshes, param_dtype=dtype,
                   reshard_after_forward=cfg.parallel.reshard_after_forward)
    if on_meta:
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights(buffer_device=device)
    if dims.dp > 1 and engine == "ddp":
        model = apply_ddp(model, meshes, device)
    return model


def build_trainer(cfg: Config, env: DistEnv, dataset) -> Trainer:
    dims = ParallelDims.from_config(cfg.parallel)
    meshes = dims.build_mesh(env.device.type)
    dtype = compute_dtype(cfg, env.device)
    run_dir = Path(cfg.train.run_dir)
    if env.rank == 0:
        save_resolved(cfg, run_dir)
    model = build_model(cfg, dims, meshes, env.device, dtype)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loader = PackedLoader(dataset, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                          dp_rank=meshes.dp.get_local_rank(), dp_size=dims.dp, seed=cfg.train.seed,
                          reset_positions=cfg.data.reset_positions)
    if cfg.train.peak_flops is not None:
        peak = cfg.train.peak_flops
    elif env.device.type == "cuda":
        peak = H100_BF16_PEAK
    else:
        peak = measure_cpu_peak_flops()
    logger = MetricsLogger(run_dir, env.rank, cfg.train.steps, cfg.logging,
                           OmegaConf.to_container(OmegaConf.structured(cfg)))
    is_fsdp = dims.dp > 1 and cfg.parallel.engine == "fsdp"
    parts = TrainerParts(
        cfg=cfg, device=env.device, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
        checkpointer=Checkpointer(run_dir, cfg.checkpoint.keep_last, env.device), logger=logger,
        dp_group=meshes.dp_cp.get_group(), dp_degree=dims.dp,
        autocast_dtype=None if (dtype == torch.float32 or is_fsdp) else dtype,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len), peak_flops=peak,
        world_size=env.world_size, layout=dataclasses.asdict(dims))
    return Trainer(parts)
