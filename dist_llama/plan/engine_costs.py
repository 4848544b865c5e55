"""What each data-parallel engine costs one rank: its model states (parameters, master copy,
gradients, optimizer states, gathered weights, buffers, host memory) and its gradient/parameter
traffic per step. One class per engine, looked up by name in ENGINE_COSTS (config/engines.py holds
what the engines are; this module what they cost)."""

from __future__ import annotations

import math

from dist_llama.plan.hardware import Hardware
from dist_llama.plan.links import Collective, Links, collective, group_spans_nodes

DEEPSPEED_REDUCE_BUCKET = 5e8
"""DeepSpeed's default zero_optimization.reduce_bucket_size, elements. With contiguous_gradients (on
by default) ZeRO-1/2 allocate one bucket of it in the compute dtype at each backward and ZeRO-3 one
flat buffer of it at init (deepspeed/runtime/zero/stage_1_and_2.py backward(), stage3.py), whatever
the model size; the reduce-scatters go bucket by bucket."""
DEEPSPEED_GRAD_COMM_BYTES = 4
"""dist_llama's ds_config reduces gradients in fp32 (communication_data_type), as FSDP does."""
DEEPSPEED_PREFETCH_BUCKET = 5e7
"""DeepSpeed's default stage3_prefetch_bucket_size, elements ZeRO-3 gathers ahead of use."""


def _replica_states(psi: float, c: int, buffers: float) -> dict:
    """Every parameter on this rank: the fp32 parameters themselves; autocast keeps a compute-dtype
    copy of every weight it casts for backward."""
    return {"params": 4 * psi, "master": 0.0, "grads": 4 * psi, "optimizer": 8 * psi,
            "gathered": 0.0 if c == 4 else c * psi, "buffers": buffers, "host": 0.0}


class FSDPCosts:
    """FSDP2 over dp_shard x cp (HSDP replicas hold copies)."""

    def describe(self, p) -> str:
        return "fsdp"

    def shards(self, p) -> int:
        return p.dp_shard * p.cp

    def params_sharded(self, p) -> bool:
        return p.data_parallel

    def model_states(self, p, psi: float, block_params: float, c: int, root_params: float = 0.0) -> dict:
        if not p.data_parallel:
            return _replica_states(psi, c, 0.0)
        n = self.shards(p)
        # fp32 shards stepped in place; gradients reduce-scattered in fp32 (Llama 3 §3.3.2). In
        # backward: the root (embeddings, norm, output; never resharded after forward), the block
        # being differentiated and the next one, prefetched; and the last block's reduce-scatter,
        # its whole fp32 gradient in and this rank's shard out.
        gathered = psi if not p.reshard_after_forward else min(psi, 2 * block_params + root_params)
        buffers = (4 + 4 / n) * block_params if n > 1 else 0.0
        return {"params": 4 * psi / n, "master": 0.0, "grads": 4 * psi / n, "optimizer": 8 * psi / n,
                "gathered": c * gathered, "buffers": buffers, "host": 0.0}

    def casts_weights(self, p) -> bool:
        return p.data_parallel

    def deferred_states(self, p, psi: float, c: int) -> dict | None:
        """None when gradients are reduce-scattered after every micro-batch; else what changes when
        the reduction waits for the last one (by parallel.reduce_every_micro_batch=false, or always
        under a pipeline, whose torch stages call set_requires_gradient_sync(False) before it): the
        caller holds the whole fp32 gradients (plan/pipeline_memory.py follows them through the
        schedule, with the weights the multi-stage runtime keeps unsharded), and no reduce-scatter
        buffer is live at the peak. (A single-stage pipeline's weights also stay gathered after
        each backward, but the next forward reshards them, so the peak, early in a backward, sees
        the usual gathered blocks.)"""
        if not p.data_parallel or (p.pp == 1 and p.reduce_every_micro_batch):
            return None
        return {"buffers": 0.0}

    def collectives(self, p, psi: float, layers: int, n_micro: int, c: int, hw: Hardware, links: Links,
                    overlap: float) -> list[Collective]:
        if not p.data_parallel:
            return []
        n, out = self.shards(p), []
        bw = links.network if group_spans_nodes(p.tp, n, hw) else links.nvlink
        if n > 1:
            # Compute-dtype all-gather (once per step when weights are kept after forward, else
            # forward and backward of every micro-batch); fp32 gradient reduce-scatter after every
            # micro-batch (train/engines/fsdp.py) unless deferred to the last one (by the setting,
            # or by a pipeline's stages).
            gathers = 1 if not p.reshard_after_forward else 2 * n_micro
            reduces = n_micro if p.pp == 1 and p.reduce_every_micro_batch else 1
            volume = (gathers * c + reduces * 4) * (n - 1) / n * psi
            out.append(collective("fsdp all-gather/reduce-scatter", volume, bw,
                                  (gathers + reduces) * (layers + 1), links, overlap))
        if p.dp_replicate > 1:
            volume = 2 * (p.dp_replicate - 1) / p.dp_replicate * 4 * psi / n
            out.append(collective("hsdp all-reduce (replicas)", volume, links.network, layers + 1, links, overlap))
        return out


class DDPCosts:
    """DDP over dp x cp: every rank a full replica."""

    def describe(self, p) -> str:
        return "ddp"

    def shards(self, p) -> int:
        return 1

    def params_sharded(self, p) -> bool:
        return False

    def model_states(self, p, psi: float, block_params: float, c: int, root_params: float = 0.0) -> dict:
        # The reducer holds its own flat gradient buckets, as large as the gradients
        # (gradient_as_bucket_view is off in apply_ddp).
        return _replica_states(psi, c, 4 * psi if p.data_parallel else 0.0)

    def casts_weights(self, p) -> bool:
        return False  # autocast

    def deferred_states(self, p, psi: float, c: int) -> dict | None:
        return None  # the replica's gradients are whole already

    def collectives(self, p, psi: float, layers: int, n_micro: int, c: int, hw: Hardware, links: Links,
                    overlap: float) -> list[Collective]:
        if not p.data_parallel:
            return []
        bw = links.network if group_spans_nodes(p.tp, p.dp_cp, hw) else links.nvlink
        volume = 2 * (p.dp_cp - 1) / p.dp_cp * 4 * psi
        return [collective("ddp all-reduce", volume, bw, layers + 1, links, overlap)]


class ZeroCosts:
    """DeepSpeed ZeRO-1/2/3 over the data-parallel ranks, after the ZeRO paper (Rajbhandari et al.
    2020, Fig. 1) with K = 12 (fp32 master, Adam m and v): compute-dtype weights and gradients,
    ZeRO-1 partitions the K states, ZeRO-2 the gradients too, ZeRO-3 the weights too; DeepSpeed keeps
    its fp32 master partition even for fp32 weights (it clones them). Offloading the optimizer moves
    the K states to the host, plus an fp32 gradient partition the CPU Adam steps with; offloading
    parameters (ZeRO-3) moves the weight partition."""

    def describe(self, p) -> str:
        offload = [name for name, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on]
        return f"deepspeed ZeRO-{p.zero_stage}" + (f" (offload {'+'.join(offload)})" if offload else "")

    def shards(self, p) -> int:
        return p.dp_shard

    def params_sharded(self, p) -> bool:
        return p.zero_stage == 3

    def model_states(self, p, psi: float, block_params: float, c: int, root_params: float = 0.0) -> dict:
        n, stage = self.shards(p), p.zero_stage
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

    def casts_weights(self, p) -> bool:
        return True  # DeepSpeed's bf16 mode

    def deferred_states(self, p, psi: float, c: int) -> dict | None:
        return None  # dist_llama runs DeepSpeed without pipeline parallelism

    def collectives(self, p, psi: float, layers: int, n_micro: int, c: int, hw: Hardware, links: Links,
                    overlap: float) -> list[Collective]:
        n, out = self.shards(p), []
        bw = links.network if group_spans_nodes(p.tp, n, hw) else links.nvlink
        # Weights travel in the compute dtype, gradients in fp32 (ds_config's communication_data_type).
        weights, grads = (n - 1) / n * psi * c, (n - 1) / n * psi * DEEPSPEED_GRAD_COMM_BYTES
        buckets = max(1, math.ceil(psi / DEEPSPEED_REDUCE_BUCKET))
        if p.zero_stage == 3:
            # Like FSDP: gather forward and backward, reduce-scatter gradients, every micro-batch;
            # overlap_comm is on by default for ZeRO-3.
            if n > 1:
                out.append(collective("zero-3 all-gather/reduce-scatter", n_micro * (2 * weights + grads), bw,
                                      3 * n_micro * (layers + 1), links, overlap))
        elif n > 1:
            # ZeRO-2 reduce-scatters every micro-batch's gradients into the partitions, ZeRO-1 once;
            # then the updated partitions are all-gathered after the step. overlap_comm is off by
            # default for stages 1/2 and the all-gather follows the step: nothing hides.
            reduces = n_micro if p.zero_stage == 2 else 1
            out.append(collective(f"zero-{p.zero_stage} reduce-scatter grads", reduces * grads, bw,
                                  reduces * buckets, links, 0.0))
            out.append(collective(f"zero-{p.zero_stage} all-gather params", weights, bw, buckets, links, 0.0))
        if p.offload_optimizer and links.host > 0:
            # Gradient partition to the host, updated weights back, around the CPU step.
            out.append(collective("offload optimizer (pcie)", 2 * c * psi / n, links.host, 2, links, 0.0))
        if p.offload_params and links.host > 0:
            out.append(collective("offload params (pcie)", 2 * n_micro * c * psi / n, links.host,
                                  2 * n_micro * (layers + 1), links, overlap))
        return out


ENGINE_COSTS = {"fsdp": FSDPCosts(), "ddp": DDPCosts(), "deepspeed": ZeroCosts()}
"""parallel.engine → its costs."""


def engine_costs(p):
    """The costs of p.engine (p: a validated ParallelConfig)."""
    return ENGINE_COSTS[p.engine]


def model_states(p, params_rank: float, block_params: float, c: int) -> dict:
    """Device bytes of parameters, master copy, gradients, AdamW states, gathered weights and engine
    buffers of a rank computing with params_rank parameters (its stages and TP slice; blocks of
    block_params), c bytes per compute-dtype element; and what ZeRO offload keeps on the host."""
    return engine_costs(p).model_states(p, params_rank, block_params, c)
