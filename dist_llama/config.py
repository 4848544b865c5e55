"""Typed configuration: schema, loading (preset + overrides), validation, run record.

Everything a user can set lives in the dataclasses below; omegaconf rejects unknown keys and wrong
types while merging, and `validate` rejects impossible combinations. Both happen before any process
group exists, and both raise `ConfigError`, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_llama.model import ModelArgs
from dist_llama.faults import specs_from_env, validate_specs
from dist_llama.parallel.pipeline import MULTI_STAGE, SCHEDULES, schedule_constraint
from dist_llama.train.recovery import ACTIONS


EXIT_CONFIG = 2
"""Exit code of every command for bad configuration or input."""


class ConfigError(ValueError):
    """A configuration or input problem, reported as `key: message` with exit code EXIT_CONFIG."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP replicate dim under engine=fsdp)."""
    dp_shard: int = -1
    """Data-parallel shard degree for FSDP; -1 = all ranks left after the other degrees."""
    cp: int = 1
    """Context-parallel degree: each rank holds 2 of the 2*cp sequence chunks; K/V all-gathered."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallel and loss parallel); must divide n_kv_heads."""
    pp: int = 1
    """Pipeline-parallel degree (ranks in a pipeline)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b or interleaved_zb (zero bubble)."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank; the interleaved schedules need at least 2."""
    pp_layers_per_stage: Optional[List[int]] = None
    """Explicit layer count of every stage (pp * pp_virtual_stages entries); None = balanced."""
    pp_lighter_ends: bool = False
    """Give the first and last stages one layer fewer (they hold the embedding / output; Llama 3)."""
    engine: str = "fsdp"
    """Data-parallel engine: fsdp (FSDP2; HSDP when dp_replicate>1), ddp (replicas) or deepspeed (ZeRO)."""
    zero_stage: int = 3
    """engine=deepspeed: ZeRO stage 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters) sharded."""
    offload_optimizer: bool = False
    """engine=deepspeed: keep optimizer states (and the step) in CPU memory."""
    offload_params: bool = False
    """engine=deepspeed with zero_stage=3: keep parameters in CPU memory between uses."""
    reshard_after_forward: bool = True
    """FSDP: free gathered weights after forward (ZeRO-3 style); False keeps them until backward."""
    ac: str = "none"
    """Activation checkpointing: none, full (every block) or selective (every ac_every-th block)."""
    ac_every: int = 2
    """With ac=selective, checkpoint one block in this many."""


@dataclass
class DataConfig:
    path: str = "kjv"
    """Prepared token-shard directory (dist-llama-prepare), or the builtin corpus name 'kjv'."""
    tokenizer: str = "byte"
    """'byte', a tiktoken tokenizer.model file, or a Hugging Face tokenizer.json."""
    seq_len: int = 256
    """Tokens per training sequence."""
    reset_positions: bool = True
    """RoPE positions restart at each document boundary inside a packed sequence."""
    cache_dir: Optional[str] = None
    """Where builtin corpora are tokenized; None = $DIST_LLAMA_CACHE or ~/.cache/dist_llama."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (Llama 2: 0.1)."""
    warmup_steps: int = 2000
    """Linear warmup steps from 0 to the peak LR."""
    decay_steps: Optional[int] = None
    """Steps from start to the end of cosine decay; None = train.steps."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings, not to norm weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all ranks) to this; 0 disables clipping."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for (total, including steps before a resume)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = -1
    """Sequences per micro-batch on one rank; -1 = the whole local batch (with pp > 1: one sequence)."""
    seed: int = 0
    """Seed for weight init and data order."""
    run_dir: str = "runs/debug"
    """Run directory: config.yaml, metrics.jsonl, events.jsonl, checkpoints/."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on cuda, fp32 on cpu), fp32 or bf16; reductions stay fp32."""
    compile: Optional[bool] = None
    """torch.compile each transformer block; None = on for cuda (except under parallel.engine=deepspeed), off for cpu."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    peak_flops: Optional[float] = None
    """Per-device peak FLOP/s for MFU; None = H100 dense BF16 on cuda, a matmul probe on cpu."""


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Save checkpoints (DCP) to <run_dir>/checkpoints."""
    interval: int = 50
    """Save every this many steps (0 = only the final save)."""
    keep_last: int = 3
    """Keep this many newest checkpoints."""
    save_final: bool = True
    """Save when training ends."""
    resume: bool = True
    """Resume from the newest valid checkpoint in the run directory, if any."""
    interval_s: float = 0.0
    """Also save when this many seconds passed since the last save (0 = off)."""
    async_save: bool = True
    """Block the loop only to stage a copy of the state; write it in the background (one in flight)."""
    verify: bool = True
    """Re-read every written file and check its checksum before committing a checkpoint."""


@dataclass
class HealthConfig:
    nan_action: str = "retry"
    """On a NaN/Inf loss or gradient norm: log, skip (the batch), retry (the step), rollback, restart or abort."""
    spike_action: str = "skip"
    """On a loss spike (robust z-score over the recent window above spike_zscore); actions as nan_action."""
    spike_zscore: float = 8.0
    """Robust z-score (deviation from the window median in MADs, x0.6745) above which a loss is a spike."""
    spike_window: int = 50
    """Recent steps the spike and gradient-norm statistics look at."""
    spike_min_history: int = 10
    """Steps of history needed before spike / explosion checks fire."""
    grad_norm_action: str = "skip"
    """On a gradient-norm explosion (above grad_norm_max, or robust z-score above spike_zscore)."""
    grad_norm_max: Optional[float] = None
    """Absolute gradient-norm ceiling; None = only the z-score test."""
    max_retries: int = 2
    """Retries of one step before escalating to rollback."""
    max_rollbacks: int = 3
    """Rollbacks per run before escalating to restart."""
    rollback_lr_scale: float = 1.0
    """Multiply the LR by this after each rollback (1.0 = unchanged)."""
    rollback_skip_data: bool = True
    """After a rollback, skip the batches between the checkpoint and the failed step."""
    hang_timeout_s: float = 0.0
    """Heartbeat watchdog: a step or collective stuck this long dumps stacks and exits to restart (0 = off)."""
    straggler_interval: int = 0
    """Every this many steps compare per-rank step times (0 = off)."""
    straggler_factor: float = 2.0
    """Ranks slower than this times the median step time are reported as stragglers."""
    sdc_interval: int = 0
    """Every this many steps compare a parameter hash across data-parallel replicas (0 = off)."""
    sdc_action: str = "rollback"
    """On replicas that disagree (silent data corruption): log, rollback, restart or abort."""
    preflight: bool = False
    """Before training, check each rank with a matmul of known result and a small collective."""
    faults: List[str] = field(default_factory=list)
    """Injected faults for drills and tests, e.g. ["kill:rank=1:step=7", "nan:step=4"]; see dist_llama/faults.py."""


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"
    """wandb mode: offline, online or disabled; the WANDB_MODE environment variable wins."""
    wandb_project: str = "dist_llama"
    """wandb project name."""
    console: bool = True
    """Print a progress line on rank 0 every log step."""


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    """Model architecture (Meta reference field names)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout on the device mesh [pp, dp_replicate, dp_shard, cp, tp]."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and tokenizer."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and experiment tracking."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Health checks, recovery policy and fault injection."""


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _parse_overrides(overrides: Sequence[str]) -> list[str]:
    dotlist = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(item, "overrides are key=value or --key=value, e.g. train.steps=20")
        dotlist.append(text)
    return dotlist


def _key_of(exc: OmegaConfBaseException, fallback: str) -> str:
    return getattr(exc, "full_key", None) or fallback


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        key = _key_of(exc, source)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "?"
        raise ConfigError(key, f"unknown key (from {source}); allowed here: {allowed}") from None
    except OmegaConfBaseException as exc:
        key = _key_of(exc, source)
        node_type = type(OmegaConf.select(base, key)).__name__ if key != source else "?"
        raise ConfigError(key, f"wrong type or value (from {source}): {exc.msg.splitlines()[0]}; "
                          f"expected {node_type}") from None


def load(config_path: Optional[str], overrides: Sequence[str] = (), schema: type = Config) -> DictConfig:
    """Schema defaults, then the YAML preset, then key=value overrides, each checked by omegaconf."""
    cfg = OmegaConf.structured(schema)
    if config_path:
        path = Path(config_path)
        if not path.is_file() and (CONFIG_DIR / path.name).is_file():
            path = CONFIG_DIR / path.name
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {config_path}")
        try:
            preset = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{config_path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(preset, dict):
            raise ConfigError("--config", f"{config_path} must hold a mapping of sections")
        cfg = _merge(cfg, preset, str(config_path))
    dotlist = _parse_overrides(overrides)
    for item in dotlist:
        try:
            override = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(item.split("=", 1)[0], f"cannot parse override: {exc.msg.splitlines()[0]}") from None
        cfg = _merge(cfg, override, "command line")
    return cfg


def to_object(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _positive(cfg: Config, *keys: str) -> None:
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)
        _require(value is not None and value > 0, key, f"must be a positive number, got {value}")


def validate_model(m: ModelArgs) -> None:
    _positive(Config(model=m), "model.dim", "model.n_layers", "model.n_heads", "model.multiple_of",
              "model.norm_eps", "model.rope_theta", "model.max_seq_len")
    _require(m.dim % m.n_heads == 0, "model.n_heads",
             f"must divide model.dim={m.dim}, got {m.n_heads}")
    _require((m.dim // m.n_heads) % 2 == 0, "model.n_heads",
             f"head dim model.dim/model.n_heads={m.dim // m.n_heads} must be even for RoPE")
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    _require(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads",
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


def resolve_parallel(p: ParallelConfig, world_size: int) -> ParallelConfig:
    """Fill dp_shard=-1 with the ranks left over, and check that the degrees multiply to the world."""
    for key in ("dp_replicate", "cp", "tp", "pp"):
        value = getattr(p, key)
        _require(value >= 1, f"parallel.{key}", f"must be >= 1, got {value}")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", f"must be >= 1 or -1 (auto), got {p.dp_shard}")
    others = p.dp_replicate * p.cp * p.tp * p.pp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        _require(world_size % others == 0, "parallel.dp_shard",
                 f"cannot fill: dp_replicate*cp*tp*pp={others} does not divide the world size {world_size}")
        dp_shard = world_size // others
    product = others * dp_shard
    _require(product == world_size, "parallel.dp_shard",
             f"dp_replicate*dp_shard*cp*tp*pp={product} must equal the world size {world_size} "
             "(set parallel.dp_shard=-1 to fill it)")
    _require(p.engine in ("fsdp", "ddp", "deepspeed"), "parallel.engine",
             f"must be fsdp, ddp or deepspeed, got {p.engine!r}")
    _require(p.engine == "fsdp" or (p.tp == 1 and p.pp == 1), "parallel.engine",
             f"{p.engine} composes with data parallelism only (tp={p.tp}, pp={p.pp}); use engine=fsdp with tp or pp")
    if p.engine == "deepspeed":
        _require(p.cp == 1 and p.dp_replicate == 1, "parallel.engine",
                 f"deepspeed runs plain ZeRO data parallelism: needs cp=1 and dp_replicate=1 "
                 f"(got cp={p.cp}, dp_replicate={p.dp_replicate}); use engine=fsdp for HSDP or CP")
        _require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", f"must be 1, 2 or 3, got {p.zero_stage}")
    _require(not p.offload_params or (p.engine == "deepspeed" and p.zero_stage == 3), "parallel.offload_params",
             "needs parallel.engine=deepspeed and parallel.zero_stage=3")
    _require(not p.offload_optimizer or p.engine == "deepspeed", "parallel.offload_optimizer",
             "needs parallel.engine=deepspeed")
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
    return dataclasses.replace(p, dp_shard=dp_shard)


def micro_batches(local_batch: int, micro_batch_size: int, pp: int) -> int:
    """Micro-batches per step: -1 means no accumulation, or with pipelining one sequence each."""
    if micro_batch_size == -1:
        return local_batch if pp > 1 else 1
    return local_batch // micro_batch_size


def _validate_layout(m: ModelArgs, p: ParallelConfig, seq_len: int, local_batch: int, micro_batch_size: int) -> None:
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    _require(kv % p.tp == 0, "parallel.tp",
             f"must divide model.n_kv_heads={kv} (tensor parallel splits whole kv heads), got {p.tp}")
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


def validate(cfg: Config, world_size: int, dataset=None, tokenizer_vocab: Optional[int] = None) -> Config:
    """Check every combination we can check before training; returns the resolved config."""
    validate_model(cfg.model)
    parallel = resolve_parallel(cfg.parallel, world_size)
    t, o, c, d = cfg.train, cfg.optim, cfg.checkpoint, cfg.data
    dp = parallel.dp_replicate * parallel.dp_shard
    _positive(cfg, "train.steps", "train.global_batch_size", "train.log_interval", "data.seq_len",
              "optim.lr", "checkpoint.keep_last")
    _require(t.global_batch_size % dp == 0, "train.global_batch_size",
             f"must be divisible by the data-parallel degree {dp}, got {t.global_batch_size}")
    local = t.global_batch_size // dp
    micro = local if t.micro_batch_size == -1 else t.micro_batch_size
    _require(micro > 0 and local % micro == 0, "train.micro_batch_size",
             f"must divide the per-rank batch {local} (global {t.global_batch_size} / dp {dp}), or be -1; "
             f"got {t.micro_batch_size}")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda; got {t.device!r}")
    _require(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"must be auto, fp32 or bf16; got {t.dtype!r}")
    _require(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", "must be positive or null")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.decay_steps is None or o.decay_steps > 0, "optim.decay_steps", "must be positive or null")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        _require(0.0 <= value < 1.0, f"optim.{key}", f"must be in [0, 1), got {value}")
    _require(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _require(c.interval >= 0, "checkpoint.interval", f"must be >= 0, got {c.interval}")
    _require(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
             f"must be offline, online or disabled; got {cfg.logging.wandb_mode!r}")
    h = cfg.health
    for key in ("nan_action", "spike_action", "grad_norm_action", "sdc_action"):
        value = getattr(h, key)
        _require(value in ACTIONS, f"health.{key}", f"must be one of {', '.join(ACTIONS)}; got {value!r}")
    for key in ("spike_window", "spike_min_history"):
        _require(getattr(h, key) >= 1, f"health.{key}", f"must be >= 1, got {getattr(h, key)}")
    for key in ("max_retries", "max_rollbacks", "hang_timeout_s", "straggler_interval", "sdc_interval"):
        _require(getattr(h, key) >= 0, f"health.{key}", f"must be >= 0, got {getattr(h, key)}")
    _require(h.spike_zscore > 0 and h.straggler_factor > 1 and h.rollback_lr_scale > 0, "health",
             "spike_zscore and rollback_lr_scale must be positive, straggler_factor above 1")
    _require(c.interval_s >= 0, "checkpoint.interval_s", f"must be >= 0, got {c.interval_s}")
    try:
        validate_specs(list(h.faults) + specs_from_env(), world_size)
    except ValueError as exc:
        raise ConfigError("health.faults", str(exc)) from None
    _require(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
             f"{d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    _validate_layout(cfg.model, parallel, d.seq_len, local, t.micro_batch_size)
    model = cfg.model
    if tokenizer_vocab is not None:
        if model.vocab_size == -1:
            model = dataclasses.replace(model, vocab_size=tokenizer_vocab)
        _require(model.vocab_size >= tokenizer_vocab, "model.vocab_size",
                 f"{model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}, "
                 f"data.tokenizer={d.tokenizer!r})")
    if dataset is not None:
        windows = (len(dataset) - 1) // d.seq_len
        _require(windows >= t.global_batch_size, "data.seq_len",
                 f"data {d.path!r} ({len(dataset)} tokens) gives {windows} sequences of {d.seq_len} tokens, "
                 f"fewer than train.global_batch_size={t.global_batch_size}; use more data or a shorter seq_len")
    return dataclasses.replace(cfg, model=model, parallel=parallel)


def save_resolved(cfg: Config, run_dir: Path) -> Path:
    """The run record: the exact config a run used, loadable again with --config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
    return path
