"""What each data-parallel engine is (parallel.engine), in one torch-free table: the facts
validation, the loss, float8, the data plan and the planner need. The only place that compares an
engine's name; everything else asks `engine_facts(parallel)`.

Adding an engine: a row here, its class in `train/engines/` (registered in `ENGINE_CLASSES` there),
its costs in `plan/engine_costs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EngineFacts:
    """One engine under one parallel config (the ZeRO stage decides some facts)."""

    name: str
    """The parallel.engine value."""
    shards_over_dp: bool
    """Whether parameters, gradients and optimizer states are split over the data-parallel ranks."""
    tp_pp: bool
    """Whether it composes with tensor and pipeline parallelism."""
    cp_hsdp: bool
    """Whether it composes with context parallelism and HSDP replicas (parallel.dp_replicate)."""
    output_whole_after_forward: bool
    """Whether the output weight can be read whole after the model's forward (the chunked loss needs it)."""
    float8: bool
    """Whether float8 linear layers train under it (train.float8)."""
    float8_all_gather: bool
    """Whether it all-gathers float8 weights when parameters are sharded (FSDP2 with float8)."""
    compile_default_cuda: bool
    """train.compile's default on CUDA under it."""
    fixed_global_batch: bool
    """Whether its configuration fixes the global batch at start (no per-stage batch sizes)."""
    zero_stages: tuple[int, ...] = ()
    """The ZeRO stages parallel.zero_stage may name (empty: the key is not used)."""
    offload_optimizer: bool = False
    """Whether parallel.offload_optimizer is allowed."""
    offload_params: bool = False
    """Whether parallel.offload_params is allowed."""
    second_trained_model: bool = True
    """Whether a second model with its own optimizer can train beside the policy (PPO's value model)."""
    reduce_choice: bool = False
    """Whether parallel.reduce_every_micro_batch=false is its to honour (FSDP; DDP always reduces once per step)."""


def _fsdp(p) -> EngineFacts:
    return EngineFacts("fsdp", shards_over_dp=True, tp_pp=True, cp_hsdp=True, output_whole_after_forward=True, float8=True,
                       float8_all_gather=True, compile_default_cuda=True, fixed_global_batch=False, reduce_choice=True)


def _ddp(p) -> EngineFacts:
    return EngineFacts("ddp", shards_over_dp=False, tp_pp=False, cp_hsdp=True, output_whole_after_forward=True, float8=True,
                       float8_all_gather=False, compile_default_cuda=True, fixed_global_batch=False)


def _deepspeed(p) -> EngineFacts:
    # ZeRO-3 holds the output weight whole only inside the model's forward; per-block compiled graphs
    # would have to trace through ZeRO-3's gathering hooks (DeepSpeed compiles with its own engine).
    zero3 = p.zero_stage == 3
    return EngineFacts("deepspeed", shards_over_dp=True, tp_pp=False, cp_hsdp=False, output_whole_after_forward=not zero3,
                       float8=False, float8_all_gather=False, compile_default_cuda=False, fixed_global_batch=True,
                       zero_stages=(1, 2, 3), offload_optimizer=True, offload_params=zero3, second_trained_model=False)


ENGINES = {"fsdp": _fsdp, "ddp": _ddp, "deepspeed": _deepspeed}
"""parallel.engine → its facts under a parallel config."""


def engine_facts(p) -> Optional[EngineFacts]:
    """The facts of p.engine (p: a ParallelConfig), or None for a name no engine has."""
    make = ENGINES.get(p.engine)
    return make(p) if make is not None else None
