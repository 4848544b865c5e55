"""Closed-form estimate of one training step on a given layout: memory, FLOPs, communication,
pipeline bubble, step time and MFU per rank, from a validated Config and a hardware preset
(hardware.py).

The model is deliberately simple (a roofline with one achievable fraction of peak for matmuls, one
for attention kernels, one efficiency per link and one overlap fraction), calibrated once against
the published Llama 3 (Table 4) and Megatron-LM MFU figures (tests/test_plan.py). See
CALIBRATION for the constants and why each has its value. Model states follow the data-parallel
engine (FSDP, DDP, DeepSpeed ZeRO-1/2/3 with offload; plan/engine_costs.py). The "cpu" preset describes
gloo ranks on this machine from measurements; bench/plan_vs_measured.py compares the estimate with
real runs there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from dist_llama.config import Config, micro_batches
from dist_llama.config.validation import micro_rows
from dist_llama.config.engines import engine_facts
from dist_llama.model.args import ModelArgs, ffn_hidden_dim
from dist_llama.model.flops import count_params, flops_per_token
from dist_llama.parallel.loss import loss_chunk_tokens
from dist_llama.parallel.pipeline import layers_per_stage, stage_ids_for_rank
# hardware_preset is not used here; bench/plan_vs_measured.py knows it from this module.
from dist_llama.plan.allowances import Allowances, device_allowances
from dist_llama.plan.engine_costs import FSDPCosts, engine_costs
from dist_llama.plan.hardware import Hardware, hardware_preset  # noqa: F401
from dist_llama.plan.pipeline_memory import pipeline_peak, rank_actions
from dist_llama.plan.links import Links, collective, group_spans_nodes


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
    working: float = 0.0
    """What a block's backward makes besides the saved activations: the gradients of its SwiGLU
    hidden (two F-sized tensors) and of the block input; on the first stage under TP, the embedding's
    full-vocabulary gradient and its fp32 copy (DTensor's embedding backward is Replicate, sliced back
    to the weight's shard only afterwards). The loss's backward and a block's do not overlap: total
    counts the larger of this and `logits`."""
    pipeline: float = 0.0
    """Pipeline buffers: torch's stages allocate a receive buffer per micro-batch for each side of
    each of the rank's stages that borders another stage (activations coming in, gradients coming
    back), kept for the step."""
    host: float = 0.0
    """Bytes kept in CPU memory by ZeRO offload (not part of total)."""

    @property
    def model_states(self) -> float:
        """Parameters, gradients and optimizer states: the quantity of the ZeRO paper's Figure 1."""
        return self.params + self.master + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return (self.model_states + self.gathered + self.buffers + self.pipeline + self.activations
                + max(self.logits, self.working))


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
    """Whether the peak memory (tensors + allowances) fits the device."""
    allowances: Optional[Allowances] = None
    """What the device holds beyond the tensors (plan/allowances.py): context, workspaces, NCCL, fragmentation."""

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


def activation_bytes_per_layer(m: ModelArgs, tokens: int, tp: int, ac: str, c: int = 2, cuda: bool = False,
                               cp: int = 1) -> float:
    """Bytes one block saves for backward for `tokens` tokens (micro-batch x local sequence), with
    c-byte compute-dtype activations, counted from this Llama block as autograd runs it (checked
    against the fake-tensor step, plan/memory.py). With H = tokens x dim, K = tokens x kv_dim,
    F = tokens x ffn_dim, under tensor + sequence parallelism of degree t and context parallelism
    of degree cp (each layer attends its local queries to the K/V of all cp ranks), on a CPU (SDPA):
    - each RMSNorm: its input in fp32 (4H/t; the norm runs in fp32 even under bf16) and its output (cH/t);
    - each SP all-gather of a norm output, saved whole by the matmuls after it (cH; none when t = 1);
    - RoPE: q and k in fp32 complex form (4(H + K)/t);
    - attention: rotated q and the output (2cH/t), the gathered K and V expanded to all query heads
      (2cH cp/t), and wo's reshaped input (cH/t); the S x S scores are never stored (flash SDPA);
    - SwiGLU: w1's output, its SiLU, w3's output and their product (4cF/t).
    On a CUDA target (`cuda`: FlexAttention, which takes K and V unexpanded; counted on fake steps
    of Llama 2 7B and Llama 3 8B with tp 1 and 2, and cp up to 16) RoPE keeps no fp32 copy (its
    products are with constants), attention keeps the rotated q, the output and the gathered K and
    V (2c(H + K cp)/t), and each RMSNorm its fp32 input and output cast (4H/t + cH/t) and, when
    t = 1, the product with its weight too (cH).
    Korthikanti et al.'s 34 sbh/t (GPT block, 16-bit) is about 55 sbh/t here for Llama 3 8B.
    Full recompute keeps only the block input: cH/t."""
    H, K, F = tokens * m.dim, tokens * m.kv_heads * (m.dim // m.n_heads), tokens * ffn_hidden_dim(m)
    if ac == "full":
        return c * H / tp
    gathered = 2 * c * H if tp > 1 else 0.0
    if cuda:
        norms = 2 * (4 + c) * H / tp + (2 * c * H if tp == 1 else 0.0)
        return norms + gathered + 2 * c * (H + K * cp) / tp + 4 * c * F / tp
    norms = 2 * (4 + c) * H / tp
    return norms + gathered + 4 * (H + K) / tp + (3 + 2 * cp) * c * H / tp + 4 * c * F / tp


def compute_bytes(cfg: Config, hw: Hardware) -> int:
    """Bytes per element of the compute dtype the training would use on this hardware."""
    return 4 if cfg.train.compute_dtype("cpu" if hw.name == "cpu" else "cuda") == "fp32" else 2


# --- the estimate --------------------------------------------------------------------------------

def estimate_rank(cfg: Config, hw: Hardware, rank: int = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` as if its own pipeline rank set the pace (see estimate())."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, cp, pp, V = p.tp, p.cp, p.pp, p.pp_virtual_stages
    dp, world = p.dp, p.world_size
    seq = cfg.data.seq_len
    c = compute_bytes(cfg, hw)
    local_batch = t.global_batch_size // dp
    mbs = micro_rows(t.micro_batch_size, local_batch, pp)
    n_micro = micro_batches(local_batch, t.micro_batch_size, pp)
    tokens_mb = mbs * seq // cp  # tokens of one micro-batch on this rank's sequence slice (before SP)

    # Which stages and layers this rank holds (pp is the outermost mesh dim).
    pp_rank = rank // (world // pp)
    n_stages = pp * V
    counts = layers_per_stage(m.n_layers, n_stages, p.pp_lighter_ends, p.pp_layers_per_stage)
    stage_ids = stage_ids_for_rank(pp_rank, pp, V)
    layers = sum(counts[s] for s in stage_ids)
    last = n_stages - 1 in stage_ids

    # Parameters: TP slices every matrix (norms replicated); FSDP / ZeRO-3 shard what is left.
    total, _ = count_params(m)
    per_layer = layer_params(m)
    block_rank = (per_layer - 2 * m.dim) // tp + 2 * m.dim

    def stage_params(stage: int) -> int:
        """Parameters stage `stage` computes with: its blocks, the embedding first, norm and output last."""
        return (counts[stage] * block_rank + (m.vocab_size * m.dim // tp if stage == 0 else 0)
                + (m.vocab_size * m.dim // tp + m.dim if stage == n_stages - 1 else 0))

    params_rank = sum(stage_params(s) for s in stage_ids)
    costs = engine_costs(p)
    states = costs.model_states(p, params_rank, block_rank, c, root_params=params_rank - layers * block_rank)
    params_shard = params_rank / costs.shards(p) if costs.params_sharded(p) else params_rank

    cuda = hw.name != "cpu"
    act_layer = activation_bytes_per_layer(m, tokens_mb, tp, "none", c, cuda, cp)
    ckpt_layer = activation_bytes_per_layer(m, tokens_mb, tp, "full", c, cuda)
    # SDPA's boolean document mask [b, 1, s, s] on CPU, built once per micro-batch and stage
    # (CUDA's FlexAttention keeps a block mask of a few MiB instead).
    mask = mbs * (seq // cp) * seq if hw.name == "cpu" else 0.0
    hidden_bytes = c if costs.casts_weights(p) else 4  # the residual stream: fp32 under autocast
    boundary = mbs * (seq // cp) * m.dim / tp * hidden_bytes  # one micro-batch's hidden state
    # Activation checkpointing wraps every block (full) or every ac_every-th of the rank's blocks.
    wrapped = {"full": layers, "selective": math.ceil(layers / p.ac_every)}.get(p.ac, 0)
    deferred = costs.deferred_states(p, params_rank, c) if n_micro > 1 else None
    if deferred is not None:  # the gradient reduction waits for the last micro-batch
        states.update(deferred)
    chunk = loss_chunk_tokens(t.loss_chunk_tokens, engine_facts(p).output_whole_after_forward, m.vocab_size, tp)
    if chunk:
        # Backward (parallel/loss.py): one chunk's fp32 probabilities beside their compute-dtype
        # gradient (one tensor in fp32), the output weight's fp32 gradient accumulator, the hidden
        # state's gradient and one fp32 log-sum-exp per token.
        chunk_bytes = 4 + (c if c != 4 else 0)
        loss_backward = (chunk_bytes * min(chunk, tokens_mb) * m.vocab_size / tp + 4 * m.vocab_size * m.dim / tp
                         + c * tokens_mb * m.dim + 4 * tokens_mb)
    else:  # the whole micro-batch's logits in the compute dtype, and fp32 for the loss
        loss_backward = (c + 4) * tokens_mb * m.vocab_size / tp
    # A block's backward: two F-sized gradients of the SwiGLU hidden and one of the block input.
    block_backward = c * tokens_mb * (2 * ffn_hidden_dim(m) + m.dim) / tp
    # At the end of the first stage's backward under TP: the embedding's full-vocabulary gradient
    # and its fp32 copy (DTensor's embedding backward is Replicate; it is sliced to the shard after).
    embedding_backward = (c + 4) * m.vocab_size * m.dim if tp > 1 else 0.0
    if pp == 1:
        saved = wrapped * ckpt_layer + (layers - wrapped) * act_layer + mask
        in_flight, activations, held = 1.0, saved, 0.0
        if deferred is not None:
            states["grads"] = 4 * params_rank
        # The loss's backward and a block's do not overlap; the embedding's comes once this micro-
        # batch's activations are gone.
        logits, working = loss_backward, max(block_backward, embedding_backward - saved)
        if isinstance(costs, FSDPCosts) and layers > 1:
            # FSDP reduce-scatters a block's gradient after its backward, when the block's saved
            # activations are gone (and the block before it may be recomputing): the buffers add
            # only what that leaves over the last block's own backward.
            def is_wrapped(i: int) -> bool:
                return p.ac == "full" or (p.ac == "selective" and i % p.ac_every == 0)

            last_saved = ckpt_layer if is_wrapped(layers - 1) else act_layer
            prev_recompute = act_layer if is_wrapped(layers - 2) else 0.0
            recompute = act_layer if wrapped == layers else 0.0
            states["buffers"] = max(0.0, states["buffers"] - last_saved + prev_recompute - recompute)
    else:
        # Each stage's saved bytes per micro-batch (its blocks, wrapped in the rank's order, and its
        # output, kept for that backward when another stage follows), replayed in the schedule's order.
        counts_here = [counts[s] for s in stage_ids]
        before = [sum(counts_here[:i]) for i in range(len(stage_ids))]
        saved_by_stage, sent, whole, shard, work, unsharded, pending = {}, {}, {}, {}, {}, {}, {}
        # Zero bubble's B keeps, for W, the gradient of each weighted node's output: per block the
        # attention's q, k, v and wo outputs, SwiGLU's w1, w3 and w2 outputs and both norms' (and
        # the final norm's on the last stage).
        kv_dim = m.kv_heads * (m.dim // m.n_heads)
        pending_block = c * tokens_mb * (5 * m.dim + 2 * kv_dim + 2 * ffn_hidden_dim(m)) / tp
        # Under FSDP with TP, the embedding's gradient is Replicate until FSDP's reduction: when
        # that waits for the last micro-batch, its full-vocabulary fp32 accumulator stays from the
        # first stage's first backward on, and each of that stage's backwards adds the full-vocabulary
        # gradient in the compute dtype while it runs.
        embedding_whole = deferred is not None and embedding_backward > 0
        for s, n_blocks, first_block in zip(stage_ids, counts_here, before):
            n_wrapped = (n_blocks if p.ac == "full" else
                         sum((first_block + i) % p.ac_every == 0 for i in range(n_blocks)) if p.ac == "selective" else 0)
            saved_by_stage[s] = (n_wrapped * ckpt_layer + (n_blocks - n_wrapped) * act_layer + mask
                                 + (boundary if s != n_stages - 1 else 0.0))
            sent[s] = boundary * ((s != 0) + (s != n_stages - 1))
            whole[s] = 4 * stage_params(s) if deferred is not None else 0.0
            if s == 0 and embedding_whole:
                whole[s] += 4 * m.vocab_size * m.dim - 4 * m.vocab_size * m.dim // tp
            shard[s] = 4 * stage_params(s) / costs.shards(p) if deferred is not None else 0.0
            work[s] = max(block_backward, loss_backward if s == n_stages - 1 else 0.0,
                          (c * m.vocab_size * m.dim if embedding_whole else embedding_backward - saved_by_stage[s])
                          if s == 0 else 0.0)
            unsharded[s] = c * stage_params(s)
            pending[s] = n_blocks * pending_block + (c * tokens_mb * m.dim / tp if s == n_stages - 1 else 0.0)
        runtime_unshards = deferred is not None and V > 1
        peak = pipeline_peak(rank_actions(p.pp_schedule, pp, V, n_micro, pp_rank), saved_by_stage, sent, whole,
                             shard, work, n_micro, held_until_end=V > 1,
                             unsharded=unsharded if runtime_unshards else None, pending=pending,
                             blocks_gathered=2 * c * block_rank)
        if runtime_unshards:
            states["gathered"] = peak.gathered
        in_flight, activations, held = peak.in_flight, peak.activations, peak.held_sends
        if deferred is not None:
            states["grads"] = peak.grads
        # What the peak's backward adds: the loss's when it is the last stage's.
        at_loss = peak.stage == n_stages - 1 and loss_backward >= block_backward
        logits, working = (peak.working, 0.0) if at_loss else (0.0, peak.working)
    if not last:
        logits = 0.0
    # Under checkpointing, backward recomputes one block at a time and holds its full activations;
    # under selective checkpointing a block kept whole has been freed by then (backward runs from
    # the last block, and every wrapped block but the rank's last has one after it).
    recompute_peak = act_layer if wrapped == layers and layers > 0 else 0.0
    # Receive buffers, one per micro-batch for each side of each stage facing another stage, and
    # the sends the multi-stage runtime keeps until the step ends.
    sides = sum((s != 0) + (s != n_stages - 1) for s in stage_ids) if pp > 1 else 0
    pipeline = n_micro * sides * boundary + held
    memory = Memory(params=states["params"], master=states["master"], grads=states["grads"],
                    optimizer=states["optimizer"], gathered=states["gathered"], buffers=states["buffers"],
                    activations=activations + recompute_peak, logits=logits,
                    in_flight_microbatches=math.ceil(in_flight), activation_per_layer_microbatch=act_layer,
                    host=states["host"], working=working, pipeline=pipeline)

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

    links = Links.of(hw, cal)
    collectives = []
    # TP with SP: per block 2 all-gathers + 2 reduce-scatters of the [s, b, h] activation forward,
    # the same backward, and again in the recomputed forward.
    if tp > 1:
        calls = layers * n_micro * (8 + 4 * recompute)
        volume = calls * (tp - 1) / tp * c * tokens_mb * m.dim
        bw = links.network if group_spans_nodes(1, tp, hw) else links.nvlink
        collectives.append(collective("tp all-gather/reduce-scatter", volume, bw, calls, links, cal.critical_overlap))
    # CP: all-gather K and V forward (again on recompute), reduce-scatter dK, dV backward.
    if cp > 1:
        kv_local = 2 * tokens_mb * m.kv_heads // min(tp, m.kv_heads) * head_dim * c
        calls = layers * n_micro * (2 + recompute)
        volume = calls * (cp - 1) * kv_local
        bw = links.network if group_spans_nodes(tp, cp, hw) else links.nvlink
        collectives.append(collective("cp all-gather K/V", volume, bw, calls, links, cal.critical_overlap))
    # PP: activation forward, its gradient backward, at each of this rank's stage boundaries.
    if pp > 1:
        calls = n_micro * V * 2
        volume = calls * c * tokens_mb * m.dim / tp
        bw = links.network if group_spans_nodes(world // pp, pp, hw) else links.nvlink
        collectives.append(collective("pp send/recv", volume, bw, calls, links, cal.overlap))
    collectives += costs.collectives(p, params_rank, layers, n_micro, c, hw, links, cal.overlap)

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
        mfu=tokens_per_s_per_gpu * fpt / hw.peak_flops, allowances=(allow := device_allowances(p, hw, memory.total)),
        fits=memory.total + allow.total <= hw.memory_bytes)


def estimate(cfg: Config, hw: Hardware, rank: Optional[int] = 0, cal: Calibration = CALIBRATION) -> Estimate:
    """Predict one step for `rank` of the resolved config (dp_shard filled in): that rank's memory,
    FLOPs and traffic, with the step time (and throughput, MFU) of the slowest pipeline rank,
    which sets the pace for everyone. rank=None: the pipeline rank with the highest memory (one
    rank of each pipeline rank stands for its tp, cp and dp peers, which hold the same shapes)."""
    per_pp = cfg.parallel.world_size // cfg.parallel.pp
    stages = [estimate_rank(cfg, hw, r * per_pp, cal) for r in range(cfg.parallel.pp)]
    if rank is None:
        own = max(stages, key=lambda e: e.memory.total)
    else:
        own = estimate_rank(cfg, hw, rank, cal)
    slowest = max(stages, key=lambda e: e.step_seconds)
    return dataclasses.replace(own, step_seconds=slowest.step_seconds, bubble_fraction=slowest.bubble_fraction,
                               tokens_per_s_per_gpu=slowest.tokens_per_s_per_gpu,
                               tflops_per_gpu=slowest.tflops_per_gpu, mfu=slowest.mfu)
