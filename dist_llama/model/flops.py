# Parameter counts, training FLOPs per token and MFU, in closed form from ModelArgs, so the planner
# can price a 405B model without building it.

import math
import time
from typing import Tuple

import torch

from .args import ModelArgs, ffn_hidden_dim

H100_BF16_PEAK = 989e12
"""Dense BF16 tensor-core peak of one H100 SXM, FLOP/s (no sparsity)."""


def count_params(args: ModelArgs) -> Tuple[int, int]:
    """(total, non_embedding) parameter counts of Transformer(args).

    non_embedding excludes both tok_embeddings and output (untied), as in the PaLM FLOPs formula,
    whose 6N term counts matmul FLOPs and treats the embedding lookup as free and the output
    projection as negligible; it still includes the RMSNorm weights."""
    assert args.vocab_size > 0, "vocab_size must be set"
    head_dim = args.dim // args.n_heads
    attention = args.dim * head_dim * (2 * args.n_heads + 2 * args.kv_heads)  # wq, wo + wk, wv
    feed_forward = 3 * args.dim * ffn_hidden_dim(args)
    norms = 2 * args.dim
    non_embedding = args.n_layers * (attention + feed_forward + norms) + args.dim  # + final norm
    embedding_and_output = 2 * args.vocab_size * args.dim
    return non_embedding + embedding_and_output, non_embedding


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM (arXiv:2204.02311, App. B):
    6 N + 12 L H Q T, with N non-embedding parameters, L layers, H heads, Q head dim, T sequence
    length. The second term is the attention score/value matmuls, counted for the full (not
    causal-halved) S x S matrix as PaLM does."""
    _, n = count_params(args)
    head_dim = args.dim // args.n_heads
    return 6 * n + 12 * args.n_layers * args.n_heads * head_dim * seq_len


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]. tokens_per_sec and peak_flops must describe the same
    hardware: per-device throughput with one device's peak, or global throughput with peak x devices."""
    return tokens_per_sec * flops_per_token / peak_flops


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Achieved fp32 matmul FLOP/s on this CPU (best of `repeats` n x n x n products), a practical
    stand-in for a datasheet peak when computing MFU on CPU runs."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm up (thread pool, allocator)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9)
