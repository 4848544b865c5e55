"""Context parallelism as in Llama 3 (§3.3.2): the sequence is split into 2·cp chunks and cp rank i
holds chunks i and 2·cp−1−i, so every rank gets the same share of the causal attention work. Each
layer all-gathers K and V over the cp group and attends its local queries to all keys. Not a ring, as
Llama 3: any mask (documents) is easy this way, and with GQA K/V are small next to Q, so the gather
costs little.

The model is not changed, only two parameterless submodules are swapped: `Transformer.mask` builds a
[local queries × all keys] mask by ORIGINAL token index, and every `Attention.core` gathers K/V
before attending. The caller shards tokens, labels, doc_ids and positions with `cp_shard` (or
`cp_shard_batch`); RoPE then uses the original positions that travel with the tokens.

Gradients: the K/V all-gather's backward reduce-scatters (sums) K/V gradients back to their owners,
so each rank's parameter gradients are its share of the full gradient, and summing them over the cp
ranks gives the single-process gradient. Fold cp into the data-parallel reduction (`dp_cp` /
`dp_shard_cp`) and scale the loss by that group's size, as for data parallelism.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from ..model.llama import (Attention, CoreAttention, Mask, Transformer, compiled_create_block_mask,
                           resolve_attn_impl)

# torch 2.13 renamed these (the old names warn); older builds have only the old names.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _check_divisible(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(f"context parallel needs seq_len divisible by 2*cp: seq_len={seq_len}, 2*cp={2 * cp_size}")


def cp_shard(x: Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> Tensor:
    """The load-balanced local part of `x` along `dim`: chunks cp_rank and 2·cp−1−cp_rank of 2·cp."""
    _check_divisible(x.size(dim), cp_size)
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim)


def cp_global_indices(seq_len: int, cp_rank: int, cp_size: int, device=None) -> Tensor:
    """Original positions (0..seq_len-1) of the tokens cp_rank holds, in local order."""
    return cp_shard(torch.arange(seq_len, device=device), cp_rank, cp_size, dim=0)


def cp_gathered_indices(seq_len: int, cp_size: int, device=None) -> Tensor:
    """Original positions of an all-gather of the local parts (rank 0's two chunks, rank 1's, ...)."""
    _check_divisible(seq_len, cp_size)
    order = torch.arange(seq_len, device=device).view(2 * cp_size, -1)
    firsts = torch.arange(cp_size)
    pairs = torch.stack([firsts, 2 * cp_size - 1 - firsts], dim=1).flatten().to(order.device)
    return order[pairs].flatten()


def cp_unshard(parts: Sequence[Tensor], dim: int = 1) -> Tensor:
    """Inverse of cp_shard: the local parts of all cp ranks (in rank order) back in original order."""
    gathered = torch.cat(list(parts), dim)
    order = cp_gathered_indices(gathered.size(dim), len(parts), device=gathered.device)
    return gathered.index_select(dim, torch.argsort(order))


def cp_shard_batch(batch: dict[str, Optional[Tensor]], cp_rank: int, cp_size: int) -> dict[str, Optional[Tensor]]:
    """Shard every [B, S] tensor of a batch (tokens, labels, doc_ids, positions) along S. Positions
    are filled in as 0..S-1 when absent: the model's default would number the local tokens from 0."""
    tokens = batch["tokens"]
    out = {k: (None if v is None else cp_shard(v, cp_rank, cp_size)) for k, v in batch.items()}
    if out.get("positions") is None:
        full = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        out["positions"] = cp_shard(full, cp_rank, cp_size)
    return out


def build_cp_attention_mask(
    doc_ids: Optional[Tensor], full_doc_ids: Optional[Tensor], seq_len: int, cp_rank: int, cp_size: int,
    device: torch.device, attn_impl: str,
) -> Mask:
    """Mask of cp_rank's seq_len local queries against the all-gathered keys (gathered order, see
    cp_gathered_indices): causal by original index, and within the same document when doc_ids
    (local [B, S_loc]) and full_doc_ids (gathered [B, S_full]) are given. A BlockMask with
    Q_LEN=S_loc, KV_LEN=S_full for "flex"; else bool [B or 1, 1, S_loc, S_full] (True = attend).
    A query always sees its own key, so no row is fully masked."""
    full_len = seq_len * cp_size
    q_pos = cp_global_indices(full_len, cp_rank, cp_size, device=device)
    kv_pos = cp_gathered_indices(full_len, cp_size, device=device)
    if resolve_attn_impl(attn_impl, device) == "flex":
        if doc_ids is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return q_pos[q_idx] >= kv_pos[kv_idx]

            batch = None
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_pos[q_idx] >= kv_pos[kv_idx]) & (doc_ids[b, q_idx] == full_doc_ids[b, kv_idx])

            batch = doc_ids.shape[0]
        return compiled_create_block_mask()(mask_mod, batch, None, seq_len, full_len, device=device)

    mask = q_pos[:, None] >= kv_pos[None, :]  # [S_loc, S_full]
    if doc_ids is None:
        return mask[None, None]
    return (mask & (doc_ids[:, :, None] == full_doc_ids[:, None, :])).unsqueeze(1)


class CPAttentionMask(nn.Module):
    """Gathers the document ids over the cp group and builds the mask of the local queries against
    all keys (build_cp_attention_mask)."""

    def __init__(self, attn_impl: str, cp_mesh: DeviceMesh):
        super().__init__()
        self.attn_impl = attn_impl
        self.cp_mesh = cp_mesh

    def forward(self, doc_ids: Optional[Tensor], seq_len: int, device: torch.device) -> Mask:
        cp_size, cp_rank = self.cp_mesh.size(), self.cp_mesh.get_local_rank()
        full_doc_ids = None
        if doc_ids is not None:
            full_doc_ids = _all_gather(doc_ids.contiguous(), 1, self.cp_mesh)
            if isinstance(full_doc_ids, funcol.AsyncCollectiveTensor):  # the flex closure needs a plain tensor
                full_doc_ids = full_doc_ids.wait()
        return build_cp_attention_mask(doc_ids, full_doc_ids, seq_len, cp_rank, cp_size, device, self.attn_impl)


class CPCoreAttention(CoreAttention):
    """All-gathers K and V over the cp group, then attends the local queries to every key. The
    gather's backward sums the K/V gradients back to the ranks that own them."""

    def __init__(self, cp_mesh: DeviceMesh):
        super().__init__()
        self.cp_mesh = cp_mesh

    def forward(self, xq: Tensor, xk: Tensor, xv: Tensor, mask: Mask) -> Tensor:
        # None would mean SDPA's is_causal, which aligns the diagonal top-left: wrong for S_loc x S_full.
        if mask is None:
            raise ValueError("context-parallel attention needs the mask of CPAttentionMask, got None")
        xk, xv = self.gather_kv(xk, xv)
        return super().forward(xq, xk, xv, mask)

    def gather_kv(self, xk: Tensor, xv: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S_loc, H_kv, D] each -> [B, S_full, H_kv, D] each (gathered order)."""
        # One collective for both: [2, B, S_loc, H_kv, D] -> [2, B, S_full, H_kv, D]. Gathered before
        # the GQA repeat, so only the K/V heads travel.
        kv = _all_gather_autograd(torch.stack((xk, xv)), 2, self.cp_mesh)
        return kv[0], kv[1]


def apply_cp(model: Transformer, cp_mesh: DeviceMesh) -> None:
    """Make `model` context parallel over the 1-D `cp_mesh`, in place. Its inputs must then be the
    local parts from cp_shard (tokens, doc_ids and, always, positions). Parameters and state dict
    keys are unchanged. A cp mesh of size 1 leaves the model as it is."""
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs a 1-D cp mesh, got {cp_mesh.ndim} dims")
    if cp_mesh.size() == 1:
        return
    model.mask = CPAttentionMask(model.mask.attn_impl, cp_mesh)
    # modules(), not model.layers: pipeline stages drop layers and wrappers may sit in between.
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.core = CPCoreAttention(cp_mesh)
