"""Initial weights as a function of (seed, parameter name) only.

Each parameter draws from its own generator, seeded from the run's seed and the parameter's name, so
its initial values do not depend on what else this process holds or initialises first: a whole model,
one pipeline stage, a tensor-parallel slice or an FSDP shard all start from the single-process values,
whether the model was built on the meta device and initialised after sharding or initialised whole
before it. A sharded parameter is drawn whole, one parameter at a time, and each rank keeps its
slice: peak extra memory is one full parameter. Draws happen on the parameter's device, so CPU and
CUDA runs of the same seed start from different (equally distributed) values.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

Init = Callable[..., object]
"""An nn.init-style function: init(tensor, generator=...) fills the tensor in place."""

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
"""Name segments that activation checkpointing and torch.compile add; not part of the name. (DDP and
DeepSpeed wrap the model after it is initialised.)"""


def canonical_name(name: str) -> str:
    """A parameter's name as the plain model calls it (its state-dict key)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the parameter `name` of a run seeded `seed`; stable across processes and
    Python versions (unlike hash())."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_param_(param: torch.Tensor, name: str, seed: int, init: Init) -> None:
    """Fill `param` (plain or a DTensor shard) with `init`'s draws from the generator of (seed, name)."""
    local = param.to_local() if isinstance(param, DTensor) else param
    if local.is_meta:  # a dry run (dist-llama-plan): shapes only, nothing to draw
        return
    generator = torch.Generator(device=local.device).manual_seed(param_seed(seed, name))
    if not isinstance(param, DTensor):
        init(param, generator=generator)
        return
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    init(full, generator=generator)
    # Every rank drew the same full tensor, so each takes its slice locally (no communication).
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
