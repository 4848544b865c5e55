"""Validation: every combination that cannot run, rejected before any process group exists with a
ConfigError naming the key; and the layout resolution (dp_shard=-1) that needs the world size."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Optional

from dist_llama.config.data_plan import validate_data_plan
from dist_llama.config.errors import ConfigError
from dist_llama.config.engines import ENGINES, engine_facts
from dist_llama.config.fault_specs import specs_from_env, validate_specs
from dist_llama.config.names import ACTIONS, MULTI_STAGE, SCHEDULES, schedule_constraint
from dist_llama.config.objectives import objective_spec
from dist_llama.config.schema import Config, ParallelConfig
from dist_llama.model.args import ModelArgs


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _positive(cfg: Config, *keys: str) -> None:
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)
        _require(value is not None and value > 0, key, f"must be a positive number, got {value}")


def _validate_health(h, checkpoints: bool) -> None:
    """Every check's parameters, so that no setting silently turns a check off."""
    for key in ("max_retries", "max_rollbacks", "max_failures_at_step", "hang_timeout_s", "straggler_interval", "sdc_interval"):
        _require(getattr(h, key) >= 0, f"health.{key}", f"must be >= 0, got {getattr(h, key)}")
    _require(h.spike_min_history >= 2, "health.spike_min_history",
             f"must be >= 2 (a median and a spread need two values), got {h.spike_min_history}")
    # The history holds at most spike_window values: a smaller window never reaches min_history,
    # and the spike and gradient-norm z-score checks would never fire.
    _require(h.spike_window >= h.spike_min_history, "health.spike_window",
             f"must be >= health.spike_min_history={h.spike_min_history} or the spike and gradient-norm "
             f"checks never fire; got {h.spike_window}")
    _require(h.spike_zscore > 0, "health.spike_zscore", f"must be positive, got {h.spike_zscore}")
    _require(h.grad_norm_max is None or h.grad_norm_max > 0, "health.grad_norm_max",
             f"must be positive or null (z-score test only), got {h.grad_norm_max}")
    _require(0 < h.rollback_lr_scale <= 1, "health.rollback_lr_scale",
             f"must be in (0, 1] (a rollback may lower the LR, not raise it), got {h.rollback_lr_scale}")
    _require(h.straggler_factor > 1, "health.straggler_factor", f"must be above 1, got {h.straggler_factor}")
    # A replica check runs after the update: the step cannot be skipped or retried any more.
    _require(h.sdc_action in ("log", "rollback", "restart", "abort"), "health.sdc_action",
             f"must be log, rollback, restart or abort (the update is already applied); got {h.sdc_action!r}")
    for key in ("nan_action", "spike_action", "grad_norm_action", "sdc_action"):
        if getattr(h, key) == "rollback" and (key != "sdc_action" or h.sdc_interval):
            _require(checkpoints, f"health.{key}", "rollback needs checkpoints to roll back to; "
                     "set checkpoint.enabled=true or choose another action")


def validate_model(m: ModelArgs) -> None:
    _positive(Config(model=m), "model.dim", "model.n_layers", "model.n_heads", "model.multiple_of",
              "model.norm_eps", "model.rope_theta", "model.max_seq_len")
    _require(m.dim % m.n_heads == 0, "model.n_heads",
             f"must divide model.dim={m.dim}, got {m.n_heads}")
    _require((m.dim // m.n_heads) % 2 == 0, "model.n_heads",
             f"head dim model.dim/model.n_heads={m.dim // m.n_heads} must be even for RoPE")
    _require(m.kv_heads > 0 and m.n_heads % m.kv_heads == 0, "model.n_kv_heads",
             f"must be a positive divisor of model.n_heads={m.n_heads}, got {m.n_kv_heads}")
    _require(m.ffn_dim_multiplier is None or m.ffn_dim_multiplier > 0, "model.ffn_dim_multiplier",
             f"must be positive or null, got {m.ffn_dim_multiplier}")
    _require(m.vocab_size == -1 or m.vocab_size > 0, "model.vocab_size",
             f"must be positive, or -1 to take it from the tokenizer; got {m.vocab_size}")
    _require(m.attn_impl in ("auto", "sdpa", "flex"), "model.attn_impl",
             f"must be one of auto, sdpa, flex; got {m.attn_impl!r}")
    if m.use_scaled_rope:
        _require(m.rope_high_freq_factor > m.rope_low_freq_factor, "model.rope_high_freq_factor",
                 "must exceed model.rope_low_freq_factor")


def _validate_speed(cfg: Config) -> None:
    """float8 and async TP: what the config alone decides (validate_device checks the machine)."""
    t, p = cfg.train, cfg.parallel
    if p.async_tp:
        _require(t.compile is not False, "parallel.async_tp",
                 "needs train.compile (Inductor's micro-pipelining does the overlap); got train.compile=false")
        _require(t.device != "cpu", "parallel.async_tp", "needs CUDA (symmetric memory, NCCL); train.device=cpu")
    if t.float8:
        _require(t.device != "cpu", "train.float8",
                 "needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L4); train.device=cpu")
        _require(engine_facts(p).float8, "train.float8",
                 "runs under parallel.engine=fsdp or ddp (DeepSpeed manages the linear layers' weights itself)")
        _require(p.tp == 1, "train.float8",
                 f"is not combined with tensor parallelism yet (parallel.tp={p.tp}): it needs torchao's float8 TP plan")


FLOAT8_MIN_CAPABILITY = (8, 9)
"""float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards."""


def validate_device(cfg: Config, device_type: str, cuda_capability: Optional[tuple[int, int]]) -> None:
    """The rules that depend on the machine the run resolved to (train.device=auto included): float8
    needs float8 tensor cores, async TP needs CUDA. The caller finds out the device (config/ has no torch)."""
    if cfg.parallel.async_tp:
        _require(device_type == "cuda", "parallel.async_tp",
                 f"needs CUDA (symmetric memory, NCCL); this run is on {device_type}")
    if cfg.train.float8:
        _require(device_type == "cuda", "train.float8",
                 f"needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L4); this run is on {device_type}")
        _require(cuda_capability is not None and tuple(cuda_capability) >= FLOAT8_MIN_CAPABILITY, "train.float8",
                 f"needs compute capability >= 8.9 (H100, H200, L4) for float8 matmuls; this GPU has "
                 f"{'.'.join(map(str, cuda_capability or ()))}")


def resolve_parallel(p: ParallelConfig, world_size: int) -> ParallelConfig:
    """Fill dp_shard=-1 with the ranks left over, and check that the degrees multiply to the world."""
    for key in ("dp_replicate", "cp", "tp", "pp"):
        value = getattr(p, key)
        _require(value >= 1, f"parallel.{key}", f"must be >= 1, got {value}")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", f"must be >= 1 or -1 (auto), got {p.dp_shard}")
    dp_shard = p.dp_shard
    if dp_shard == -1:
        others = dataclasses.replace(p, dp_shard=1).world_size
        _require(world_size % others == 0, "parallel.dp_shard",
                 f"cannot fill: dp_replicate*cp*tp*pp={others} does not divide the world size {world_size}")
        dp_shard = world_size // others
    resolved = dataclasses.replace(p, dp_shard=dp_shard)
    _require(resolved.world_size == world_size, "parallel.dp_shard",
             f"dp_replicate*dp_shard*cp*tp*pp={resolved.world_size} must equal the world size {world_size} "
             "(set parallel.dp_shard=-1 to fill it)")
    engine = engine_facts(p)
    _require(engine is not None, "parallel.engine", f"must be {' or '.join(ENGINES)}, got {p.engine!r}")
    _require(engine.tp_pp or (p.tp == 1 and p.pp == 1), "parallel.engine",
             f"{p.engine} composes with data parallelism only (tp={p.tp}, pp={p.pp}); use engine=fsdp with tp or pp")
    _require(engine.cp_hsdp or (p.cp == 1 and p.dp_replicate == 1), "parallel.engine",
             f"{p.engine} runs plain data parallelism: needs cp=1 and dp_replicate=1 "
             f"(got cp={p.cp}, dp_replicate={p.dp_replicate}); use engine=fsdp for HSDP or CP")
    if engine.zero_stages:
        _require(p.zero_stage in engine.zero_stages, "parallel.zero_stage",
                 f"must be {', '.join(map(str, engine.zero_stages))}, got {p.zero_stage}")
    _require(not p.offload_params or engine.offload_params, "parallel.offload_params",
             "needs parallel.engine=deepspeed and parallel.zero_stage=3")
    _require(not p.offload_optimizer or engine.offload_optimizer, "parallel.offload_optimizer",
             "needs parallel.engine=deepspeed")
    _require(p.reduce_every_micro_batch or engine.reduce_choice, "parallel.reduce_every_micro_batch",
             f"false is an FSDP setting; {p.engine} reduces gradients as it does (ddp: once per step; "
             "deepspeed: per its ZeRO stage)")
    _require(p.pp_schedule in SCHEDULES, "parallel.pp_schedule",
             f"must be one of {', '.join(SCHEDULES)}; got {p.pp_schedule!r}")
    if p.pp_schedule in MULTI_STAGE:
        _require(p.pp_virtual_stages >= 2, "parallel.pp_virtual_stages",
                 f"{p.pp_schedule} needs at least 2 stages per rank, got {p.pp_virtual_stages}")
    else:
        _require(p.pp_virtual_stages == 1, "parallel.pp_virtual_stages",
                 f"{p.pp_schedule} runs one stage per rank (got {p.pp_virtual_stages}); "
                 "use interleaved_1f1b or interleaved_zb for more")
    _require(p.ac in ("none", "full", "selective"), "parallel.ac", f"must be none, full or selective; got {p.ac!r}")
    _require(p.ac_every >= 1, "parallel.ac_every", f"must be >= 1, got {p.ac_every}")
    _require(not p.async_tp or p.tp > 1, "parallel.async_tp",
             f"overlaps tensor-parallel communication: needs parallel.tp > 1, got tp={p.tp}")
    return resolved


def micro_rows(micro_batch_size: int, local_batch: int, pp: int) -> int:
    """Sequences per micro-batch, train.micro_batch_size resolved (the one place -1 is read): -1
    means the whole local batch (no accumulation), or with pipelining one sequence."""
    if micro_batch_size == -1:
        return 1 if pp > 1 else local_batch
    return micro_batch_size


def micro_batches(local_batch: int, micro_batch_size: int, pp: int) -> int:
    """Micro-batches per step of a local batch."""
    return local_batch // micro_rows(micro_batch_size, local_batch, pp)


def _validate_layout(m: ModelArgs, p: ParallelConfig, seq_len: int, local_batch: int, micro_batch_size: int) -> None:
    _require(m.kv_heads % p.tp == 0, "parallel.tp",
             f"must divide model.n_kv_heads={m.kv_heads} (tensor parallel splits whole kv heads), got {p.tp}")
    _require(seq_len % (2 * p.cp) == 0, "parallel.cp",
             f"2*cp={2 * p.cp} must divide data.seq_len={seq_len} (each rank holds 2 of 2*cp chunks)")
    _require((seq_len // p.cp) % p.tp == 0, "parallel.tp",
             f"must divide the per-rank sequence data.seq_len/cp={seq_len // p.cp} (sequence parallel)")
    n_stages = p.pp * p.pp_virtual_stages
    if p.pp_layers_per_stage is not None:
        counts = list(p.pp_layers_per_stage)
        _require(len(counts) == n_stages and sum(counts) == m.n_layers and min(counts) >= 0,
                 "parallel.pp_layers_per_stage",
                 f"needs {n_stages} non-negative entries (pp*pp_virtual_stages) summing to "
                 f"model.n_layers={m.n_layers}; got {counts}")
    else:
        _require(n_stages <= m.n_layers, "parallel.pp",
                 f"pp*pp_virtual_stages={n_stages} stages is more than model.n_layers={m.n_layers}")
    if p.pp > 1:
        n_micro = micro_batches(local_batch, micro_batch_size, p.pp)
        problem = schedule_constraint(p.pp_schedule, n_micro, p.pp)
        _require(problem is None, "train.micro_batch_size", f"{problem} (per-rank batch {local_batch})")


def _check_stage(cfg: Config, parallel: ParallelConfig, seq_len: int, global_batch: int, prefix: str) -> None:
    """One stage's sequence length and batch against the model and the layout. Errors of stages
    after the first name the stage's key (data.stages[i].seq_len / .global_batch_size)."""
    t, dp = cfg.train, parallel.dp
    try:
        _require(global_batch % dp == 0, "train.global_batch_size",
                 f"must be divisible by the data-parallel degree {dp}, got {global_batch}")
        local = global_batch // dp
        micro = micro_rows(t.micro_batch_size, local, 1)
        _require(micro > 0 and local % micro == 0, "train.micro_batch_size",
                 f"must divide the per-rank batch {local} (global {global_batch} / dp {dp}), or be -1; "
                 f"got {t.micro_batch_size}")
        _require(seq_len <= cfg.model.max_seq_len, "data.seq_len",
                 f"{seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
        _validate_layout(cfg.model, parallel, seq_len, local, t.micro_batch_size)
    except ConfigError as exc:
        if not prefix or prefix == "data.stages[0].":
            raise
        field = "global_batch_size" if exc.key.startswith("train.") else "seq_len"
        raise ConfigError(prefix + field, exc.message) from None


def _validate_objective(cfg: Config, p: ParallelConfig) -> None:
    spec = objective_spec(cfg.train.objective)
    if spec.validate is not None:
        spec.validate(cfg, p)


def _finite(value, key: str = "") -> None:
    """Every float in the config is finite, inside lists and maps too (data.sources[i].weight,
    data.stages[i].weights.NAME): an `inf` LR or eps trains into NaN and a restart loop."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _finite(item, f"{key}.{name}")
    elif isinstance(value, float):
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")


LR_MAX = 10.0
"""An AdamW step moves every weight by about the LR: far above this nothing trains (and 1e308
overflows the optimizer's fp32 state), so a larger value is a typo, not a setting."""


def _validate_optim(o) -> None:
    _require(o.lr <= LR_MAX, "optim.lr", f"must be in (0, {LR_MAX:g}] (AdamW moves each weight by about lr a step), "
                                         f"got {o.lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.decay_steps is None or o.decay_steps > 0, "optim.decay_steps", "must be positive or null")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        _require(0.0 <= value < 1.0, f"optim.{key}", f"must be in [0, 1), got {value}")
    _require(0 < o.eps <= 1, "optim.eps", f"must be in (0, 1] (it is added to the update's denominator), got {o.eps}")
    # Decoupled weight decay multiplies each weight by (1 - lr * weight_decay) every step.
    _require(o.weight_decay >= 0 and o.lr * o.weight_decay < 1, "optim.weight_decay",
             f"must be >= 0 with optim.lr * weight_decay < 1 (else every step flips the weights' sign), "
             f"got {o.weight_decay} (lr {o.lr})")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")


def _run_dir_writable(path: str) -> None:
    """The run directory is a directory this process can write, or can be created."""
    p = Path(path)
    _require(not p.exists() or p.is_dir(), "train.run_dir", f"{path} exists and is not a directory")
    existing = next(q for q in [p, *p.parents] if q.exists())
    _require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), "train.run_dir",
             f"{existing} is not writable, so {path} cannot hold checkpoints and logs")


def validate(cfg: Config, world_size: int, dataset=None, tokenizer_vocab: Optional[int] = None) -> Config:
    """Check every combination we can check before training; returns the resolved config."""
    _finite(cfg)
    _require(0 <= cfg.train.seed < 2**63, "train.seed", f"must be in [0, 2**63), got {cfg.train.seed}")
    _run_dir_writable(cfg.train.run_dir)
    validate_model(cfg.model)
    parallel = resolve_parallel(cfg.parallel, world_size)
    t, o, c, d = cfg.train, cfg.optim, cfg.checkpoint, cfg.data
    _positive(cfg, "train.steps", "train.global_batch_size", "train.log_interval", "data.seq_len",
              "optim.lr", "checkpoint.keep_last")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda; got {t.device!r}")
    _require(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"must be auto, fp32 or bf16; got {t.dtype!r}")
    _validate_speed(cfg)
    _require(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", "must be positive or null")
    _require(all(1 <= step <= t.steps for step in t.profile_steps), "train.profile_steps",
             f"must list steps in [1, train.steps={t.steps}], got {list(t.profile_steps)}")
    _require(t.memory_snapshot_step is None or 1 <= t.memory_snapshot_step <= t.steps, "train.memory_snapshot_step",
             f"must be a step in [1, train.steps={t.steps}] or null, got {t.memory_snapshot_step}")
    _require(t.device != "cpu" or (t.memory_snapshot_step is None and not t.memory_snapshot_on_oom),
             "train.memory_snapshot_step", "memory snapshots record the CUDA allocator: they need train.device "
             "cuda or auto")
    _require(t.loss_chunk_tokens is None or t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens",
             f"must be >= 0 (0 = the plain loss) or null (automatic), got {t.loss_chunk_tokens}")
    _require(not t.loss_chunk_tokens or engine_facts(parallel).output_whole_after_forward,
             "train.loss_chunk_tokens", "must be 0 or null under parallel.engine=deepspeed with zero_stage=3 "
             "(ZeRO-3 holds the output weight whole only inside the model's forward)")
    _validate_optim(o)
    _require(c.interval >= 0, "checkpoint.interval", f"must be >= 0, got {c.interval}")
    _require(c.max_failed_saves >= 0, "checkpoint.max_failed_saves", f"must be >= 0, got {c.max_failed_saves}")
    _require(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
             f"must be offline, online or disabled; got {cfg.logging.wandb_mode!r}")
    h = cfg.health
    for key in ("nan_action", "spike_action", "grad_norm_action", "sdc_action"):
        value = getattr(h, key)
        _require(value in ACTIONS, f"health.{key}", f"must be one of {', '.join(ACTIONS)}; got {value!r}")
    _validate_health(h, c.enabled)
    _require(c.interval_s >= 0, "checkpoint.interval_s", f"must be >= 0, got {c.interval_s}")
    try:
        validate_specs(list(h.faults) + specs_from_env(), world_size)
    except ValueError as exc:
        raise ConfigError("health.faults", str(exc)) from None
    _validate_objective(cfg, parallel)
    validate_data_plan(cfg, parallel, functools.partial(_check_stage, cfg, parallel))
    model = dataclasses.replace(cfg.model, score_head=objective_spec(t.objective).score_head)  # the objective decides
    if tokenizer_vocab is not None:
        if model.vocab_size == -1:
            model = dataclasses.replace(model, vocab_size=tokenizer_vocab)
        _require(model.vocab_size >= tokenizer_vocab, "model.vocab_size",
                 f"{model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}, "
                 f"data.tokenizer={d.tokenizer!r})")
    if dataset is not None and not d.sources and not d.stages and objective_spec(t.objective).packs_windows:
        windows = (len(dataset) - 1) // d.seq_len
        _require(windows >= t.global_batch_size, "data.seq_len",
                 f"data {d.path!r} ({len(dataset)} tokens) gives {windows} sequences of {d.seq_len} tokens, "
                 f"fewer than train.global_batch_size={t.global_batch_size}; use more data or a shorter seq_len")
    return dataclasses.replace(cfg, model=model, parallel=parallel)
