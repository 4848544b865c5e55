"""Hardware the planner prices a layout on: the GPU presets (datasheet figures) and "cpu", gloo
ranks on this machine described from measurements (CPU_GLOO, recorded with
`python -m dist_llama.plan.calibrate`, or measured_cpu_hardware at once)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from dist_llama.model.flops import H100_BF16_PEAK
from dist_llama.plan.calibrate import cores, gloo_links, matmul_rate

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the links it sees."""

    name: str
    """Preset name."""
    peak_flops: float
    """Dense BF16 (fp32 on cpu) peak, FLOP/s."""
    memory_bytes: float
    """Device memory (HBM), bytes."""
    intra_node_bw: float
    """NVLink bandwidth per GPU per direction, bytes/s."""
    inter_node_bw: float
    """Network (InfiniBand/RoCE) bandwidth per GPU per direction, bytes/s."""
    gpus_per_node: int
    """Devices joined by the intra-node link."""
    host_bw: float = 0.0
    """Host <-> device copy bandwidth per device (PCIe), bytes/s, for ZeRO offload traffic;
    0 = host memory is the device's memory (cpu ranks), offloading moves nothing."""
    link_efficiency: Optional[float] = None
    """Achieved / listed bandwidth of both links; None = the calibration's (GPU presets list nominal
    link speeds); 1.0 when the bandwidths above were measured."""
    collective_latency_s: Optional[float] = None
    """Fixed cost per collective call; None = the calibration's (NCCL on GPUs)."""


CPU_GLOO = {2: (0.79e-3, 0.30e9), 8: (22.4e-3, 0.185e9)}
"""gloo over loopback on the 2-core development machine (AMD EPYC, torch 2.13 CPU): ranks ->
(latency s per call, bus bandwidth bytes/s), the medians of 10 runs of
`python -m dist_llama.plan.calibrate --ranks 2 8` (each run: medians of 15 all-gathers and
reduce-scatters of 4 KiB and 16 MiB between fork-started single-thread ranks), taken while other
jobs kept the load average at 4-9; single runs ranged 0.47-6.4 ms / 0.17-0.44 GB/s on 2 ranks and
18-46 ms / 0.10-0.29 GB/s on 8. With more ranks than cores, ranks time-share the cores and every
collective waits for descheduled peers, hence the 8-rank latency. Other rank counts use the nearest
entry; other machines should measure their own (measured_cpu_hardware)."""


def cpu_hardware(ranks: int, latency_s: float, bus_bw: float) -> Hardware:
    """This machine as `ranks` gloo processes of one intra-op thread each (as torchrun and
    dist_llama.testing start them): the peak of a rank is one thread's measured fp32 matmul rate,
    times its share of the cores when ranks outnumber them; links are loopback gloo at the measured
    (achieved) latency and bus bandwidth; every rank is its own "node"."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = matmul_rate(threads=1) * min(1.0, cores() / ranks)
    return Hardware("cpu", peak, float(memory) / ranks, bus_bw, bus_bw, 1, host_bw=0.0, link_efficiency=1.0,
                    collective_latency_s=latency_s)


def measured_cpu_hardware(ranks: int) -> Hardware:
    """The "cpu" Hardware for `ranks` ranks, every figure measured now (see hardware_preset)."""
    return cpu_hardware(ranks, *gloo_links(ranks))


def hardware_preset(name: str, ranks: int = 1) -> Hardware:
    """h100 / h200 / a100 (SXM, 8 per node, one 400/400/200 Gb/s NIC and a PCIe Gen5/Gen5/Gen4 x16
    host link per GPU), or cpu: `ranks` gloo ranks sharing this machine (cpu_hardware, with the
    links recorded in CPU_GLOO)."""
    if name == "h100":
        return Hardware("h100", H100_BF16_PEAK, 80 * GB, 450 * GB, 50 * GB, 8, host_bw=64 * GB)
    if name == "h200":
        return Hardware("h200", H100_BF16_PEAK, 141 * GB, 450 * GB, 50 * GB, 8, host_bw=64 * GB)
    if name == "a100":
        return Hardware("a100", 312e12, 80 * GB, 300 * GB, 25 * GB, 8, host_bw=32 * GB)
    if name == "cpu":
        nearest = min(CPU_GLOO, key=lambda r: (abs(r - ranks), r))
        return cpu_hardware(ranks, *CPU_GLOO[nearest])
    raise ValueError(f"unknown hardware {name!r}; choose h100, h200, a100 or cpu")
