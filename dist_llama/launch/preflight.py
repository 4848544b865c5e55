"""Node preflight, run once per node by the Slurm batch script before training starts.

    python -m dist_llama.launch.preflight --run-dir RUN [--gpus N | --cpu]

Checks what makes a node unusable before any rank wastes a rendezvous on it: the run directory
is writable and has room, the expected GPUs are visible and idle, and each device multiplies a
known matrix exactly. Prints one line per node and exits 1 on a failure, naming the node; the batch
script then resubmits the job without that node. (The trainer's own preflight, which also tests
the collectives across all ranks, runs after the rendezvous; a rank whose device fails it there
adds its node to the same <run_dir>/slurm/bad_nodes.)

Drill: DIST_LLAMA_PREFLIGHT_FAIL=node1,node2 makes the check fail on those nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from dist_llama.parallel.env import node_name

MIN_FREE_GIB = 1.0
MAX_USED_GPU_FRACTION = 0.1
"""A GPU with more memory in use than this before we start belongs to someone else's leftover process."""


def check_run_dir(run_dir: Path) -> Optional[str]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".preflight-{node_name()}-{os.getpid()}"
        probe.write_bytes(b"ok")
        ok = probe.read_bytes() == b"ok"
        probe.unlink()
    except OSError as exc:
        return f"run directory {run_dir} is not writable: {exc}"
    if not ok:
        return f"run directory {run_dir} did not read back what was written"
    free_gib = shutil.disk_usage(run_dir).free / 2**30
    if free_gib < MIN_FREE_GIB:
        return f"run directory {run_dir} has {free_gib:.2f} GiB free (< {MIN_FREE_GIB})"
    return None


def check_devices(gpus: int) -> Optional[str]:
    import torch

    from dist_llama.train.replicas import known_matmul_error

    if gpus == 0:
        return known_matmul_error(torch.device("cpu"))
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < gpus:
        return f"{found} GPUs visible, the job needs {gpus}"
    for i in range(gpus):
        free, total = torch.cuda.mem_get_info(i)
        if (total - free) / total > MAX_USED_GPU_FRACTION:
            return f"GPU {i} already has {(total - free) / 2**30:.1f} GiB in use (a stray process?)"
        error = known_matmul_error(torch.device("cuda", i))
        if error:
            return f"GPU {i}: {error}"
    return None


def run(run_dir: Path, gpus: int) -> Optional[str]:
    if node_name() in os.environ.get("DIST_LLAMA_PREFLIGHT_FAIL", "").split(","):
        return "injected failure (DIST_LLAMA_PREFLIGHT_FAIL)"
    return check_run_dir(run_dir) or check_devices(gpus)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_llama.launch.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--gpus", type=int, help="GPUs this node must have")
    group.add_argument("--cpu", action="store_true", help="CPU ranks: check the CPU instead of GPUs")
    args = parser.parse_args(argv)
    error = run(args.run_dir, 0 if args.cpu else args.gpus)
    if error:
        print(f"preflight FAILED on node {node_name()}: {error}", flush=True)
        return 1
    print(f"preflight ok on node {node_name()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
