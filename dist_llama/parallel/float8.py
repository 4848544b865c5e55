"""float8 training of the transformer blocks' linear layers (train.float8), through torchao.

Each block's wq/wk/wv/wo and w1/w2/w3 become torchao's Float8Linear (tensorwise dynamic scaling,
torchao's default recipe): inputs and weights are cast to e4m3 and gradients to e5m2 for the three
matmuls, with higher-precision accumulation, so the parameters and the optimizer stay as they were
(same names, same dtype, same checkpoints). The output projection stays in high precision (its
logits feed the loss, and torchao and torchtitan leave it out too); so do embeddings and norms.

Under FSDP2 the weights are all-gathered in float8 (half the bytes of bf16), with their scales
computed for all blocks at once after each optimizer step (one all-reduce instead of one per layer).

torchao is imported only here and only when train.float8 is on; validation has already required a
CUDA device of compute capability 8.9 or more (H100, H200, L4, RTX 4090) and torchao installed.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from torch import nn

TORCHAO = "torchao==0.18.0"
"""The torchao release this path is written against (installs beside torch 2.13 without touching it)."""


def missing_torchao() -> Optional[str]:
    """Why train.float8 cannot run in this environment, or None."""
    if importlib.util.find_spec("torchao") is None:
        return f"needs torchao: pip install {TORCHAO}"
    return None


def float8_all_gather(engine, dims) -> bool:
    """Whether the engine (its EngineFacts) all-gathers float8 weights: FSDP2, when parameters are sharded."""
    return engine.float8_all_gather and dims.dp_shard * dims.cp > 1


def _float8_eligible(module: nn.Module, fqn: str) -> bool:
    # cuBLAS float8 matmuls need both dimensions divisible by 16; the output layer stays high precision.
    return (isinstance(module, nn.Linear) and fqn.split(".")[-1] != "output"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: nn.Module, fsdp_all_gather: bool) -> None:
    """Swap the eligible nn.Linear of `model` for Float8Linear, in place (parameter names unchanged).
    Before tensor parallelism, compile and FSDP: they see the float8 modules."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_all_gather)
    convert_to_float8_training(model, module_filter_fn=_float8_eligible, config=config)


def precompute_scales_after_step(part: nn.Module, optimizer) -> None:
    """After every step of `optimizer`, compute the float8 scales of `part`'s sharded weights in one
    all-reduce for the next forward's float8 all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(part))
