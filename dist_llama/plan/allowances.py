"""What a CUDA device holds beyond the step's tensors: explicit allowances per rank, added to the
tensor estimate (plan/estimate.py) and to the fake-tensor step's peak (plan/memory.py), neither of
which can see them. Each is a formula of documented defaults, not a flat percentage:

- cuda_context: the CUDA context and the module images of the kernels it loads, per process,
  512 MiB. torch's docs say memory_allocated is "likely less than the amount shown in nvidia-smi
  since ... some context needs to be created on GPU" without a figure; pytorch/pytorch#34323 shows
  781 MB for CUDA's initialisation alone before lazy loading (CUDA 11.7+, the Linux default since
  12.2, loads only the kernels used); NVIDIA/nccl#1685 reports 1.06 GB of non-PyTorch memory on an
  8 x H100 rank after init, of which one 8-rank communicator with NVLS is ~0.54 GiB by the formula
  below, leaving about 0.45 GiB for the context.
- workspaces: cuBLAS workspaces, one per (handle, stream) pair, allocated through torch's caching
  allocator (so `torch.cuda.memory_allocated` counts them; the live-tensor tracker does not). torch
  (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize) defaults to 4096 KiB x 8 =
  32 MiB on sm90 (Hopper) and 4096 KiB x 2 + 16 KiB x 8 elsewhere, unless CUBLAS_WORKSPACE_CONFIG
  says otherwise; cuBLASLt shares it (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default). Handles are
  per thread, so the forward (main thread) and backward (autograd's device thread) on the one
  compute stream hold two. cuDNN is unused: the model has no convolution and its CUDA attention is
  FlexAttention, not cuDNN's SDPA backend.
- nccl: NCCL communicator buffers, one communicator per process group a rank communicates on (see
  communicators()); each allocates its own (NCCL_COMM_SPLIT_SHARE_RESOURCES is off by default,
  NVIDIA/nccl#986). Per communicator of n > 1 ranks, `local` of them on this rank's node, with C
  collective channels (16 on H100/H200: "16 coll channels" intra-node, NVIDIA/nccl#892, and 16 rings
  across nodes, nccl#1453 and nccl-tests#319; 24 on A100, nccl-tests#100):
    ring/tree: C x k x (Simple + LL + LL128 + net x (Simple + LL128)), k = 1 receive connection per
      channel for n = 2 (ring and tree share the one peer), 2 otherwise (ring predecessor, shared
      with the tree's parent, and the tree's child). Simple = NCCL_BUFFSIZE = 4 MiB, LL = 8 lines x
      512 threads x 8 steps x 16 B = 512 KiB, LL128 = 120 x 640 threads x 8 steps x 8 B = 4,915,200 B
      (src/init.cc DEFAULT_*_BUFFSIZE, src/include/device.h); together the ~9.19 MiB per connection
      users measure. net = 1/local of the connections leave the node when the group spans nodes;
      their sender stages Simple and LL128 in device memory too (src/transport/net.cc, GPUDirect RDMA).
    NVLS (NVLink SHARP, Hopper NVSwitch, NCCL_NVLS_ENABLE on by default): for a group carrying bulk
      traffic with local >= 2, 16 channels x 2 x (128 KiB x 8 steps) x local heads
      (src/transport/nvls.cc: NVLS_NCHANNELS_SM90, NCCL_NVLS_CHUNKSIZE, ncclNvlsBufferSetup).
    p2p (the pipeline's send/recv): per neighbour stage, C channels x 512 KiB x 8 steps over NVLink
      (NCCL_P2P_NVL_CHUNKSIZE), or NCCL_NCHANNELS_PER_NET_PEER = 2 channels x 128 KiB x 8 steps at
      both ends over the network (NCCL_P2P_NET_CHUNKSIZE).
  It is an upper bound for NCCL >= 2.22, which connects only the algorithms a communicator uses
  (NCCL_RUNTIME_CONNECT=1); the world group carries only barriers and object exchange, so no NVLS.
- fragmentation: what the caching allocator reserves beyond the live tensors, as a fraction of the
  tensor peak. 5% with expandable_segments:True in PYTORCH_CUDA_ALLOC_CONF (PYTORCH_ALLOC_CONF in
  newer torch; torchtitan's run_train.sh sets it): segments grow in place, so what is left is the
  gaps between tensors of different lifetimes; Megatron's memory calculator adds a flat 5%, and
  vllm-project/compressed-tensors#587 reserves 5% after measuring 1.83 GiB stranded beside 75.3 GiB
  allocated (2.4%). 15% without it: torch's CUDA notes ("Optimizing memory usage with
  PYTORCH_CUDA_ALLOC_CONF") explain how fixed-size segments leave unusable free slices when
  allocation sizes change, and meta-pytorch/torchtune#1185 measured a 51% higher peak without it
  (Llama 3 8B QLoRA on an A100); a pretraining step repeats one block's shapes, so we take a value
  between the two. Both are allowances to replace by measurement (torch.cuda.max_memory_reserved
  against the fake step's peak) once a GPU is at hand.

On "cpu" hardware (gloo ranks) every allowance is 0: CPU tensors need no device context, gloo keeps
no device buffers, and what the planner is compared with there is the live-bytes tracker, which
counts tensors only. This module knows no torch (it is arithmetic on the config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from dist_llama.config.engines import engine_facts

KiB, MiB = 2**10, 2**20

CUDA_CONTEXT = 512 * MiB
CUBLAS_WORKSPACE_HOPPER = 4096 * KiB * 8
CUBLAS_WORKSPACE = 4096 * KiB * 2 + 16 * KiB * 8
CUBLAS_HANDLES = 2
"""The forward's (main thread) and the backward's (autograd's device thread), one stream."""
NCCL_STEPS = 8
SIMPLE = 4 * MiB
LL = 8 * 512 * NCCL_STEPS * 16
LL128 = 120 * 640 * NCCL_STEPS * 8
NVLS_CHANNELS, NVLS_CHUNK = 16, 128 * KiB
P2P_NVL_CHUNK, P2P_NET_CHUNK, NET_CHANNELS_PER_PEER = 512 * KiB, 128 * KiB, 2
HOPPER = frozenset({"h100", "h200"})
"""sm90: the 32 MiB cuBLAS workspace and NVLink SHARP on their NVSwitch."""
FRAGMENTATION_EXPANDABLE, FRAGMENTATION_FIXED = 0.05, 0.15


class Device(Protocol):
    """What is read of a plan.hardware.Hardware (not imported: it imports torch)."""

    name: str
    gpus_per_node: int


@dataclass(frozen=True)
class Communicator:
    """One process group a rank communicates on."""

    name: str
    """Its mesh dimension(s)."""
    size: int
    """Ranks in it."""
    local: int
    """Its ranks on this rank's node."""
    bulk: bool = True
    """Whether it carries large collectives (NVLS pays off); the world group carries only barriers."""
    p2p: bool = False
    """Whether it also carries the pipeline's send/recv."""


@dataclass(frozen=True)
class Allowances:
    """Device bytes one rank holds beyond its tensors."""

    cuda_context: float
    """CUDA context and loaded kernel images, per process, bytes."""
    workspaces: float
    """cuBLAS workspaces (one per handle and stream), bytes; cuDNN is unused."""
    nccl: float
    """NCCL communicator buffers over every communicator of the rank, bytes."""
    fragmentation: float
    """Caching-allocator reserve beyond the live tensors, bytes."""
    communicators: int = 0
    """NCCL communicators counted in nccl (a count, not bytes)."""
    expandable_segments: bool = True
    """Whether fragmentation assumes PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."""

    @property
    def total(self) -> float:
        return self.cuda_context + self.workspaces + self.nccl + self.fragmentation

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def communicators(parallel, gpus_per_node: int) -> list[Communicator]:
    """The groups of the mesh [pp, dp_replicate, dp_shard, cp, tp] (tp innermost) the trainer runs
    collectives on, each a separate NCCL communicator: the world (barriers, object exchange), tp,
    cp, pp (send/recv and the gradient norm), the engine's shard group dp_shard x cp (FSDP, ZeRO),
    HSDP's dp_replicate, dp (the step's token counts; ZeRO-1/2 replicas) and dp x cp (loss sums;
    DDP). Groups of one rank open no connections and are left out."""
    p = parallel
    world = p.world_size

    def group(name: str, size: int, stride: int, **kind) -> Communicator:
        local = max(1, min(size, gpus_per_node // stride))  # uniform stride; a node holds gpus_per_node ranks
        return Communicator(name, size, local, **kind)

    groups = [group("world", world, 1, bulk=False), group("tp", p.tp, 1), group("cp", p.cp, p.tp),
              group("pp", p.pp, world // p.pp, bulk=False, p2p=True)]
    if engine_facts(p).shards_over_dp:
        groups.append(group("dp_shard_cp", p.dp_shard * p.cp, p.tp))
    groups += [group("dp_replicate", p.dp_replicate, p.dp_shard * p.cp * p.tp),
               group("dp", p.dp, p.cp * p.tp), group("dp_cp", p.dp * p.cp, p.tp)]
    return [g for g in groups if g.size > 1]


def channels(hw: Device) -> int:
    """NCCL's collective channels per communicator on this hardware (see the module docstring)."""
    return 24 if hw.name == "a100" else 16


def communicator_bytes(c: Communicator, hw: Device) -> float:
    """Device bytes of one communicator's buffers (the module docstring's formula)."""
    n_channels = channels(hw)
    connections = 1 if c.size == 2 else 2
    leaving = 0.0 if c.local == c.size else 1.0 / c.local
    total = n_channels * connections * (SIMPLE + LL + LL128 + leaving * (SIMPLE + LL128))
    if c.bulk and hw.name in HOPPER and c.local >= 2:
        total += NVLS_CHANNELS * 2 * NVLS_CHUNK * NCCL_STEPS * c.local
    if c.p2p:
        per_peer = (n_channels * P2P_NVL_CHUNK * NCCL_STEPS if c.local >= 2
                    else 2 * NET_CHANNELS_PER_PEER * P2P_NET_CHUNK * NCCL_STEPS)
        total += min(2, c.size - 1) * per_peer
    return total


def device_allowances(parallel, hw: Device, tensor_peak: float, expandable_segments: bool = True) -> Allowances:
    """The allowances of one rank of the validated layout `parallel` on `hw`, whose tensors peak at
    `tensor_peak` bytes (the estimate's, or the fake step's)."""
    if hw.name == "cpu":
        return Allowances(0.0, 0.0, 0.0, 0.0, 0, expandable_segments)
    groups = communicators(parallel, hw.gpus_per_node)
    workspace = CUBLAS_WORKSPACE_HOPPER if hw.name in HOPPER else CUBLAS_WORKSPACE
    fraction = FRAGMENTATION_EXPANDABLE if expandable_segments else FRAGMENTATION_FIXED
    return Allowances(cuda_context=float(CUDA_CONTEXT), workspaces=float(CUBLAS_HANDLES * workspace),
                      nccl=sum(communicator_bytes(c, hw) for c in groups), fragmentation=fraction * tensor_peak,
                      communicators=len(groups), expandable_segments=expandable_segments)


def refit(est, parallel, hw, expandable_segments: bool):
    """An Estimate (plan/estimate.py) with its allowances for the given allocator setting and
    `fits` decided again by tensors + allowances."""
    allowances = device_allowances(parallel, hw, est.memory.total, expandable_segments)
    return dataclasses.replace(est, allowances=allowances, fits=est.memory.total + allowances.total <= hw.memory_bytes)
