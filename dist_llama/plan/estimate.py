"""Closed-form estimate of one training step on a given layout: memory, FLOPs, communication,
pipeline bubble, step time and MFU per rank, from a validated Config and a hardware preset.

The model is deliberately simple (a roofline with one achievable fraction of peak for matmuls, one
for attention kernels, one efficiency per link and one overlap fraction), calibrated once against
the published Llama 3 (Table 4) and Megatron-LM MFU figures (tests/test_plan.py). See
CALIBRATION for the constants and why each has its value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from dist_llama.config import Config, micro_batches
from dist_llama.model.flops import H100_BF16_PEAK, count_params, flops_per_token, measure_cpu_peak_flops
from dist_llama.model.llama import ModelArgs, ffn_hidden_dim
from dist_llama.parallel.pipeline import layers_per_stage, stage_ids_for_rank

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the links it sees."""

    name: str
    """Preset name."""
    peak_flops: float
    """Dense BF16 (fp32 on cpu) peak, FLOP/s."""
    memory_bytes: float
    """Device memory (HBM), bytes."""
    intra_node_bw: float
    """NVLink bandwidth per GPU per direction, bytes/s."""
    inter_node_bw: float
    """Network (InfiniBand/RoCE) bandwidth per GPU per direction, bytes/s."""
    gpus_per_node: int
    """Devices joined by the intra-node link."""


def hardware_preset(name: str) -> Hardware:
    """h100 / h200 / a100 (SXM, 8 per node, one 400/400/200 Gb/s NIC per GPU) or cpu (measured peak,
    one process per "node", loopback gloo at a nominal 5 GB/s)."""
    if name == "h100":
        return Hardware("h100", H100_BF16_PEAK, 80 * GB, 450 * GB, 50 * GB, 8)
    if name == "h200":
        return Hardware("h200", H100_BF16_PEAK, 141 * GB, 450 * GB, 50 * GB, 8)
    if name == "a100":
        return Hardware("a100", 312e12, 80 * GB, 300 * GB, 25 * GB, 8)
    if name == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Hardware("cpu", measure_cpu_peak_flops(), float(memory), 5 * GB, 5 * GB, 1)
    raise ValueError(f"unknown hardware {name!r}; choose h100, h200, a100 or cpu")


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
    """Bytes one rank holds at its peak, by kind."""

    weights_bf16: float
    """Gathered bf16 compute copy of the weights (whole stage when FSDP keeps them after forward,
    else about two blocks being gathered)."""
    master_fp32: float
    """fp32 sharded parameters (the FSDP master copy)."""
    grads_fp32: float
    """fp32 sharded gradients."""
    optimizer_fp32: float
    """AdamW exp_avg + exp_avg_sq, fp32, sharded."""
    activations: float
    """Saved activations of every micro-batch in flight."""
    logits: float
    """Logits buffer of one micro-batch on the last stage (bf16 + fp32 for the loss)."""
    in_flight_microbatches: int
    """Micro-batches whose activations are held at the peak (schedule dependent)."""
    activation_per_layer_microbatch: float
    """Saved activations of one layer for one micro-batch."""

    @property
    def total(self) -> float:
        return (self.weights_bf16 + self.master_fp32 + self.grads_fp32 + self.optimizer_fp32
                + self.activations + self.logits)


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
    """Parameters this rank stores (after FSDP sharding)."""
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
        return d


# --- per-layer quantities -------------------------------------------------------------------------

def _kv_heads(m: ModelArgs) -> int:
    return m.n_heads if m.n_kv_heads is None else m.n_kv_heads


def layer_params(m: ModelArgs) -> int:
    """Parameters of one transformer block (matmuls + two RMSNorms)."""
    head_dim = m.dim // m.n_heads
    attention = m.dim * head_dim * (2 * m.n_heads + 2 * _kv_heads(m))
    return attention + 3 * m.dim * ffn_hidden_dim(m) + 2 * m.dim


def activation_bytes_per_layer(m: ModelArgs, tokens: int, tp: int, ac: str) -> float:
    """Saved activations of one block for `tokens` tokens (micro-batch x local sequence).

    Korthikanti et al. (arXiv:2205.05198) with sequence parallelism: s·b·h·(34/t + 5·a·s/(h·t))
    bytes; the 5as/h term (the materialised softmax) is dropped because SDPA/flash attention never
    stores the S x S matrix. Full recompute keeps only the block input: 2·s·b·h/t bytes."""
    if ac == "full":
        return 2 * tokens * m.dim / tp
    return 34 * tokens * m.dim / tp


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


# --- the estimate --------------------------------------------------------------------------------

def _collective_time(volume: float, bw: float, calls: int, cal: Calibration) -> float:
    return volume / bw + calls * cal.collective_latency_s


def _group_spans_nodes(inner: int, size: int, hw: Hardware) -> bool:
    """A mesh dim of `size` ranks with stride `inner` (product of the dims inside it) fits a node
    only if inner*size ranks do."""
    return size > 1 and inner * size > hw.gpus_per_node


def estimate_rank(cfg: Config, hw: Hardware, rank: int = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` as if its own pipeline rank set the pace (see estimate())."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, cp, pp, V = p.tp, p.cp, p.pp, p.pp_virtual_stages
    dp_shard, dp_rep = p.dp_shard, p.dp_replicate
    dp = dp_shard * dp_rep
    world = tp * cp * pp * dp
    seq = cfg.data.seq_len
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

    # Parameters: TP slices every matrix (norms replicated), FSDP shards over dp_shard*cp.
    total, _ = count_params(m)
    per_layer = layer_params(m)
    params_rank = layers * ((per_layer - 2 * m.dim) // tp + 2 * m.dim)
    params_rank += (m.vocab_size * m.dim // tp if first else 0) + (m.vocab_size * m.dim // tp + m.dim if last else 0)
    fsdp = p.engine == "fsdp" and dp * cp > 1
    shard = dp_shard * cp if fsdp else 1
    params_shard = params_rank / shard

    # Memory.
    if fsdp and not p.reshard_after_forward:
        weights_bf16 = 2 * params_rank
    elif fsdp:
        weights_bf16 = 2 * 2 * (per_layer // tp)  # current + prefetched block
    else:
        weights_bf16 = 2 * params_rank
    act_layer = activation_bytes_per_layer(m, tokens_mb, tp, "none")
    if p.ac == "full":
        saved_layers = layers * activation_bytes_per_layer(m, tokens_mb, tp, "full")
    elif p.ac == "selective":
        n_ckpt = math.ceil(layers / p.ac_every)
        saved_layers = (n_ckpt * activation_bytes_per_layer(m, tokens_mb, tp, "full")
                        + (layers - n_ckpt) * act_layer)
    else:
        saved_layers = layers * act_layer
    in_flight = in_flight_microbatches(p.pp_schedule, pp, pp_rank, V, n_micro)
    logits = 6 * tokens_mb * m.vocab_size / tp if last else 0.0
    memory = Memory(weights_bf16=weights_bf16, master_fp32=4 * params_shard, grads_fp32=4 * params_shard,
                    optimizer_fp32=8 * params_shard, activations=saved_layers * in_flight, logits=logits,
                    in_flight_microbatches=math.ceil(in_flight), activation_per_layer_microbatch=act_layer)

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

    collectives = []
    nvlink = hw.intra_node_bw * cal.intra_node_efficiency
    network = hw.inter_node_bw * cal.inter_node_efficiency

    # TP with SP: per block 2 all-gathers + 2 reduce-scatters of the [s, b, h] activation forward,
    # the same backward, and again in the recomputed forward.
    if tp > 1:
        calls = layers * n_micro * (8 + 4 * recompute)
        volume = calls * (tp - 1) / tp * 2 * tokens_mb * m.dim
        bw = network if _group_spans_nodes(1, tp, hw) else nvlink
        secs = _collective_time(volume, bw, int(calls), cal)
        collectives.append(Collective("tp all-gather/reduce-scatter", volume, secs, secs * (1 - cal.critical_overlap)))
    # CP: all-gather K and V forward (again on recompute), reduce-scatter dK, dV backward.
    if cp > 1:
        kv_local = 2 * tokens_mb * _kv_heads(m) // min(tp, _kv_heads(m)) * head_dim * 2
        calls = layers * n_micro * (2 + recompute)
        volume = calls * (cp - 1) * kv_local
        bw = network if _group_spans_nodes(tp, cp, hw) else nvlink
        secs = _collective_time(volume, bw, int(calls), cal)
        collectives.append(Collective("cp all-gather K/V", volume, secs, secs * (1 - cal.critical_overlap)))
    # PP: activation forward, its gradient backward, at each of this rank's stage boundaries.
    if pp > 1:
        calls = n_micro * V * 2
        volume = calls * 2 * tokens_mb * m.dim / tp
        bw = network if _group_spans_nodes(world // pp, pp, hw) else nvlink
        secs = _collective_time(volume, bw, calls, cal)
        collectives.append(Collective("pp send/recv", volume, secs, secs * (1 - cal.overlap)))
    # FSDP: bf16 all-gather (once per step when weights are kept after forward, else forward and
    # backward of every micro-batch), fp32 gradient reduce-scatter once per step.
    if fsdp and shard > 1:
        gathers = 1 if not p.reshard_after_forward else 2 * n_micro
        volume = (gathers * 2 + 4) * (shard - 1) / shard * params_rank
        bw = network if _group_spans_nodes(tp, shard, hw) else nvlink
        secs = _collective_time(volume, bw, (gathers + 1) * (layers + 1), cal)
        collectives.append(Collective("fsdp all-gather/reduce-scatter", volume, secs, secs * (1 - cal.overlap)))
    if fsdp and dp_rep > 1:
        volume = 2 * (dp_rep - 1) / dp_rep * 4 * params_shard
        secs = _collective_time(volume, network, layers + 1, cal)
        collectives.append(Collective("hsdp all-reduce (replicas)", volume, secs, secs * (1 - cal.overlap)))
    if not fsdp and dp * cp > 1:
        volume = 2 * (dp * cp - 1) / (dp * cp) * 4 * params_rank
        bw = network if _group_spans_nodes(tp, dp * cp, hw) else nvlink
        secs = _collective_time(volume, bw, layers + 1, cal)
        collectives.append(Collective("ddp all-reduce", volume, secs, secs * (1 - cal.overlap)))

    # Step: per-micro-batch work (compute + exposed TP/CP) stretched by the bubble, then the
    # exposed once-per-step traffic.
    per_mb_comm = sum(c.exposed_seconds for c in collectives if c.name.startswith(("tp", "cp", "pp")))
    per_step_comm = sum(c.exposed_seconds for c in collectives) - per_mb_comm
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


def _world(cfg: Config) -> int:
    p = cfg.parallel
    return p.tp * p.cp * p.pp * p.dp_shard * p.dp_replicate


def estimate(cfg: Config, hw: Hardware, rank: int = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` of the resolved config (dp_shard filled in): that rank's memory,
    FLOPs and traffic, with the step time (and throughput, MFU) of the slowest pipeline rank,
    which sets the pace for everyone."""
    per_pp = _world(cfg) // cfg.parallel.pp
    own = estimate_rank(cfg, hw, rank, cal)
    slowest = max((estimate_rank(cfg, hw, r * per_pp, cal) for r in range(cfg.parallel.pp)),
                  key=lambda e: e.step_seconds)
    return dataclasses.replace(own, step_seconds=slowest.step_seconds, bubble_fraction=slowest.bubble_fraction,
                               tokens_per_s_per_gpu=slowest.tokens_per_s_per_gpu,
                               tflops_per_gpu=slowest.tflops_per_gpu, mfu=slowest.mfu)
