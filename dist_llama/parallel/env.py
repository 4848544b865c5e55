"""Process-group setup from the torchrun environment (or a single process without one)."""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def node_name() -> str:
    """This machine's name as Slurm knows it (what --exclude takes), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop")
"""The threads of a live gloo process group, by the names the kernel shows (/proc/self/task/*/comm)."""


def before_fork() -> None:
    """Call before forking processes that start process groups of their own (test ranks, fake-step
    workers). A gloo group that is already garbage here but not yet collected (a reference cycle)
    would be inherited, and the child's collector would destroy it wherever a collection happens to
    start: ~ProcessGroupGloo joins worker threads that exist only in this process, so the child
    waits in pthread_join forever (native stacks of CI's hung pipeline ranks). So: collect first,
    and refuse to fork beside a group that is still alive."""
    import torch.distributed as dist

    # The default group is checked directly: its gloo threads may not be running yet on a loaded
    # machine, so their names alone would miss it.
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("this process still runs a gloo process group: destroy it and drop every reference "
                           "to it before forking ranks, which would inherit it")
    if not _gloo_threads():
        return
    gc.collect()
    if _gloo_threads():
        raise RuntimeError("this process still runs a gloo process group: destroy it and drop every reference "
                           "to it before forking ranks, which would inherit it")


def after_fork() -> None:
    """First thing in a forked child: never collect what was inherited (gc.freeze), so no destructor
    of an inherited object (a process group's among them) runs in a process without its threads."""
    gc.freeze()


def _gloo_threads() -> list[str]:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # no /proc: nothing to check
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [name for name in names if name in GLOO_THREADS]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store of env://, with keys private to this restart attempt.

    Under torchrun the agent's store outlives worker restarts; without a per-attempt prefix, the
    process groups a restarted job creates (device-mesh sub-groups, the checkpoint group) can read
    the previous attempt's peer addresses and fail or hang connecting to dead ranks.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not use_agent_store, wait_for_workers=False)
    return dist.PrefixStore(f"dist_llama/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device_name: str) -> DistEnv:
    """Join the job's process group: NCCL on CUDA, gloo on CPU. Without torchrun, a 1-rank group."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=_store(rank, world_size), rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   world_size=dist.get_world_size(), device=device)
