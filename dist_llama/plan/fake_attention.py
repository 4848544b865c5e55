"""The CUDA target's attention, for the fake step: what FlexAttention allocates, not what the CPU
code path (SDPA with a boolean [B, 1, S, S] document mask) does.

On CUDA the model runs FlexAttention (model.llama.resolve_attn_impl: "auto" is flex there), whose
fused kernels keep no S x S tensor. What they allocate, from torch's own fake implementations of
the flex_attention / flex_attention_backward higher-order ops (torch/_higher_order_ops/
flex_attention.py, `flex_attention_fake_impl` and `flex_attention_backward_fake_tensor_mode`):
forward, the output [B, Hq, S, D] in the inputs' dtype and the log-sum-exp [B, Hq, S] in fp32, both
kept for backward with q, k, v; backward, dq [B, Hq, S, D], dk and dv [B, Hkv, S, D] (GQA: K/V are
not expanded) and the fp32 `delta` row sums [B, Hq, S] (a temporary). The block mask is built once
per forward: for each of its four index sets (kv, full kv, q, full q) counts [B, 1, S/128] and
indices [B, 1, S/128, S/128], int32. SDPA's flash kernel allocates the same output and log-sum-exp.
The CPU path instead decomposes SDPA into matmul + softmax with an S x S score tensor per head,
kept for backward: that is why the fake step's activations grew faster than the sequence.

The fake step swaps this in for the CoreAttention/AttentionMask of each layer when the target is
CUDA. Context parallelism's modules (parallel/context.py) keep their K/V all-gather and attend the
local queries to the gathered keys the same way: on CUDA they get a BlockMask of S_loc x S_full, so
FlexAttention takes the gathered K/V unexpanded and saves them for backward, where the CPU path
expands them to every query head (cp times the local queries' size, twice).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

BLOCK = 128
"""FlexAttention's default block size (_DEFAULT_SPARSE_BLOCK_SIZE)."""


class FakeBlockMask:
    """The int32 tensors of a FlexAttention BlockMask of this shape, with none of its logic."""

    def __init__(self, batch: int, q_len: int, kv_len: int, device: torch.device):
        q_blocks, kv_blocks = -(-q_len // BLOCK), -(-kv_len // BLOCK)
        # kv and full kv index the key blocks of each query block; q and full q the transpose.
        self.tensors = [t for rows, cols in ((q_blocks, kv_blocks),) * 2 + ((kv_blocks, q_blocks),) * 2 for t in (
            torch.empty(batch, 1, rows, dtype=torch.int32, device=device),
            torch.empty(batch, 1, rows, cols, dtype=torch.int32, device=device))]


class _FlexLikeAttention(torch.autograd.Function):
    """Allocates what the fused kernel does; computes nothing (its inputs are fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):  # [B, H, S, D]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        q.new_empty(q.shape[:-1], dtype=torch.float32)  # the row maxima, returned and dropped
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        delta = q.new_empty(q.shape[:-1], dtype=torch.float32)  # noqa: F841  (freed on return)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _core_forward(self, xq, xk, xv, mask):
    xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, S, head_dim], views
    return _FlexLikeAttention.apply(xq, xk, xv).transpose(1, 2)


def _cp_core_forward(self, xq, xk, xv, mask):
    return _core_forward(self, xq, *self.gather_kv(xk, xv), mask)


def _mask_forward(self, doc_ids, seq_len, device):
    return FakeBlockMask(1 if doc_ids is None else doc_ids.shape[0], seq_len, seq_len, device)


def _cp_mask_forward(self, doc_ids, seq_len, device):
    return FakeBlockMask(1 if doc_ids is None else doc_ids.shape[0], seq_len, seq_len * self.cp_mesh.size(), device)


@contextlib.contextmanager
def cuda_attention(parts: list[nn.Module]):
    """Within: each CoreAttention and AttentionMask of `parts`, context parallel or not, allocates
    as FlexAttention on CUDA does (see the module docstring)."""
    from dist_llama.model.llama import AttentionMask, CoreAttention
    from dist_llama.parallel.context import CPAttentionMask, CPCoreAttention

    forwards = {CoreAttention: _core_forward, AttentionMask: _mask_forward,
                CPCoreAttention: _cp_core_forward, CPAttentionMask: _cp_mask_forward}
    swapped = []
    for part in parts:
        for module in part.modules():
            if type(module) in forwards:
                swapped.append(module)
                module.forward = types.MethodType(forwards[type(module)], module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward
