"""Applied to each model part after tensor / context parallelism and the pipeline split, in this
order: activation checkpointing → torch.compile → FSDP2 fully_shard / HSDP (or DDP last)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dist_llama.parallel.dims import Meshes, ParallelDims


def apply_ac(model: nn.Module, mode: str, every: int, first: int = 0) -> None:
    """Recompute blocks' activations in backward: all of them (full), or one in `every` (selective).

    `first` is how many blocks this rank's earlier parts hold (pipeline stages of one rank): the
    count runs over the rank's blocks, not each part's, so a rank of seven one-block stages
    recomputes four of them under every 2, not all seven (each part's first block), and memory stays
    even across pipeline ranks. Wrapped blocks keep their parameter names in state dicts (DCP strips
    the wrapper's prefix)."""
    for i, (name, block) in enumerate(list(model.layers.items()), start=first):
        if mode == "full" or (mode == "selective" and i % every == 0):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged), so FSDP hooks stay outside the graphs."""
    for block in model.layers.values():
        block.compile()


def apply_fsdp(model: nn.Module, dims: ParallelDims, meshes: Meshes, param_dtype: torch.dtype,
               reshard_after_forward: bool) -> nn.Module:
    """fully_shard each block, then the root; a 2-D (replicate, shard) mesh makes it HSDP.

    Gradients are reduced in fp32 whatever the compute dtype (Llama 3 §3.3.2).
    """
    # cp ranks hold the same weights and see different tokens, so they shard parameters like dp ranks.
    mesh = meshes.world["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else meshes.dp_shard_cp
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block is needed again at once by backward: resharding it would only re-gather.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    # The root (embeddings, norm, output) is not resharded after forward: backward needs it at once,
    # and the chunked loss (parallel/loss.py) applies `output` after the model's forward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def apply_ddp(model: nn.Module, meshes: Meshes, device: torch.device) -> nn.Module:
    """Replicate over every data-parallel and context-parallel rank (dp_replicate x dp_shard x cp).

    Buffers are not broadcast: the model's only buffer (RoPE frequencies) is computed alike on every
    rank, and a broadcast at the start of each forward would be a blocking collective inside the
    compute time the straggler check measures."""
    return DistributedDataParallel(
        model, process_group=meshes.dp_cp.get_group(), broadcast_buffers=False,
        device_ids=[device.index] if device.type == "cuda" else None)
