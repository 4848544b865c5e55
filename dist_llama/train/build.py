"""Build everything the training loop needs from a validated config.

Parallelism is applied from outside the model, one fixed order for every layout: pipeline split →
tensor/sequence parallel → context parallel → activation checkpointing → torch.compile (all in
dist_llama.parallel.apply) → the engine's sharding (FSDP2/HSDP) → weight init on the meta-device
path → the engine's wrapper (DDP, DeepSpeed). The split comes first so each stage is parallelised
as a whole model of its own.
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
from dist_llama.faults import FaultInjector
from dist_llama.model import Transformer
from dist_llama.model.flops import H100_BF16_PEAK, flops_per_token, measure_cpu_peak_flops
from dist_llama.parallel.apply import parallelize
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.parallel.env import DistEnv
from dist_llama.parallel.pipeline import layers_per_stage, split_model, stage_ids_for_rank
from dist_llama.train.callbacks import Faults, HangReport, ReplicaCheck, StragglerCheck
from dist_llama.train.checkpoint import Checkpointer
from dist_llama.train.engines import Engine, build_engine
from dist_llama.train.health import NoWatchdog, StepHealth, Watchdog, preflight
from dist_llama.train.metrics import MetricsLogger
from dist_llama.train.optim import build_optimizer, build_scheduler
from dist_llama.train.recovery import EXIT_RESTART, RecoveryPolicy
from dist_llama.train.step import build_step
from dist_llama.train.trainer import Trainer, TrainerParts


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if cfg.train.compute_dtype(device.type) == "bf16" else torch.float32


def build_model_parts(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device,
                      engine: Engine) -> tuple[list[nn.Module], list[int], int]:
    """This rank's model parts (one per pipeline stage it holds), parallelised and sharded by the
    engine but not yet wrapped; their stage ids; the stage count.

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
        parallelize(part, dims, meshes, p, use_compile)
        engine.shard(part)
        if on_meta:
            part.to_empty(device=device)
            with torch.no_grad():
                part.init_weights(buffer_device=device)
    return parts, stage_ids, n_stages


def build_trainer(cfg: Config, env: DistEnv, dataset) -> Trainer:
    dims = ParallelDims.from_config(cfg.parallel)
    meshes = dims.build_mesh(env.device.type)
    run_dir = Path(cfg.train.run_dir)
    if env.rank == 0:
        save_resolved(cfg, run_dir)
    n_micro = micro_batches(cfg.train.global_batch_size // dims.dp, cfg.train.micro_batch_size, dims.pp)
    engine = build_engine(cfg, dims, meshes, env.device, compute_dtype(cfg, env.device), n_micro)
    parts, stage_ids, n_stages = build_model_parts(cfg, dims, meshes, env.device, engine)
    engine.wrap(parts, [build_optimizer(part, cfg.optim) for part in parts])
    schedulers = [build_scheduler(o, cfg.optim, cfg.train.steps) for o in engine.optimizers]
    step = build_step(engine, env.device, dims, meshes, n_micro, cfg.parallel.pp_schedule, stage_ids, n_stages)
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
    # When this process started (Linux /proc), for restart-time accounting in events.jsonl.
    logger.event("process_start", 0, started=os.stat(f"/proc/{os.getpid()}").st_mtime
                 if os.path.exists(f"/proc/{os.getpid()}") else None,
                 restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    h = cfg.health
    faults = FaultInjector.from_config(h, env.rank, run_dir, on_fire=logger.fault_fired)
    if h.preflight:
        preflight(env.device)
    watchdog = NoWatchdog()
    if h.hang_timeout_s > 0:
        watchdog = Watchdog(h.hang_timeout_s, run_dir / "hangs", env.rank,
                            on_hang=lambda: _exit_on_hang(logger, watchdog))
    callbacks = [HangReport(logger), Faults(faults, engine.parts)]
    if h.straggler_interval:
        callbacks.append(StragglerCheck(h.straggler_interval, h.straggler_factor, engine.compute_clock, watchdog,
                                        logger))
    if h.sdc_interval and engine.replica_group is not None:
        callbacks.append(ReplicaCheck(h.sdc_interval, engine.replica_group, engine.parts, env.device, watchdog))
    elif h.sdc_interval:
        logger.event("sdc_check_inactive", 0, reason="no data-parallel replicas hold identical parameters "
                     "in this layout (pure FSDP, ZeRO-3); use HSDP, DDP or ZeRO-1/2 to compare replicas")
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, env.device, async_save=cfg.checkpoint.async_save,
                                verify=cfg.checkpoint.verify, logger=logger, faults=faults)
    return Trainer(TrainerParts(
        cfg=cfg, device=env.device, engine=engine, step=step, schedulers=schedulers, loader=loader,
        checkpointer=checkpointer, logger=logger, health=StepHealth(h), policy=RecoveryPolicy(h), faults=faults,
        watchdog=watchdog, callbacks=callbacks, flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops=peak, world_size=env.world_size, layout=dataclasses.asdict(dims)))


def _exit_on_hang(logger, watchdog) -> None:
    """Called from the watchdog thread after it dumped every thread's stack: no cleanup is safe
    while the main thread is stuck in a collective, so leave at once for the launcher to restart."""
    _, step, phase = watchdog.history()[-1]
    logger.event("hang_detected", step, last_phase=phase, timeout_s=watchdog.timeout_s,
                 dump=str(watchdog.dump_path), action="restart", all_ranks=True)
    os._exit(EXIT_RESTART)
