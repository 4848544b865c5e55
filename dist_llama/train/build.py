"""Build everything the training loop needs from a validated config.

Parallelism is applied from outside the model, one fixed order for every layout:
pipeline split → tensor/sequence parallel → context parallel → activation checkpointing →
torch.compile → FSDP2/HSDP → (meta-device init) → DDP. The split comes first so each stage is
parallelised as a whole model of its own.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from dist_llama.config import Config, micro_batches, save_resolved
from dist_llama.data import PackedLoader
from dist_llama.model import Transformer
from dist_llama.model.flops import H100_BF16_PEAK, flops_per_token, measure_cpu_peak_flops
from dist_llama.parallel.context import apply_cp
from dist_llama.parallel.data import apply_ac, apply_compile, apply_ddp, apply_fsdp
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.parallel.env import DistEnv
from dist_llama.parallel.pipeline import (build_schedule, build_stages, layers_per_stage, split_model,
                                          stage_ids_for_rank)
from dist_llama.parallel.tensor import apply_tp, token_loss_sum
from dist_llama.parallel.zero import ZeroEngine, ds_config
from dist_llama.faults import FaultInjector
from dist_llama.train.checkpoint import Checkpointer
from dist_llama.train.health import StepHealth, Watchdog, preflight, replica_groups
from dist_llama.train.metrics import MetricsLogger
from dist_llama.train.optim import build_optimizer, build_scheduler
from dist_llama.train.recovery import EXIT_RESTART, RecoveryPolicy
from dist_llama.train.trainer import Trainer, TrainerParts


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def uses_fsdp(cfg: Config, dims: ParallelDims) -> bool:
    return cfg.parallel.engine == "fsdp" and dims.dp * dims.cp > 1


def build_model_parts(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device,
                      dtype: torch.dtype) -> tuple[list[nn.Module], list[int], int]:
    """This rank's model parts (one per pipeline stage it holds), their stage ids, the stage count.

    Weights are identical for every layout of the same seed. On CPU the full model is initialised
    before anything is split or sharded, so any layout starts from exactly the single-process
    weights (what the layout tests compare against). On CUDA the model is built on the meta device
    and initialised after sharding, so no rank ever holds the full model.
    """
    p = cfg.parallel
    torch.manual_seed(cfg.train.seed)
    on_meta = device.type == "cuda"
    with torch.device("meta" if on_meta else device):
        model = Transformer(cfg.model)
    if not on_meta:
        model.init_weights()
    n_stages = dims.pp * p.pp_virtual_stages
    if dims.pp > 1:
        counts = layers_per_stage(cfg.model.n_layers, n_stages, p.pp_lighter_ends, p.pp_layers_per_stage)
        stage_ids = stage_ids_for_rank(meshes.world["pp"].get_local_rank(), dims.pp, p.pp_virtual_stages)
        parts = split_model(model, stage_ids, counts)
    else:
        parts, stage_ids = [model], [0]
    # Off by default under DeepSpeed: ZeRO-3 gathers parameters in module hooks that per-block
    # compiled graphs would have to trace through (DeepSpeed compiles with its own engine.compile()).
    use_compile = cfg.train.compile if cfg.train.compile is not None else (device.type == "cuda"
                                                                           and p.engine != "deepspeed")
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, meshes.world["tp"], loss_parallel=True)
        if dims.cp > 1:
            apply_cp(part, meshes.world["cp"])
        if p.ac != "none":
            apply_ac(part, p.ac, p.ac_every)
        if use_compile:
            apply_compile(part)
        if uses_fsdp(cfg, dims):
            apply_fsdp(part, dims, meshes, param_dtype=dtype, reshard_after_forward=p.reshard_after_forward)
        if on_meta:
            part.to_empty(device=device)
            with torch.no_grad():
                part.init_weights(buffer_device=device)
    if p.engine == "ddp" and dims.dp * dims.cp > 1:
        parts = [apply_ddp(parts[0], meshes, device)]
    return parts, stage_ids, n_stages


def build_trainer(cfg: Config, env: DistEnv, dataset) -> Trainer:
    dims = ParallelDims.from_config(cfg.parallel)
    meshes = dims.build_mesh(env.device.type)
    dtype = compute_dtype(cfg, env.device)
    run_dir = Path(cfg.train.run_dir)
    if env.rank == 0:
        save_resolved(cfg, run_dir)
    parts, stage_ids, n_stages = build_model_parts(cfg, dims, meshes, env.device, dtype)
    optimizers = [build_optimizer(part, cfg.optim) for part in parts]
    n_micro = micro_batches(cfg.train.global_batch_size // dims.dp, cfg.train.micro_batch_size, dims.pp)
    zero = None
    if cfg.parallel.engine == "deepspeed":  # DeepSpeed wraps the model and drives the torch optimizer
        zero = ZeroEngine(parts[0], optimizers[0], ds_config(cfg, dims.dp, n_micro, dtype), env.device)
        parts = [zero.engine]
    schedulers = [build_scheduler(o, cfg.optim, cfg.train.steps) for o in optimizers]
    loader = PackedLoader(dataset, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                          dp_rank=meshes.dp.get_local_rank(), dp_size=dims.dp, seed=cfg.train.seed,
                          reset_positions=cfg.data.reset_positions)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    # Gradients are averaged over the dp x cp ranks; scaling every token's loss by this makes the
    # result the mean over the global batch, for any layout and micro-batching.
    loss_scale = dims.dp * dims.cp / tokens_per_step
    schedule = None
    if dims.pp > 1:
        stages = build_stages(parts, stage_ids, n_stages, meshes.world["pp"], env.device)
        schedule = build_schedule(cfg.parallel.pp_schedule, stages, n_micro,
                                  lambda logits, labels: token_loss_sum(logits, labels) * loss_scale)
    if cfg.train.peak_flops is not None:
        peak = cfg.train.peak_flops
    elif env.device.type == "cuda":
        peak = H100_BF16_PEAK
    else:
        peak = measure_cpu_peak_flops()
    logger = MetricsLogger(run_dir, env.rank, cfg.train.steps, cfg.logging,
                           OmegaConf.to_container(OmegaConf.structured(cfg)))
    # When this process started (Linux /proc), for restart-time accounting in events.jsonl.
    logger.event("process_start", 0, started=os.stat(f"/proc/{os.getpid()}").st_mtime
                 if os.path.exists(f"/proc/{os.getpid()}") else None,
                 restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    faults = FaultInjector.from_config(cfg.health, env.rank, run_dir, on_fire=logger.fault_fired)
    if cfg.health.preflight:
        preflight(env.device)
    watchdog = None
    if cfg.health.hang_timeout_s > 0:
        watchdog = Watchdog(cfg.health.hang_timeout_s, run_dir / "hangs", env.rank,
                            on_hang=lambda: _exit_on_hang(logger, watchdog))
    replica_group = (replica_groups(meshes, dims, cfg.parallel.engine, cfg.parallel.zero_stage)
                     if cfg.health.sdc_interval else None)
    if cfg.health.sdc_interval and replica_group is None:
        logger.event("sdc_check_inactive", 0, reason="no data-parallel replicas hold identical parameters "
                     "in this layout (pure FSDP, ZeRO-3); use HSDP, DDP or ZeRO-1/2 to compare replicas")
    parts_ = TrainerParts(
        cfg=cfg, device=env.device, model_parts=parts, optimizers=optimizers, schedulers=schedulers,
        loader=loader, logger=logger,
        checkpointer=Checkpointer(run_dir, cfg.checkpoint.keep_last, env.device, async_save=cfg.checkpoint.async_save,
                                  verify=cfg.checkpoint.verify, logger=logger, faults=faults, zero=zero),
        loss_scale=loss_scale, n_micro=n_micro,
        loss_groups=[meshes.dp_cp.get_group()] + ([meshes.world["pp"].get_group()] if dims.pp > 1 else []),
        pp_group=meshes.world["pp"].get_group() if dims.pp > 1 else None,
        schedule=schedule, has_first_stage=0 in stage_ids, has_last_stage=n_stages - 1 in stage_ids,
        cp_rank=meshes.world["cp"].get_local_rank(), cp=dims.cp, tp=dims.tp,
        # FSDP's mixed-precision policy or DeepSpeed's bf16 mode cast the weights instead.
        autocast_dtype=None if (dtype == torch.float32 or uses_fsdp(cfg, dims) or zero is not None) else dtype,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len), peak_flops=peak,
        world_size=env.world_size, layout=dataclasses.asdict(dims),
        health=StepHealth(cfg.health), policy=RecoveryPolicy(cfg.health), faults=faults, watchdog=watchdog,
        replica_group=replica_group, zero=zero)
    return Trainer(parts_)


def _exit_on_hang(logger, watchdog) -> None:
    """Called from the watchdog thread after it dumped every thread's stack: no cleanup is safe
    while the main thread is stuck in a collective, so leave at once for the launcher to restart."""
    _, step, phase = watchdog.history()[-1]
    logger.event("hang_detected", step, last_phase=phase, timeout_s=watchdog.timeout_s,
                 dump=str(watchdog.dump_path), action="restart", all_ranks=True)
    os._exit(EXIT_RESTART)
