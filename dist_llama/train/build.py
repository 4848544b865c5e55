"""Build everything the training loop needs from a validated config.

Parallelism is applied from outside the model, one fixed order for every layout: pipeline split →
float8 linear layers (train.float8) → tensor/sequence parallel → context parallel → activation
checkpointing → torch.compile (all in dist_llama.parallel.apply) → the engine's sharding
(FSDP2/HSDP) → weight init on the meta-device path → the engine's wrapper (DDP, DeepSpeed). The
split comes first so each stage is parallelised as a whole model of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from dist_llama.config import EXIT_CONFIG, Config, micro_batches, save_resolved
from dist_llama.config.data_plan import anneal_start_step
from dist_llama.config.engines import engine_facts
from dist_llama.faults import FaultInjector
from dist_llama.model import Transformer
from dist_llama.model.flops import H100_BF16_PEAK, flops_per_token, measure_cpu_peak_flops
from dist_llama.parallel.apply import parallelize
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.parallel.env import DistEnv
from dist_llama.parallel.loss import loss_chunk_tokens
from dist_llama.parallel.pipeline import layers_per_stage, split_model, stage_ids_for_rank
from dist_llama.train.callbacks import Faults, HangReport, RecordLog, ReplicaCheck, StragglerCheck, Validation
from dist_llama.train.checkpoint import Checkpointer, check_format, remove_stale_tmp
from dist_llama.train.engines import Engine, build_engine
from dist_llama.train.heartbeats import Heartbeats
from dist_llama.train.replicas import preflight
from dist_llama.train.step_health import StepHealth
from dist_llama.train.watchdog import NoWatchdog, Watchdog
from dist_llama.train.metrics import MetricsLogger
from dist_llama.train.optim import build_optimizer, build_scheduler
from dist_llama.train.objectives import BuildContext, Objective, build_objective
from dist_llama.train.objectives.base import StartContext
from dist_llama.train.profiling import StepProfiler
from dist_llama.train.recovery import EXIT_RESTART, RecoveryPolicy, TrainingExit
from dist_llama.train.step import StepStrategy, build_step, step_layout
from dist_llama.train.trainer import Trainer, TrainerParts
from dist_llama.weights import WeightsError, open_weights
from dist_llama.weights.load import load_into, new_head


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if cfg.train.compute_dtype(device.type) == "bf16" else torch.float32


def build_model_parts(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, engine: Engine,
                      init_from=None, fake_mode=None) -> tuple[list[nn.Module], list[int], int]:
    """This rank's model parts (one per pipeline stage it holds), parallelised and sharded by the
    engine but not yet wrapped; their stage ids; the stage count. `init_from`: a weight source
    (dist_llama.weights) each part then takes its values from, reading only what it holds.

    Initial weights depend only on (train.seed, parameter name), so every layout starts from the
    single-process weights on either path: with train.meta_init (the default on CUDA) the model is
    built on the meta device and each rank initialises only what it holds, after the split and the
    sharding, so no rank ever holds the full model; without it the full model is initialised on
    the device first and then split and sharded. `fake_mode` (a FakeTensorMode; meta path only):
    the planner's memory dry run: parts materialised as fake tensors in it, no values drawn.
    """
    p = cfg.parallel
    torch.manual_seed(cfg.train.seed)
    on_meta = cfg.train.uses_meta_init(device.type)
    with torch.device("meta" if on_meta else device):
        model = Transformer(cfg.model)
    if not on_meta:
        model.init_weights(cfg.train.seed)
    n_stages = dims.pp * p.pp_virtual_stages
    if dims.pp > 1:
        counts = layers_per_stage(cfg.model.n_layers, n_stages, p.pp_lighter_ends, p.pp_layers_per_stage)
        stage_ids = stage_ids_for_rank(meshes.world["pp"].get_local_rank(), dims.pp, p.pp_virtual_stages)
        parts = split_model(model, stage_ids, counts)
    else:
        parts, stage_ids = [model], [0]
    use_compile = cfg.train.compile if cfg.train.compile is not None else (
        device.type == "cuda" and engine_facts(p).compile_default_cuda)
    blocks_before = 0
    for part in parts:
        parallelize(part, dims, meshes, p, use_compile, cfg.train.float8, first_block=blocks_before)
        blocks_before += len(part.layers)
        engine.shard(part)
        if on_meta:
            if fake_mode is not None:
                with fake_mode:
                    part.to_empty(device=device)
                    part.init_buffers(device)
                continue
            part.to_empty(device=device)
            with torch.no_grad():
                part.init_weights(cfg.train.seed, buffer_device=device)
    if init_from is not None:
        _load_initial(parts, init_from)
    return parts, stage_ids, n_stages


def _load_initial(parts: list[nn.Module], source) -> None:
    """Every part takes its values from `source`. A rank that read a non-finite value makes every
    rank stop with exit 2 naming the file and tensor (each rank checks only what it read)."""
    problem = None
    try:
        for part in parts:
            load_into(part, source)
    except WeightsError as exc:
        problem = str(exc)
    problems = [problem]
    if dist.is_initialized():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise TrainingExit(EXIT_CONFIG, f"checkpoint.init_from: {first}")


def starting_model(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, engine: Engine,
                   fake_mode=None) -> nn.Module:
    """A copy of the starting weights, also when resuming (they are not in the checkpoint):
    init_from, or the seed's initialisation; built and sharded like the policy."""
    ck = cfg.checkpoint
    start = open_weights(ck.init_from, max_seq_len=cfg.model.max_seq_len) if ck.init_from and fake_mode is None else None
    (model,), _, _ = build_model_parts(cfg, dims, meshes, device, engine, start, fake_mode)
    return model


def model_like_policy(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, engine: Engine,
                      init_from: str, fake_mode=None, **model_args) -> nn.Module:
    """A model built and sharded like the policy, with ModelArgs fields `model_args` changed, from
    the weights at `init_from` (empty: the seed's initialisation)."""
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_args),
                                checkpoint=dataclasses.replace(cfg.checkpoint, init_from=init_from or None))
    return starting_model(other, dims, meshes, device, engine, fake_mode)


def _chunk_tokens(cfg: Config, tp: int) -> int:
    return loss_chunk_tokens(cfg.train.loss_chunk_tokens, engine_facts(cfg.parallel).output_whole_after_forward,
                             cfg.model.vocab_size, tp)


def build_engine_and_step(cfg: Config, dims: ParallelDims, meshes: Meshes, device: torch.device, dtype: torch.dtype,
                          objective: Objective, init_from=None, fake_mode=None) -> tuple[Engine, StepStrategy]:
    """The engine holding this rank's model parts and optimizers, and the step strategy that runs
    them with the objective's loss: what one training step needs (the trainer, and the planner's
    memory dry run of a step)."""
    n_micro = micro_batches(cfg.train.global_batch_size // dims.dp, cfg.train.micro_batch_size, dims.pp)
    engine = build_engine(cfg, dims, meshes, device, dtype, n_micro)
    # Before the policy: its build then re-seeds as always.
    objective.build_extra(BuildContext(
        device, lambda: starting_model(cfg, dims, meshes, device, engine, fake_mode), fake_mode,
        lambda path, **args: model_like_policy(cfg, dims, meshes, device, engine, path, fake_mode, **args)))
    parts, stage_ids, n_stages = build_model_parts(cfg, dims, meshes, device, engine, init_from, fake_mode)
    trained = objective.trained_parts()
    engine.wrap(parts + [m for m, _ in trained],
                [build_optimizer(part, cfg.optim) for part in parts] + [build_optimizer(m, o) for m, o in trained])
    if cfg.train.float8:
        from dist_llama.parallel.float8 import float8_all_gather, precompute_scales_after_step

        if float8_all_gather(engine_facts(cfg.parallel), dims):
            for part, optimizer in zip(engine.parts, engine.optimizers):
                precompute_scales_after_step(part, optimizer)
    layout = step_layout(device, dims, meshes, n_micro, cfg.train.micro_batch_size)
    pp_mesh = meshes.world["pp"] if dims.pp > 1 else None
    step = build_step(engine, layout, objective, dims.pp, cfg.parallel.pp_schedule, stage_ids, n_stages, pp_mesh,
                      _chunk_tokens(cfg, dims.tp))
    return engine, step


def build_trainer(cfg: Config, env: DistEnv, sources) -> Trainer:
    """sources: the data sources resolve_config opened (a list of dist_llama.data.loader.Source;
    the held-out ones in its `held_out`, when it has one)."""
    dims = ParallelDims.from_config(cfg.parallel)
    meshes = dims.build_mesh(env.device.type)
    run_dir = Path(cfg.train.run_dir)
    # First on a full disk: the .tmp-* an interrupted save left (the run lock is held).
    stale = remove_stale_tmp(run_dir / "checkpoints") if env.rank == 0 else []
    logger = MetricsLogger(run_dir, env.rank, cfg.train.steps, cfg.logging,
                           OmegaConf.to_container(OmegaConf.structured(cfg)))
    # When this process started (Linux /proc), for restart-time accounting in events.jsonl.
    logger.event("process_start", 0, started=os.stat(f"/proc/{os.getpid()}").st_mtime
                 if os.path.exists(f"/proc/{os.getpid()}") else None,
                 restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    for p in stale:
        logger.event("checkpoint_tmp_removed", 0, path=str(p), reason="incomplete save from an earlier process")
    h, ck = cfg.health, cfg.checkpoint
    faults = FaultInjector.from_config(h, env.rank, run_dir, on_fire=logger.fault_fired)
    checkpointer = Checkpointer(run_dir, ck.keep_last, env.device, async_save=ck.async_save, verify=ck.verify,
                                logger=logger, faults=faults)
    # Known before the model is built: initial weights are read only when there is nothing to resume.
    resume = checkpointer.latest() if ck.enabled and ck.resume else None
    if resume is None and ck.enabled and ck.resume and checkpointer.has_checkpoints():
        # Every checkpoint failed the deep check (the cheap one passed at start): never overwrite them.
        raise TrainingExit(EXIT_CONFIG, f"{run_dir / 'checkpoints'} holds checkpoints and none is valid (see "
                           "checkpoint_skipped in events.jsonl); move them away to start over")
    init_from = None
    if ck.init_from and resume is not None:
        logger.event("init_from_ignored", 0, init_from=ck.init_from, resume=str(resume),
                     reason="the run directory has a checkpoint of its own: resuming it")
    elif ck.init_from:
        init_from = open_weights(ck.init_from, max_seq_len=cfg.model.max_seq_len)

    objective = build_objective(cfg)
    engine, step = build_engine_and_step(cfg, dims, meshes, env.device, compute_dtype(cfg, env.device), objective,
                                         init_from)
    if resume is not None:
        check_format(resume, engine.format)
    if env.rank == 0:  # the run record, once the start is known to fit the directory's checkpoints
        save_resolved(cfg, run_dir)
    if init_from is not None:
        logger.event("init_from", 0, path=str(init_from.path), source=init_from.kind)
        if new_head(init_from, cfg.model):
            logger.event("score_head_initialised", 0, path=str(init_from.path),
                         reason="a language model has no score head: the reward head starts from train.seed, "
                                "every other weight is loaded")
    schedulers = [build_scheduler(o, cfg.optim, cfg.train.steps, anneal_start_step(cfg)) for o in engine.optimizers]
    loader = objective.loader(sources, dp_rank=meshes.dp.get_local_rank(), dp_size=dims.dp)
    objective.start(StartContext(step, loader, run_dir, env.rank, logger, resumed=resume is not None,
                                 build_starting_model=lambda: starting_model(cfg, dims, meshes, env.device, engine)))
    evaluator = objective.evaluator(list(getattr(sources, "held_out", ())), meshes.dp.get_local_rank(), dims.dp,
                                    env.device)
    if cfg.train.peak_flops is not None:
        peak = cfg.train.peak_flops
    elif env.device.type == "cuda":
        peak = H100_BF16_PEAK
    else:
        peak = measure_cpu_peak_flops()
    if h.preflight:
        # Under Slurm the batch script leaves out the nodes named here when it resubmits the job.
        preflight(env.device, run_dir / "slurm" / "bad_nodes" if os.environ.get("SLURM_JOB_ID") else None)
    watchdog = NoWatchdog()
    if h.hang_timeout_s > 0:
        watchdog = Watchdog(h.hang_timeout_s, run_dir / "hangs", env.rank,
                            on_hang=lambda: _exit_on_hang(logger, watchdog),
                            heartbeats=Heartbeats(run_dir / "hangs", env.rank, env.world_size))
    # In order: validation adds to a step's record before RecordLog logs it; findings come after.
    callbacks = [HangReport(logger), Faults(faults, engine.parts), Validation(evaluator, step, watchdog),
                 RecordLog(logger, cfg.train.log_interval, cfg.train.steps)]
    t = cfg.train
    if t.downstream_eval_interval:  # its scores join the record before RecordLog logs it
        from dist_llama.data import build_tokenizer
        from dist_llama.train.downstream import Downstream

        callbacks.insert(3, Downstream(t, step, build_tokenizer(cfg.data.tokenizer), env.device, watchdog))
    if t.profile_steps or t.memory_snapshot_step is not None or t.memory_snapshot_on_oom:
        callbacks.append(StepProfiler(logger, run_dir, env.rank, env.device, t.profile_steps,
                                      t.memory_snapshot_step, t.memory_snapshot_on_oom))
    if h.straggler_interval:
        callbacks.append(StragglerCheck(h.straggler_interval, h.straggler_factor, engine.compute_clock, watchdog,
                                        logger))
    if h.sdc_interval and engine.replica_group is not None:
        callbacks.append(ReplicaCheck(h.sdc_interval, engine.replica_group, engine.parts, env.device, watchdog))
    elif h.sdc_interval:
        logger.event("sdc_check_inactive", 0, reason="no data-parallel replicas hold identical parameters "
                     "in this layout (pure FSDP, ZeRO-3); use HSDP, DDP or ZeRO-1/2 to compare replicas")
    return Trainer(TrainerParts(
        cfg=cfg, device=env.device, engine=engine, step=step, schedulers=schedulers, loader=loader,
        checkpointer=checkpointer, logger=logger, health=StepHealth(h), policy=RecoveryPolicy(h), faults=faults,
        watchdog=watchdog, callbacks=callbacks, flops_per_token=functools.partial(flops_per_token, cfg.model),
        peak_flops=peak, world_size=env.world_size, layout=dataclasses.asdict(dims), resume=resume))


def _exit_on_hang(logger, watchdog) -> None:
    """Called from the watchdog thread after it dumped every thread's stack: no cleanup is safe
    while the main thread is stuck in a collective, so leave at once for the launcher to restart."""
    _, step, phase = watchdog.history()[-1]
    named = {"suspects": watchdog.report["suspects"], "suspect_reason": watchdog.report["reason"],
             "ranks": watchdog.report["ranks"]} if watchdog.report is not None else {}
    logger.event("hang_detected", step, last_phase=phase, timeout_s=watchdog.timeout_s,
                 dump=str(watchdog.dump_path), action="restart", all_ranks=True, **named)
    os._exit(EXIT_RESTART)
