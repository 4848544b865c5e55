"""Measure this machine as the planner's "cpu" hardware: one intra-op thread's fp32 matmul rate and
gloo's per-call latency and bus bandwidth between fork-started ranks (how dist_llama's tests,
benchmarks and torchrun run CPU ranks: one process and one intra-op thread per rank).

    python -m dist_llama.plan.calibrate --ranks 2 8

prints the figures that hardware.CPU_GLOO records; rerun it on another machine and pass the result
to the estimator as a Hardware (hardware.measured_cpu_hardware) instead of the recorded constants.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

LATENCY_BYTES = 4096
"""Message size that measures the fixed cost per call (transfer time is negligible at it)."""
BANDWIDTH_BYTES = 16 * 2**20
"""Message size that measures bandwidth: large against the latency, small enough to be quick."""


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def matmul_rate(threads: int = 1) -> float:
    """fp32 FLOP/s of a 1024^3 matmul with `threads` intra-op threads (ranks run with one)."""
    from dist_llama.model.flops import measure_cpu_peak_flops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_cpu_peak_flops()
    finally:
        torch.set_num_threads(before)


def _time_collectives(sizes: list[int], repeats: int) -> dict:
    """On one rank: median seconds of all-gather and reduce-scatter (FSDP's collectives) per size."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    n = dist.get_world_size()
    out = {}
    try:
        for nbytes in sizes:
            numel = max(n, nbytes // 4 // n * n)
            full, shard = torch.ones(numel), torch.ones(numel // n)
            for name, op in (("all_gather", lambda: dist.all_gather_into_tensor(full, shard)),
                             ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full))):
                op()  # warm up the pair connections
                times = []
                for _ in range(repeats):
                    dist.barrier()  # start together: time the collective, not the wait for a late peer
                    t0 = time.perf_counter()
                    op()
                    times.append(time.perf_counter() - t0)
                out[(name, numel * 4)] = statistics.median(times)
    finally:
        dist.destroy_process_group()
    return out


def gloo_links(ranks: int, repeats: int = 15) -> tuple[float, float]:
    """(latency s per call, bus bandwidth bytes/s) of gloo over loopback between `ranks` fork-started
    ranks of one intra-op thread. Bus bandwidth counts what one rank sends, (n-1)/n of the full
    tensor for all-gather and reduce-scatter, as the estimator does; both are averaged over the two
    collectives, the bandwidth from the time above the latency at BANDWIDTH_BYTES."""
    from dist_llama.testing import run_ranks

    times = run_ranks(_time_collectives, ranks, [LATENCY_BYTES, BANDWIDTH_BYTES], repeats, timeout=300)[0]
    small = [t for (_, size), t in times.items() if size < BANDWIDTH_BYTES]
    large = {name: t for (name, size), t in times.items() if size >= BANDWIDTH_BYTES}
    latency = statistics.mean(small)
    size = max(s for _, s in times)
    bus = [(ranks - 1) / ranks * size / max(t - latency, 1e-9) for t in large.values()]
    return latency, statistics.mean(bus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    args = ap.parse_args()
    print(f"{cores()} cores; one thread's 1024^3 fp32 matmul: {matmul_rate(1) / 1e9:.1f} GFLOP/s")
    for ranks in args.ranks:
        latency, bandwidth = gloo_links(ranks)
        print(f"gloo, {ranks} ranks: latency {latency * 1e3:.2f} ms per call, bus bandwidth {bandwidth / 1e9:.3f} GB/s")


if __name__ == "__main__":
    main()
