"""Cross-entropy straight from the final hidden states, a chunk of tokens at a time.

The plain loss projects the whole micro-batch to logits [tokens, vocab] and keeps them (fp32, plus
their gradient in backward): with Llama 3's 128,256-entry vocabulary that is 4.2 GB for one
8,192-token sequence, often the largest buffer of the step. Here the output projection and the
loss run together over chunks of `chunk` tokens: forward keeps only each token's log-sum-exp, and
backward projects each chunk again, so at most one chunk's logits (and their gradient) exist at a
time. Costs one more output-projection matmul (the recompute), as activation checkpointing would.

Under tensor parallelism the output weight is column-parallel (Shard(0), a slice of the vocabulary
per rank): each rank projects to its vocabulary slice and the log-sum-exp and the target's logit are
all-reduced over the tp group per chunk (Megatron's vocab-parallel cross-entropy), so no rank ever
holds the whole vocabulary of a token either.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

CHUNK_LOGITS_BYTES = 256 * 2**20
"""The automatic chunk size keeps one chunk's fp32 logits on a rank at most this big."""


def auto_chunk_tokens(vocab_size: int, tp: int) -> int:
    """Tokens per chunk when train.loss_chunk_tokens is unset: as many as keep a chunk's fp32 logits
    (vocab / tp columns) within CHUNK_LOGITS_BYTES."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * -(-vocab_size // tp)))


def loss_chunk_tokens(setting: Optional[int], output_whole_after_forward: bool, vocab_size: int, tp: int) -> int:
    """train.loss_chunk_tokens (`setting`) resolved: None chunks wherever the loss can take the
    output weight after the forward (the engine's fact: everywhere but DeepSpeed ZeRO-3); even one
    chunk saves the logits kept for backward."""
    if setting is not None:
        return setting
    if not output_whole_after_forward:
        return 0
    return auto_chunk_tokens(vocab_size, tp)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ w.T against labels; h [N, D], w [V_local, D] (this rank's rows
    vocab_start.. of the vocabulary), labels [N] (global ids, ignore_index skipped)."""

    @staticmethod
    def forward(ctx, h, w, labels, chunk: int, ignore_index: int, group, vocab_start: int):
        n, v_local = h.shape[0], w.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 logits for bf16 inputs, as the plain loss
        lse = torch.empty(n, dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            logits = (h[s:s + chunk] @ w.t()).to(acc)
            local, inside = _local_labels(labels[s:s + chunk], vocab_start, v_local)
            target = logits.gather(1, local.unsqueeze(1)).squeeze(1) * inside
            top = logits.amax(dim=1)
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            # in place: the chunk's logits are the one big buffer here
            sums = torch.stack([logits.sub_(top[:, None]).exp_().sum(dim=1), target])
            del logits
            if group is not None:
                dist.all_reduce(sums, group=group)
            lse[s:s + chunk] = top + sums[0].log()
            valid = labels[s:s + chunk] != ignore_index
            total += torch.where(valid, lse[s:s + chunk] - sums[1], 0.0).sum()
        ctx.save_for_backward(h, w, labels, lse)
        ctx.chunk, ctx.ignore_index, ctx.vocab_start = chunk, ignore_index, vocab_start
        return total

    @staticmethod
    def backward(ctx, grad):
        h, w, labels, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # Accumulated over the chunks in fp32 and cast once, as FSDP's reduce does: a bf16 running sum
        # rounds at every chunk, so its error grew with their number (3.7e-2 at 256 chunks).
        acc = torch.promote_types(w.dtype, torch.float32)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            # softmax - one-hot(label) on this rank's vocabulary slice, 0 for ignored tokens
            probs = (hc @ w.t()).to(lse.dtype).sub_(lse[s:s + ctx.chunk, None]).exp_()
            local, inside = _local_labels(labels[s:s + ctx.chunk], ctx.vocab_start, w.shape[0])
            rows = torch.arange(len(hc), device=h.device)
            probs[rows, local] -= inside.to(probs.dtype)
            valid = labels[s:s + ctx.chunk] != ctx.ignore_index
            g = probs.mul_((valid * grad)[:, None]).to(h.dtype)
            del probs
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[s:s + ctx.chunk])
            if grad_w is not None:
                _addmm_fp32(grad_w, g.t(), hc)
            del g  # before the next chunk's logits exist
        if grad_w is not None:
            grad_w = grad_w.to(w.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into an fp32 accumulator. On CUDA the bf16 matmul writes fp32 itself (cuBLAS's
    fp32 output); elsewhere the inputs are upcast, which on CPU is what a bf16 matmul does inside."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _local_labels(labels: torch.Tensor, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as indices into this rank's vocabulary slice (0 where outside it), and whether inside."""
    local = labels - start
    inside = (local >= 0) & (local < size)
    return torch.where(inside, local, 0), inside


def chunked_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                     ignore_index: int = -100, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ weight.T against labels, as token_loss_sum on the
    output projection's logits would give, without the whole micro-batch's logits ever existing.

    h: the final (normed) hidden states [B, S, D]: a plain tensor, or under tensor parallelism a
    DTensor sharded on the sequence (Shard(1)). weight: the output projection's weight [vocab, D], or
    its vocab-sharded DTensor (Shard(0) on the tp mesh). labels: [B, S] plain int64.
    compute_dtype: the dtype of the projection (autocast's); the loss itself is always fp32.
    Returns a plain fp32 scalar, equal on every tp rank.
    """
    group, start = None, 0
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"the output weight must be vocab-sharded on a 1-D mesh, got {weight.placements}")
        # Integer arithmetic (torch.chunk's rule): DTensor's own offset helper indexes a tensor,
        # which a FakeTensorMode (the planner's memory dry run) cannot read a number from.
        _, start = Shard.local_shard_size_and_offset(weight.shape[0], mesh.size(), mesh.get_local_rank())
        group = mesh.get_group()
        if isinstance(h, DTensor):
            # every rank projects all tokens onto its vocabulary slice; the gradient of h is then
            # a partial sum over the slices, which DTensor reduce-scatters back to sequence shards
            h = h.redistribute(placements=(Replicate(),)).to_local(grad_placements=(Partial(),))
        weight = weight.to_local()
    elif isinstance(h, DTensor):
        raise ValueError("sequence-sharded hidden states need the vocab-sharded output weight of the same tp mesh")
    if compute_dtype is not None:
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
    return _ChunkedCrossEntropy.apply(h.flatten(0, 1), weight, labels.flatten(), chunk, ignore_index, group, start)
