"""Run a function on N fork-started gloo ranks on this machine and collect what each returns
(tests, benchmarks, notebooks).

Fork is ~10x faster to start than spawn on these machines. Each rank gets the torchrun environment
variables, one intra-op thread (the CI machine has 2 cores), and a deadline: a hang fails the test.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args, kwargs):
    import torch

    from dist_llama.parallel.env import after_fork

    after_fork()

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # A native crash names where every thread was. On the process's own stderr: a test's
        # captured sys.stderr has no file descriptor.
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
        # Plain pickle bytes: the queue's own pickler would pass tensors as shared-memory handles,
        # which die with this process.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


class _PortTaken(Exception):
    """The rendezvous port was taken between free_port() and rank 0's TCPStore listening on it."""


def run_ranks(fn, world_size: int, *args, timeout: float = 240, **kwargs) -> list:
    # free_port() can only name a port that was free: another process may bind it (an ephemeral
    # port of an outgoing connection) before rank 0's store listens. That failure happens before
    # any rank ran `fn`, so the job is started again on another port.
    for _ in range(3):
        try:
            return _run_once(fn, world_size, args, kwargs, timeout)
        except _PortTaken:
            continue
    raise RuntimeError("the rendezvous port was taken on 3 tries in a row")


def _run_once(fn, world_size: int, args, kwargs, timeout: float) -> list:
    import time

    from dist_llama.parallel.env import before_fork

    before_fork()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args, kwargs), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    grace = 5.0
    try:
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            try:
                rank, ok, payload = results.get(timeout=max(0.1, remaining))
            except queue.Empty:
                if remaining <= 0:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish "
                                       f"within {timeout} s") from None
                continue
            if not ok:
                if "EADDRINUSE" in payload and "TCPStore" in payload:
                    grace = 0.0
                    raise _PortTaken()
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = pickle.loads(payload)  # from our own child process
    finally:
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def gather_full_state_dict(parts) -> dict:
    """The whole model's weights as plain CPU tensors on every rank, gathered over every parallel
    dimension (for comparing layouts). Costs a full copy per rank: small models only."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    local = {}
    for part in parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        local.update({k: v.detach().cpu() for k, v in sd.items()})
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for sd in gathered for k, v in sd.items()}
