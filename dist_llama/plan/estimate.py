"""Closed-form estimate of one training step on a given layout: memory, FLOPs, communication,
pipeline bubble, step time and MFU per rank, from a validated Config and a hardware preset
(hardware.py).

The model is deliberately simple (a roofline with one achievable fraction of peak for matmuls, one
for attention kernels, one efficiency per link and one overlap fraction), calibrated once against
the published Llama 3 (Table 4) and Megatron-LM MFU figures (tests/test_plan.py). See
CALIBRATION for the constants and why each has its value. Model states follow the data-parallel
engine (FSDP, DDP, DeepSpeed ZeRO-1/2/3 with offload; model_states). The "cpu" preset describes
gloo ranks on this machine from measurements; bench/plan_vs_measured.py compares the estimate with
real runs there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dist_llama.config import Config, micro_batches
from dist_llama.model.args import ModelArgs, ffn_hidden_dim
from dist_llama.model.flops import count_params, flops_per_token
from dist_llama.parallel.loss import loss_chunk_tokens
from dist_llama.parallel.pipeline import layers_per_stage, stage_ids_for_rank
# hardware_preset is not used here; bench/plan_vs_measured.py knows it from this module.
from dist_llama.plan.hardware import Hardware, hardware_preset  # noqa: F401


@dataclass(frozen=True)
class Calibration:
    """The one set of constants used for every layout (fitted by hand to all six published rows
    together, never per row)."""

    matmul_efficiency: float = 0.54
    """Fraction of peak reached by the block's GEMMs, averaged with the elementwise kernels, norms
    and launch gaps between them that the roofline ignores (large bf16 GEMMs alone reach 60-75%)."""
    attention_efficiency: float = 0.22
    """Fraction of peak reached by the attention kernel on the causal (half) S x S work, forward and
    backward together (FlashAttention-2 backward and document-masked kernels run well below GEMM
    rate; 0.27 would make attention cost exactly PaLM's full-matrix count at matmul_efficiency)."""
    intra_node_efficiency: float = 0.75
    """Achieved NVLink bus bandwidth / nominal for large all-gather/reduce-scatter (nccl-tests)."""
    inter_node_efficiency: float = 0.75
    """Achieved network bus bandwidth / nominal for large collectives and p2p."""
    critical_overlap: float = 0.5
    """Fraction of tensor- and context-parallel collectives hidden behind compute: their result is
    needed by the very next kernel, so only part hides (Megatron TP comm overlap / async TP)."""
    overlap: float = 0.8
    """Fraction of FSDP, context-parallel and pipeline p2p traffic hidden behind compute (prefetched
    or issued asynchronously)."""
    collective_latency_s: float = 20e-6
    """Fixed cost per collective call (launch + ring latency)."""


CALIBRATION = Calibration()


@dataclass
class Memory:
    """Bytes one rank holds at its peak, by kind (device memory unless said otherwise)."""

    params: float
    """Parameters stored between steps: FSDP's fp32 shards, DDP's fp32 replica, DeepSpeed's
    compute-dtype model weights (whole under ZeRO-1/2, a 1/N partition under ZeRO-3, none when
    offloaded)."""
    master: float
    """A separate fp32 master copy: DeepSpeed's 1/N partition (0 when offloaded); FSDP and DDP step
    their fp32 parameters directly."""
    grads: float
    """Gradients held: FSDP's fp32 shards (reduced in fp32), DDP's fp32 replica, DeepSpeed's
    compute-dtype gradients (whole under ZeRO-1, a 1/N partition from ZeRO-2)."""
    optimizer: float
    """AdamW exp_avg + exp_avg_sq, fp32, sharded like the master weights (0 when offloaded)."""
    gathered: float
    """Compute-dtype weights materialised for compute at the peak: FSDP/ZeRO-3 unsharded blocks
    (the whole stage when FSDP keeps them after forward, else about two), or DDP's bf16 autocast
    copies (none in fp32)."""
    buffers: float
    """Communication buffers of the engine: DDP's gradient buckets, DeepSpeed's reduce bucket."""
    activations: float
    """Saved activations of every micro-batch in flight."""
    logits: float
    """The loss's logits on the last stage: one chunk's (chunked loss), or one micro-batch's."""
    in_flight_microbatches: int
    """Micro-batches whose activations are held at the peak (schedule dependent)."""
    activation_per_layer_microbatch: float
    """Saved activations of one layer for one micro-batch."""
    host: float = 0.0
    """Bytes kept in CPU memory by ZeRO offload (not part of total)."""

    @property
    def model_states(self) -> float:
        """Parameters, gradients and optimizer states: the quantity of the ZeRO paper's Figure 1."""
        return self.params + self.master + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.gathered + self.buffers + self.activations + self.logits


@dataclass
class Collective:
    """One kind of communication, summed over a step on one rank."""

    name: str
    """What and where (e.g. "tp all-gather/reduce-scatter (nvlink)")."""
    bytes_per_step: float
    """Bytes this rank sends per step (ring bus volume)."""
    seconds: float
    """Time the transfers take at the achieved bandwidth."""
    exposed_seconds: float
    """Part of it not hidden behind compute."""


@dataclass
class Estimate:
    """Everything the planner predicts for one rank of one layout."""

    rank: int
    """The global rank described."""
    pp_rank: int
    """Its pipeline rank."""
    stage_ids: list
    """Pipeline stages it holds."""
    layers: int
    """Transformer layers it holds."""
    params_total: int
    """Parameters of the whole model."""
    params_rank: int
    """Parameters this rank computes with (its stages, its TP slice, before FSDP sharding)."""
    params_shard: float
    """Parameters this rank stores (after FSDP / ZeRO-3 sharding)."""
    memory: Memory
    """Peak memory by kind."""
    micro_batches: int
    """Micro-batches per step per data-parallel rank."""
    model_flops_per_token: float
    """PaLM training FLOPs per token (what MFU counts)."""
    hardware_flops_rank: float
    """FLOPs this rank executes per step (causal attention, recompute, output layer included)."""
    compute_seconds: float
    """Time of this rank's compute at the calibrated efficiencies."""
    collectives: list = field(default_factory=list)
    """Communication per kind."""
    bubble_fraction: float = 0.0
    """Pipeline bubble (PP-1)/(V*M) relative to the busy time."""
    step_seconds: float = 0.0
    """Predicted step time (slowest rank sets it)."""
    tokens_per_step: int = 0
    """Tokens per optimizer step, global."""
    tokens_per_s_per_gpu: float = 0.0
    """Throughput per device."""
    tflops_per_gpu: float = 0.0
    """Model TFLOP/s per device (PaLM FLOPs)."""
    mfu: float = 0.0
    """Model FLOPs utilisation, 0..1."""
    fits: bool = True
    """Whether the peak memory fits the device."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"]["total"] = self.memory.total
        d["memory"]["model_states"] = self.memory.model_states
        return d


# --- per-layer quantities -------------------------------------------------------------------------

def layer_params(m: ModelArgs) -> int:
    """Parameters of one transformer block (matmuls + two RMSNorms)."""
    head_dim = m.dim // m.n_heads
    attention = m.dim * head_dim * (2 * m.n_heads + 2 * m.kv_heads)
    return attention + 3 * m.dim * ffn_hidden_dim(m) + 2 * m.dim


def activation_bytes_per_layer(m: ModelArgs, tokens: int, tp: int, ac: str, c: int = 2) -> float:
    """Bytes one block saves for backward for `tokens` tokens (micro-batch x local sequence), with
    c-byte compute-dtype activations, counted from this Llama block as autograd runs it (checked
    against the fake-tensor step, plan/memory.py). With H = tokens x dim, K = tokens x kv_dim,
    F = tokens x ffn_dim, under tensor + sequence parallelism of degree t:
    - each RMSNorm: its input in fp32 (4H/t; the norm runs in fp32 even under bf16) and its output (cH/t);
    - each SP all-gather of a norm output, saved whole by the matmuls after it (cH; none when t = 1);
    - RoPE: q and k in fp32 complex form (4(H + K)/t);
    - attention: rotated q, K and V expanded to all query heads, and the output (4cH/t), and wo's
      reshaped input (cH/t); the S x S scores are never stored (flash / fused SDPA);
    - SwiGLU: w1's output, its SiLU, w3's output and their product (4cF/t).
    Korthikanti et al.'s 34 sbh/t (GPT block, 16-bit) is about 55 sbh/t here for Llama 3 8B.
    Full recompute keeps only the block input: cH/t."""
    H, K, F = tokens * m.dim, tokens * m.kv_heads * (m.dim // m.n_heads), tokens * ffn_hidden_dim(m)
    if ac == "full":
        return c * H / tp
    norms = 2 * (4 + c) * H / tp
    gathered = 2 * c * H if tp > 1 else 0.0
    return norms + gathered + 4 * (H + K) / tp + 5 * c * H / tp + 4 * c * F / tp


def in_flight_microbatches(schedule: str, pp: int, pp_rank: int, virtual: int, n_micro: int) -> float:
    """Micro-batches (counted in whole-rank units) whose activations a rank holds at its peak."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return n_micro
    if schedule == "1f1b":
        return min(n_micro, pp - pp_rank)
    # Interleaved: Megatron's warm-up holds (pp - r - 1)·2 + (V-1)·pp chunks + 1, each 1/V of a rank.
    chunks = min(n_micro * virtual, (pp - pp_rank - 1) * 2 + (virtual - 1) * pp + 1)
    return chunks / virtual


# --- model states per engine -----------------------------------------------------------------------

DEEPSPEED_REDUCE_BUCKET = 5e8
"""DeepSpeed's default zero_optimization.reduce_bucket_size, elements. With contiguous_gradients (on
by default) ZeRO-1/2 allocate one bucket of it in the compute dtype at each backward and ZeRO-3 one
flat buffer of it at init (deepspeed/runtime/zero/stage_1_and_2.py backward(), stage3.py), whatever
the model size; the reduce-scatters go bucket by bucket."""
DEEPSPEED_GRAD_COMM_BYTES = 4
"""dist_llama's ds_config reduces gradients in fp32 (communication_data_type), as FSDP does."""
DEEPSPEED_PREFETCH_BUCKET = 5e7
"""DeepSpeed's default stage3_prefetch_bucket_size, elements ZeRO-3 gathers ahead of use."""


def compute_bytes(cfg: Config, hw: Hardware) -> int:
    """Bytes per element of the compute dtype the training would use on this hardware."""
    return 4 if cfg.train.compute_dtype("cpu" if hw.name == "cpu" else "cuda") == "fp32" else 2


def zero_shards(p) -> int:
    """Ranks one rank's parameters are sharded over: FSDP over dp_shard x cp (replicas of HSDP
    hold copies), DeepSpeed ZeRO over its data-parallel ranks, nothing under DDP."""
    if p.engine == "fsdp":
        return p.dp_shard * p.cp
    if p.engine == "deepspeed":
        return p.dp_shard
    return 1


def model_states(p, params_rank: float, block_params: float, c: int) -> dict:
    """Device bytes of parameters, master copy, gradients, AdamW states, gathered weights and engine
    buffers of a rank computing with params_rank parameters (its stages and TP slice; blocks of
    block_params), c bytes per compute-dtype element; and what ZeRO offload keeps on the host.

    DeepSpeed follows the ZeRO paper (Rajbhandari et al. 2020, Fig. 1) with K = 12 (fp32 master,
    Adam m and v): compute-dtype weights and gradients, ZeRO-1 partitions the K states, ZeRO-2 the
    gradients too, ZeRO-3 the weights too; DeepSpeed keeps its fp32 master partition even for fp32
    weights (it clones them). Offloading the optimizer moves the K states to the host, plus an fp32
    gradient partition the CPU Adam steps with; offloading parameters (ZeRO-3) moves the weight
    partition."""
    psi, n = params_rank, zero_shards(p)
    if p.engine == "deepspeed":
        stage = p.zero_stage
        states = {"params": c * psi / n if stage == 3 else c * psi,
                  "master": 4 * psi / n,
                  "grads": c * psi if stage == 1 else c * psi / n,
                  "optimizer": 8 * psi / n,
                  # ZeRO-3 holds the block in use plus what it prefetched.
                  "gathered": c * min(psi, block_params + DEEPSPEED_PREFETCH_BUCKET) if stage == 3 else 0.0,
                  "buffers": c * DEEPSPEED_REDUCE_BUCKET, "host": 0.0}
        if p.offload_optimizer:
            states["host"] += states["master"] + states["optimizer"] + 4 * psi / n
            states["master"] = states["optimizer"] = 0.0
        if p.offload_params:
            states["host"] += states["params"]
            states["params"] = 0.0
        return states
    if p.engine == "fsdp" and p.data_parallel:
        # fp32 shards stepped in place; gradients reduce-scattered in fp32 (Llama 3 §3.3.2).
        gathered = psi if not p.reshard_after_forward else min(psi, 2 * block_params)
        return {"params": 4 * psi / n, "master": 0.0, "grads": 4 * psi / n, "optimizer": 8 * psi / n,
                "gathered": c * gathered, "buffers": 0.0, "host": 0.0}
    # DDP, or a single data-parallel rank: the fp32 parameters themselves; autocast keeps a
    # compute-dtype copy of every weight it casts for backward. DDP's reducer holds its own flat
    # gradient buckets, as large as the gradients (gradient_as_bucket_view is off in apply_ddp).
    return {"params": 4 * psi, "master": 0.0, "grads": 4 * psi, "optimizer": 8 * psi,
            "gathered": 0.0 if c == 4 else c * psi,
            "buffers": 4 * psi if p.engine == "ddp" and p.data_parallel else 0.0, "host": 0.0}


# --- the estimate --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Links:
    """Achieved bandwidths and per-call latency, the hardware's or the calibration's."""

    nvlink: float
    network: float
    host: float
    latency_s: float

    @classmethod
    def of(cls, hw: Hardware, cal: Calibration) -> "_Links":
        intra = hw.link_efficiency if hw.link_efficiency is not None else cal.intra_node_efficiency
        inter = hw.link_efficiency if hw.link_efficiency is not None else cal.inter_node_efficiency
        latency = hw.collective_latency_s if hw.collective_latency_s is not None else cal.collective_latency_s
        return cls(hw.intra_node_bw * intra, hw.inter_node_bw * inter, hw.host_bw, latency)

    def time(self, volume: float, bw: float, calls: float) -> float:
        return volume / bw + calls * self.latency_s


def _group_spans_nodes(inner: int, size: int, hw: Hardware) -> bool:
    """A mesh dim of `size` ranks with stride `inner` (product of the dims inside it) fits a node
    only if inner*size ranks do."""
    return size > 1 and inner * size > hw.gpus_per_node


def _collective(name: str, volume: float, bw: float, calls: float, links: _Links, hidden: float) -> Collective:
    secs = links.time(volume, bw, calls)
    return Collective(name, volume, secs, secs * (1 - hidden))


def data_parallel_collectives(p, params_rank: float, layers: int, n_micro: int, c: int, hw: Hardware,
                              links: _Links, cal: Calibration) -> list:
    """Gradient and parameter traffic of the data-parallel engine per step, one rank."""
    psi, n = params_rank, zero_shards(p)
    group = p.dp_cp if p.engine == "ddp" else n
    bw = links.network if _group_spans_nodes(p.tp, group, hw) else links.nvlink
    out = []
    if p.engine == "deepspeed":
        # Weights travel in the compute dtype, gradients in fp32 (ds_config's communication_data_type).
        weights, grads = (n - 1) / n * psi * c, (n - 1) / n * psi * DEEPSPEED_GRAD_COMM_BYTES
        buckets = max(1, math.ceil(psi / DEEPSPEED_REDUCE_BUCKET))
        if p.zero_stage == 3:
            # Like FSDP: gather forward and backward, reduce-scatter gradients, every micro-batch;
            # overlap_comm is on by default for ZeRO-3.
            if n > 1:
                out.append(_collective("zero-3 all-gather/reduce-scatter", n_micro * (2 * weights + grads), bw,
                                       3 * n_micro * (layers + 1), links, cal.overlap))
        elif n > 1:
            # ZeRO-2 reduce-scatters every micro-batch's gradients into the partitions, ZeRO-1 once;
            # then the updated partitions are all-gathered after the step. overlap_comm is off by
            # default for stages 1/2 and the all-gather follows the step: nothing hides.
            reduces = n_micro if p.zero_stage == 2 else 1
            out.append(_collective(f"zero-{p.zero_stage} reduce-scatter grads", reduces * grads, bw,
                                   reduces * buckets, links, 0.0))
            out.append(_collective(f"zero-{p.zero_stage} all-gather params", weights, bw, buckets, links, 0.0))
        if p.offload_optimizer and links.host > 0:
            # Gradient partition to the host, updated weights back, around the CPU step.
            out.append(_collective("offload optimizer (pcie)", 2 * c * psi / n, links.host, 2, links, 0.0))
        if p.offload_params and links.host > 0:
            out.append(_collective("offload params (pcie)", 2 * n_micro * c * psi / n, links.host,
                                   2 * n_micro * (layers + 1), links, cal.overlap))
        return out
    if p.engine == "fsdp" and p.data_parallel:
        if n > 1:
            # Compute-dtype all-gather (once per step when weights are kept after forward, else
            # forward and backward of every micro-batch), fp32 gradient reduce-scatter once.
            gathers = 1 if not p.reshard_after_forward else 2 * n_micro
            volume = (gathers * c + 4) * (n - 1) / n * psi
            out.append(_collective("fsdp all-gather/reduce-scatter", volume, bw, (gathers + 1) * (layers + 1),
                                   links, cal.overlap))
        if p.dp_replicate > 1:
            volume = 2 * (p.dp_replicate - 1) / p.dp_replicate * 4 * psi / n
            out.append(_collective("hsdp all-reduce (replicas)", volume, links.network, layers + 1, links, cal.overlap))
        return out
    if p.data_parallel:
        volume = 2 * (p.dp_cp - 1) / p.dp_cp * 4 * psi
        out.append(_collective("ddp all-reduce", volume, bw, layers + 1, links, cal.overlap))
    return out


def estimate_rank(cfg: Config, hw: Hardware, rank: int = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` as if its own pipeline rank set the pace (see estimate())."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, cp, pp, V = p.tp, p.cp, p.pp, p.pp_virtual_stages
    dp, world = p.dp, p.world_size
    seq = cfg.data.seq_len
    c = compute_bytes(cfg, hw)
    local_batch = t.global_batch_size // dp
    mbs = local_batch if t.micro_batch_size == -1 and pp == 1 else (1 if t.micro_batch_size == -1 else t.micro_batch_size)
    n_micro = micro_batches(local_batch, t.micro_batch_size, pp)
    tokens_mb = mbs * seq // cp  # tokens of one micro-batch on this rank's sequence slice (before SP)

    # Which stages and layers this rank holds (pp is the outermost mesh dim).
    pp_rank = rank // (world // pp)
    n_stages = pp * V
    counts = layers_per_stage(m.n_layers, n_stages, p.pp_lighter_ends, p.pp_layers_per_stage)
    stage_ids = stage_ids_for_rank(pp_rank, pp, V)
    layers = sum(counts[s] for s in stage_ids)
    first, last = 0 in stage_ids, n_stages - 1 in stage_ids

    # Parameters: TP slices every matrix (norms replicated); FSDP / ZeRO-3 shard what is left.
    total, _ = count_params(m)
    per_layer = layer_params(m)
    block_rank = (per_layer - 2 * m.dim) // tp + 2 * m.dim
    params_rank = layers * block_rank
    params_rank += (m.vocab_size * m.dim // tp if first else 0) + (m.vocab_size * m.dim // tp + m.dim if last else 0)
    states = model_states(p, params_rank, block_rank, c)
    sharded_params = p.engine == "fsdp" and p.data_parallel or p.engine == "deepspeed" and p.zero_stage == 3
    params_shard = params_rank / zero_shards(p) if sharded_params else params_rank

    act_layer = activation_bytes_per_layer(m, tokens_mb, tp, "none", c)
    ckpt_layer = activation_bytes_per_layer(m, tokens_mb, tp, "full", c)
    if p.ac == "full":
        saved_layers = layers * ckpt_layer
    elif p.ac == "selective":
        n_ckpt = math.ceil(layers / p.ac_every)
        saved_layers = n_ckpt * ckpt_layer + (layers - n_ckpt) * act_layer
    else:
        saved_layers = layers * act_layer
    if hw.name == "cpu":
        # SDPA's boolean document mask [b, 1, s, s], built once per micro-batch (CUDA's
        # FlexAttention keeps a block mask of a few MiB instead).
        saved_layers += mbs * (seq // cp) * seq
    in_flight = in_flight_microbatches(p.pp_schedule, pp, pp_rank, V, n_micro)
    # Under checkpointing, backward recomputes one block at a time and holds its full activations.
    recompute_peak = act_layer if p.ac != "none" else 0.0
    chunk = loss_chunk_tokens(cfg, tp)
    if not last:
        logits = 0.0
    elif chunk:  # one chunk's fp32 logits and their gradient at a time, one fp32 log-sum-exp per token
        logits = 8 * min(chunk, tokens_mb) * m.vocab_size / tp + 4 * tokens_mb
    else:  # the whole micro-batch's logits in the compute dtype, and fp32 for the loss
        logits = (c + 4) * tokens_mb * m.vocab_size / tp
    memory = Memory(params=states["params"], master=states["master"], grads=states["grads"],
                    optimizer=states["optimizer"], gathered=states["gathered"], buffers=states["buffers"],
                    activations=saved_layers * in_flight + recompute_peak, logits=logits, in_flight_microbatches=math.ceil(in_flight),
                    activation_per_layer_microbatch=act_layer, host=states["host"])

    # FLOPs this rank executes per step: 6 per parameter per token for the matmuls (+2 per
    # recomputed forward), attention on the causal half of S x S.
    head_dim = m.dim // m.n_heads
    recompute = {"none": 0.0, "full": 1.0, "selective": 1.0 / p.ac_every}[p.ac]
    layer_matmul_flops = (6 + 2 * recompute) * (per_layer - 2 * m.dim) / tp * tokens_mb
    layer_attn_flops = (6 + 2 * recompute) * m.n_heads / tp * head_dim * tokens_mb * seq  # causal: half of 12·s
    output_flops = 6 * m.vocab_size * m.dim / tp * tokens_mb if last else 0.0
    mb_seconds = (layers * (layer_matmul_flops / (hw.peak_flops * cal.matmul_efficiency)
                            + layer_attn_flops / (hw.peak_flops * cal.attention_efficiency))
                  + output_flops / (hw.peak_flops * cal.matmul_efficiency))
    hardware_flops = n_micro * (layers * (layer_matmul_flops + layer_attn_flops) + output_flops)
    compute_seconds = n_micro * mb_seconds

    links = _Links.of(hw, cal)
    collectives = []
    # TP with SP: per block 2 all-gathers + 2 reduce-scatters of the [s, b, h] activation forward,
    # the same backward, and again in the recomputed forward.
    if tp > 1:
        calls = layers * n_micro * (8 + 4 * recompute)
        volume = calls * (tp - 1) / tp * c * tokens_mb * m.dim
        bw = links.network if _group_spans_nodes(1, tp, hw) else links.nvlink
        collectives.append(_collective("tp all-gather/reduce-scatter", volume, bw, calls, links, cal.critical_overlap))
    # CP: all-gather K and V forward (again on recompute), reduce-scatter dK, dV backward.
    if cp > 1:
        kv_local = 2 * tokens_mb * m.kv_heads // min(tp, m.kv_heads) * head_dim * c
        calls = layers * n_micro * (2 + recompute)
        volume = calls * (cp - 1) * kv_local
        bw = links.network if _group_spans_nodes(tp, cp, hw) else links.nvlink
        collectives.append(_collective("cp all-gather K/V", volume, bw, calls, links, cal.critical_overlap))
    # PP: activation forward, its gradient backward, at each of this rank's stage boundaries.
    if pp > 1:
        calls = n_micro * V * 2
        volume = calls * c * tokens_mb * m.dim / tp
        bw = links.network if _group_spans_nodes(world // pp, pp, hw) else links.nvlink
        collectives.append(_collective("pp send/recv", volume, bw, calls, links, cal.overlap))
    collectives += data_parallel_collectives(p, params_rank, layers, n_micro, c, hw, links, cal)

    # Step: per-micro-batch work (compute + exposed TP/CP/PP) stretched by the bubble, then the
    # exposed once-per-step traffic.
    per_mb_comm = sum(c_.exposed_seconds for c_ in collectives if c_.name.startswith(("tp", "cp", "pp")))
    per_step_comm = sum(c_.exposed_seconds for c_ in collectives) - per_mb_comm
    bubble = (pp - 1) / (V * n_micro) if pp > 1 else 0.0
    step = (compute_seconds + per_mb_comm) * (1 + bubble) + per_step_comm

    tokens_per_step = t.global_batch_size * seq
    fpt = flops_per_token(m, seq)
    tokens_per_s_per_gpu = tokens_per_step / step / world
    return Estimate(
        rank=rank, pp_rank=pp_rank, stage_ids=stage_ids, layers=layers, params_total=total,
        params_rank=params_rank, params_shard=params_shard, memory=memory, micro_batches=n_micro,
        model_flops_per_token=fpt, hardware_flops_rank=hardware_flops, compute_seconds=compute_seconds,
        collectives=collectives, bubble_fraction=bubble, step_seconds=step, tokens_per_step=tokens_per_step,
        tokens_per_s_per_gpu=tokens_per_s_per_gpu, tflops_per_gpu=tokens_per_s_per_gpu * fpt / 1e12,
        mfu=tokens_per_s_per_gpu * fpt / hw.peak_flops, fits=memory.total <= hw.memory_bytes)


def estimate(cfg: Config, hw: Hardware, rank: int = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` of the resolved config (dp_shard filled in): that rank's memory,
    FLOPs and traffic, with the step time (and throughput, MFU) of the slowest pipeline rank,
    which sets the pace for everyone."""
    per_pp = cfg.parallel.world_size // cfg.parallel.pp
    own = estimate_rank(cfg, hw, rank, cal)
    slowest = max((estimate_rank(cfg, hw, r * per_pp, cal) for r in range(cfg.parallel.pp)),
                  key=lambda e: e.step_seconds)
    return dataclasses.replace(own, step_seconds=slowest.step_seconds, bubble_fraction=slowest.bubble_fraction,
                               tokens_per_s_per_gpu=slowest.tokens_per_s_per_gpu,
                               tflops_per_gpu=slowest.tflops_per_gpu, mfu=slowest.mfu)
