"""Checks across ranks: stragglers (ranks whose own compute time is far above the median), silent
data corruption (data-parallel replicas whose parameters should be byte-identical but are not:
Megatron's check_weight_hash_across_dp_replicas; Llama 3 saw 6 SDC interruptions in 54 days), and
the preflight before training (a matmul with a known answer and a small all-reduce).
"""

from __future__ import annotations

import collections
import hashlib
import statistics
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.parallel.env import node_name


# --- stragglers ----------------------------------------------------------------------------------
def _collective_device(group) -> torch.device:
    """NCCL-only groups take CUDA tensors; gloo (and cpu:gloo,cuda:nccl) take CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def find_stragglers(step_time: float, group=None, factor: float = 2.0) -> list[tuple[int, float]]:
    """(global rank, step time) of every rank in `group` (default: world) whose step time is above
    factor x the median, sorted by rank. A collective: every rank of the group calls it, and all get
    the same answer. Callers pass a robust time (StragglerCheck: the rank's median over the
    interval's steps), not one step's, which a rank preempted once can inflate.

    The median is the LOWER median: with an even count the mean of the middle two would let no rank
    of two ever exceed 2x it (b > (a + b) is impossible); the lower one compares the slower of two
    ranks with the faster.

    The times must be each rank's own work, not wall time of a synchronous step: in lockstep
    training a slow rank makes everyone wait inside collectives, so raw step times come out equal.
    """
    times = torch.tensor([float(step_time)], dtype=torch.float64, device=_collective_device(group))
    gathered = [torch.empty_like(times) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, times, group=group)
    values = [float(t.item()) for t in gathered]
    median = statistics.median_low(values)
    return [(rank, t) for rank, t in zip(_group_ranks(group), values) if t > factor * median]


# --- silent data corruption ----------------------------------------------------------------------
def _local_data(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def param_hash(parts: list[nn.Module]) -> int:
    """64-bit BLAKE2b of this rank's local parameter bytes (DTensor: the local shard), parameters
    in name order within each part, names and shapes included. Byte-exact: -0.0 and 0.0 differ,
    as do NaNs with different payloads; == on values would miss both."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        for name, p in sorted(part.named_parameters(), key=lambda kv: kv[0]):
            local = _local_data(p.detach())
            h.update(f"{name}:{local.dtype}:{tuple(local.shape)};".encode())
            raw = local.contiguous().reshape(-1).view(torch.uint8).cpu()
            h.update(memoryview(raw.numpy()))
    return int.from_bytes(h.digest(), "little")


def check_replicas(parts: list[nn.Module], group) -> list[int]:
    """Global ranks of `group` whose parameter hash differs from the majority; [] when all agree.

    A collective over `group`. With no strict majority (two replicas that disagree, or a three-way
    split) there is no telling which copy is right, so every rank of the group is returned.
    Each rank only learns about its own group: OR the result across the world before acting.
    """
    value = param_hash(parts)
    # int64 carries the 64-bit hash bit for bit (two's complement) and all-gathers on gloo and NCCL.
    signed = value - (1 << 64) if value >= 1 << 63 else value
    mine = torch.tensor([signed], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    hashes = [int(t.item()) for t in gathered]
    ranks = _group_ranks(group)
    (majority, count), = collections.Counter(hashes).most_common(1)
    if count == len(hashes):
        return []
    if 2 * count <= len(hashes):
        return list(ranks)
    return [r for r, h in zip(ranks, hashes) if h != majority]


# --- preflight -----------------------------------------------------------------------------------
def _known_matmul(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Small integers (|a| <= 3, |b| <= 2): every product and partial sum is an integer below 2^11,
    exact in fp32 and even in TF32 inputs, so the device must reproduce the int64 answer exactly."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return (i + 2 * j) % 7 - 3, (3 * i + j) % 5 - 2


def known_matmul_error(device: torch.device) -> Optional[str]:
    """None if `device` multiplies two known matrices exactly, else what went wrong."""
    a, b = _known_matmul()
    expected = a.astype(np.int64) @ b.astype(np.int64)
    got = torch.matmul(torch.tensor(a, dtype=torch.float32, device=device),
                       torch.tensor(b, dtype=torch.float32, device=device)).cpu().numpy()
    if np.array_equal(got, expected):
        return None
    return (f"a {a.shape[0]}x{a.shape[0]} fp32 matmul of known result on {device} is wrong "
            f"(max abs error {float(np.nanmax(np.abs(got - expected))):.3g})")


def preflight(device: torch.device, bad_nodes: Optional[Path] = None) -> None:
    """Check this rank's device and the world's collectives before training; raises RuntimeError
    naming the rank and what failed. A rank whose device fails appends its node's name to
    `bad_nodes` (the Slurm batch script's <run_dir>/slurm/bad_nodes, which it resubmits without).

    One all-reduce carries both checks, so every rank learns every other rank's matmul result and
    all raise together (a rank that raised alone would leave the others stuck in the next collective).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    matmul_error = known_matmul_error(device)
    matmul_ok = matmul_error is None
    local_error = None if matmul_ok else f"preflight failed on rank {rank}: {matmul_error}"
    if local_error and bad_nodes is not None:
        bad_nodes.parent.mkdir(parents=True, exist_ok=True)
        with open(bad_nodes, "a") as f:  # one short line per append: safe beside other ranks' appends
            f.write(f"{node_name()}\n")
    if not dist.is_initialized():
        if local_error:
            raise RuntimeError(local_error)
        return
    n = dist.get_world_size()
    # int64: n(n-1)/2 is exact at any world size (fp32 would round above ~5800 ranks).
    t = torch.zeros(n + 1, dtype=torch.int64, device=device)
    t[0] = rank
    t[1 + rank] = int(matmul_ok)
    dist.all_reduce(t)
    sums = t.cpu().tolist()
    if local_error:
        raise RuntimeError(local_error)
    if sums[0] != n * (n - 1) // 2 or any(v not in (0, 1) for v in sums[1:]):
        raise RuntimeError(f"preflight failed on rank {rank}: all_reduce of the ranks over {n} ranks gave "
                           f"{sums[0]} (expected {n * (n - 1) // 2}) or wrong flags")
    bad = [r for r, ok in enumerate(sums[1:]) if not ok]
    if bad:
        raise RuntimeError(f"preflight failed on rank {rank}: the known-result matmul failed on ranks {bad}")
