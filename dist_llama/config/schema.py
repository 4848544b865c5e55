"""The configuration schema: everything a user can set, one docstring per field.

omegaconf builds the config from these dataclasses (loading.py) and rejects unknown keys and wrong
types; validation.py rejects impossible combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from dist_llama.model.args import ModelArgs


class Degrees:
    """What the five parallel degrees multiply to; shared by ParallelConfig and
    parallel.dims.ParallelDims. Meaningful once dp_shard is resolved (not -1)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks whose gradients are averaged: data parallel with cp folded in (same weights, other tokens)."""
        return self.dp * self.cp

    @property
    def data_parallel(self) -> bool:
        """Whether gradients are reduced across ranks at all."""
        return self.dp_cp > 1

    @property
    def world_size(self) -> int:
        """Ranks in the job: the product of all five degrees."""
        return self.dp_cp * self.tp * self.pp


@dataclass
class ParallelConfig(Degrees):
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
    reduce_every_micro_batch: bool = True
    """FSDP: reduce-scatter gradients after every micro-batch into the fp32 shards; False holds each weight's whole fp32 gradient across the micro-batches and reduces once per step (Megatron's choice: less traffic, 4 bytes per parameter the rank computes with). Pipelines always reduce once (torch's stages)."""
    ac: str = "none"
    """Activation checkpointing: none, full (every block) or selective (every ac_every-th block)."""
    ac_every: int = 2
    """With ac=selective, checkpoint one block in this many."""
    async_tp: bool = False
    """Async tensor parallel: Inductor overlaps the TP all-gathers / reduce-scatters with the matmuls (symmetric memory); needs tp > 1, CUDA and train.compile."""


@dataclass
class SourceConfig:
    name: str = ""
    """Name of the source (in weights, tokens_by_source and events)."""
    path: str = ""
    """Prepared token-shard directory (dist-llama-prepare), or a builtin corpus name ('kjv')."""
    weight: float = 1.0
    """Share of the sequences drawn from this source (normalised over the sources)."""


@dataclass
class StageConfig:
    until_tokens: Optional[int] = None
    """Input tokens (since the start of training) at which the next stage begins; None: to the end (last stage only)."""
    seq_len: Optional[int] = None
    """Tokens per sequence in this stage; None: the previous stage's (stage 0: data.seq_len)."""
    global_batch_size: Optional[int] = None
    """Sequences per step in this stage; None: the previous stage's (stage 0: train.global_batch_size)."""
    weights: Optional[Dict[str, float]] = None
    """Source weights by name in this stage; None: the previous stage's (stage 0: the sources' own)."""


@dataclass
class DataConfig:
    path: str = "kjv"
    """Prepared token-shard directory (dist-llama-prepare), or the builtin corpus name 'kjv' (one source; see sources)."""
    sources: Optional[List[SourceConfig]] = None
    """A weighted mixture: [{name, path, weight}, ...]; None: the one source data.path, named after it."""
    stages: Optional[List[StageConfig]] = None
    """Curriculum: [{until_tokens, seq_len, global_batch_size, weights}, ...], switching at a step boundary."""
    anneal_tokens: int = 0
    """Annealing: over the last this many input tokens of training the LR goes linearly to 0 (0 = off)."""
    anneal_weights: Optional[Dict[str, float]] = None
    """Source weights while annealing (e.g. upsampling high-quality sources); None: keep the stage's."""
    eval_sources: Optional[List[SourceConfig]] = None
    """Held-out sources for validation: [{name, path}, ...] (weights ignored); they replace eval_fraction's split."""
    eval_fraction: float = 0.01
    """Hold out the last fraction of each training source (cut at a document start) for validation, whether or not it runs, so turning it on changes no training batch; 0 = none."""
    tokenizer: str = "byte"
    """'byte', or a tokenizer file recognised by content: a Hugging Face tokenizer.json, a tiktoken
    BPE file (Llama 3 tokenizer.model) or a SentencePiece model (Llama 2 tokenizer.model)."""
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
class DPOConfig:
    beta: float = 0.1
    """Beta, the strength of the implicit KL penalty towards the reference (Llama 3: 0.1)."""
    nll_coef: float = 0.0
    """Coefficient of a length-normalised NLL term on the chosen responses (Llama 3: 0.2; 0 = off)."""
    mask_special: bool = False
    """Leave the end-of-turn token out of both responses' log-probabilities (Llama 3: true; headers are prompt tokens always)."""
    reference: str = "model"
    """model (a frozen reference model beside the policy) or precomputed (its log-probs of every pair in one pass before training, kept in <run_dir>/dpo_reference.safetensors; no reference model during training)."""


@dataclass
class RewardConfig:
    margin: str = "none"
    """The ranking loss's margin m(r): none (Llama 3), small or large (Llama 2's Table 27, from each pair's rating), or record (each record's numeric margin)."""


@dataclass
class PPOConfig:
    """train.objective=ppo (Llama 2 §3.2.3). Llama 2's optimizer for PPO is AdamW with betas (0.9, 0.95),
    eps 1e-5, weight decay 0.1, gradient clipping 1.0 and a constant LR of 1e-6 (optim.*: set them
    there), a batch of 512 prompts (train.global_batch_size) and mini-batches of 64."""

    reward: str = ""
    """The helpfulness reward model: a dist_llama reward run (or step) directory, or an exported Hugging Face LlamaForSequenceClassification directory."""
    reward_safety: str = ""
    """An optional safety reward model (same forms); its score replaces the helpfulness score when it is below safety_threshold."""
    safety_threshold: float = 0.15
    """Llama 2: the safety score (a probability, the sigmoid of the head) is used below this threshold."""
    reward_fn: str = ""
    """A rule-based reward instead of reward models, module:function; called as fn(prompt_ids, response_ids) -> a probability in [0, 1] per response (e.g. for tests)."""
    value_init: str = "reward"
    """The value model's start: reward (the helpfulness reward model, as InstructGPT) or policy (the starting policy with a new scalar head)."""
    kl_coef: float = 0.01
    """Beta of the per-token KL penalty against the starting policy (Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """Epsilon of the clipped surrogate (the ratio is clipped to [1 - clip, 1 + clip])."""
    value_clip: float = 0.2
    """The value model's update is clipped to old value +- this in its loss."""
    epochs: int = 1
    """PPO epochs over each rollout batch."""
    mini_batch_size: int = 64
    """Rollouts per mini-batch (one optimizer step each for the policy and the value model); divides train.global_batch_size."""
    max_new_tokens: int = 128
    """Response length cap of a rollout."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts (1 = off)."""
    value_lr: float = 1e-6
    """The value model's (constant) learning rate; its optimizer is otherwise optim.*."""


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
    """torch.compile each transformer block (Inductor: Triton on cuda, C++ on cpu); None = on for cuda (except under parallel.engine=deepspeed), off for cpu."""
    float8: bool = False
    """float8 matmuls (torchao, tensorwise scaling) in the blocks' linear layers, weights all-gathered in float8 under FSDP; CUDA with compute capability >= 8.9 (H100/H200/L4) and torchao installed."""
    meta_init: Optional[bool] = None
    """Build on the meta device and initialise after sharding (no rank holds the whole model); None = on for cuda, off for cpu."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    eval_interval: int = 0
    """Validate on the held-out data every this many steps and at the last step (0 = never)."""
    eval_tokens: int = 65536
    """Input tokens evaluated per held-out source per validation (its first windows, in order)."""
    downstream_eval_interval: int = 0
    """Score train.downstream_tasks on the live model every this many steps and at the last step (0 = never): downstream/<task>/acc and acc_norm in the step record."""
    downstream_tasks: List[str] = field(default_factory=list)
    """lm-eval multiple-choice task names (lm-eval's own, or YAML files under train.downstream_include_path) scored in the loop."""
    downstream_include_path: Optional[str] = None
    """A directory of lm-eval task YAML files (e.g. tests/tasks) for train.downstream_tasks."""
    downstream_limit: int = 100
    """Documents scored per downstream task per evaluation (the first ones, the same every time)."""
    peak_flops: Optional[float] = None
    """Per-device peak FLOP/s for MFU; None = H100 dense BF16 on cuda, a matmul probe on cpu."""
    objective: str = "pretrain"
    """pretrain (every token), sft (assistant tokens of --format chat data only), dpo (--format preference pairs against a frozen reference), reward (a reward model: a scalar head ranking the pairs) or ppo (RLHF with PPO against reward models, on --format chat prompts)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """train.objective=dpo: its settings."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """train.objective=reward: its settings."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """train.objective=ppo: its settings."""
    profile_steps: List[int] = field(default_factory=list)
    """Steps to trace with torch.profiler on every rank: <run_dir>/profile/step-N/rank-R.json (Chrome trace; Perfetto)."""
    memory_snapshot_step: Optional[int] = None
    """CUDA: record the allocator's history over this step and dump it to <run_dir>/memory/step-N-rank-R.pickle."""
    memory_snapshot_on_oom: bool = False
    """CUDA: record the allocator's history from the start and dump it to <run_dir>/memory/oom-step-N-rank-R.pickle when a step runs out of memory."""
    loss_chunk_tokens: Optional[int] = None
    """Tokens per cross-entropy chunk (output projection + loss per chunk, recomputed in backward); 0 = plain loss on the whole micro-batch's logits; None = chunks of at most 256 MiB fp32 logits per rank (plain under DeepSpeed ZeRO-3)."""

    def compute_dtype(self, device_type: str) -> str:
        """`dtype` resolved for a device: auto is bf16 on cuda, fp32 elsewhere."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device_type == "cuda" else "fp32"

    def uses_meta_init(self, device_type: str) -> bool:
        """`meta_init` resolved for a device: None is on for cuda, off elsewhere."""
        return self.meta_init if self.meta_init is not None else device_type == "cuda"


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
    init_from: Optional[str] = None
    """Start from these weights (Hugging Face dir, Meta dir, dist_llama run or step dir) unless the run directory has a checkpoint to resume."""
    init_from_vocab_remapped: bool = False
    """Allow data.tokenizer to differ from the tokenizer init_from was trained with (its embedding rows were re-mapped to this one)."""
    interval_s: float = 0.0
    """Also save when this many seconds passed since the last save (0 = off)."""
    async_save: bool = True
    """Block the loop only to stage a copy of the state; write it in the background (one in flight)."""
    verify: bool = True
    """Re-read every written file and check its checksum before committing a checkpoint."""
    max_failed_saves: int = 3
    """Stop (exit 74, naming the last committed step) after this many saves in a row failed (0 = never)."""


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
    max_failures_at_step: int = 3
    """Attempts failing in a row at one step, with no checkpoint progress, before the run stops as a crash loop (exit 3); 0 = never."""
    rollback_lr_scale: float = 1.0
    """Multiply the LR by this after each rollback (1.0 = unchanged)."""
    rollback_skip_data: bool = True
    """After a rollback, skip the batches between the checkpoint and the failed step."""
    hang_timeout_s: float = 0.0
    """Heartbeat watchdog: a step or collective stuck this long dumps stacks and exits to restart (0 = off)."""
    straggler_interval: int = 0
    """Every this many steps compare per-rank compute times, `compute_s` (0 = off; train/compute_clock.py)."""
    straggler_factor: float = 2.0
    """Ranks whose compute time (forward/backward without waits in collectives) is above this times the
    lower median are reported as stragglers."""
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
    tensorboard: bool = False
    """Write the step records' scalars (the same as wandb's) as TensorBoard event files in <run_dir>/tensorboard."""


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
