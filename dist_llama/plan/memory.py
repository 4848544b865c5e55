"""Peak memory of one rank from its real training step: the trainer's own build (engine, model
parts, optimizers, step strategy) and its own step code (forward and backward through the
micro-batches or the pipeline schedule, gradient norm, optimizer step), under the live-bytes
tracker of plan/memtrack.py.

- `fake_memory`: one rank of a job of any size on a fake process group (collectives return at
  once) with FakeTensorMode (tensors have shapes, dtypes and lifetimes, no data), so a 405B rank is
  stepped in seconds on a laptop. The model is built on the meta device and materialised as fake
  CPU tensors: the CPU code path with the compute dtype of the target device, except attention,
  which allocates as the target's does (plan/fake_attention.py: FlexAttention on CUDA, no S x S
  tensor; SDPA with a boolean document mask on CPU).
- `tracked_memory`: the same report for the real tensors of a live rank (gloo ranks in the tests
  and bench/memory_vs_measured.py), the check that the fake step counts what a real one allocates.

The optimizer state is created first (as the first step would), then one step is tracked: the
steady state, which no later step exceeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.distributed as dist

from dist_llama.config import Config
from dist_llama.config.validation import micro_rows
from dist_llama.plan.fake_attention import cuda_attention
from dist_llama.plan.fake_pipeline import hidden_state, local_stage_metadata
from dist_llama.plan.memtrack import MemoryReport, MemoryTracker

TRACKED_STEPS = 1
"""Steps tracked after the optimizer state is created: every step is alike from then on (the
pipeline schedule's one-time metadata pass at the first step is inside the tracked one)."""


def synthetic_batch(objective, cfg: Config, dp: int, device: torch.device) -> dict:
    """A batch of this rank's shape, as the objective reads it: memory depends on shapes only."""
    return objective.synthetic_batch(cfg.train.global_batch_size // dp, cfg.data.seq_len, device)


def prime_optimizers(engine) -> None:
    """Create the optimizers' state as the first step does (an update with zero gradients), so
    that the tracked step is the steady state: every later step holds the same state."""
    for optimizer in engine.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def finish_fsdp_init(engine) -> None:
    """Run FSDP2's lazy initialisation (otherwise done by the first forward) before tracking. It
    re-pads a shard unless its storage is the padded one FSDP made, which it recognises by data
    pointer: fake storages have none, so on fake tensors the uneven shards (the last dp rank's) were
    copied into new storages inside the tracked step, counted as activations instead of parameters."""
    from torch.distributed.fsdp import FSDPModule

    for part in engine.parts:
        if isinstance(part, FSDPModule):
            part._get_fsdp_state()._lazy_init()


def tracked_steps(engine, step, batch: dict, n_tokens: int, steps: int = TRACKED_STEPS) -> MemoryReport:
    """What Trainer.train_step does (forward/backward, gradient norm, update), `steps` times after
    FSDP's lazy initialisation and the optimizers are primed, tracked; the loss reduction and
    schedulers allocate nothing worth counting and are left out."""
    finish_fsdp_init(engine)
    prime_optimizers(engine)
    tracker = MemoryTracker(engine.parts, engine.optimizers)
    tracker.register(*batch.values())
    with tracker:
        for _ in range(steps):
            tracker.next_step()
            step.forward_backward(batch, n_tokens)
            engine.grad_norm()
            engine.step()
    return tracker.report


def tracked_memory(cfg: Config, device: torch.device, steps: int = TRACKED_STEPS) -> MemoryReport:
    """This live rank's report (its process group initialised): the trainer's build, real tensors."""
    from dist_llama.parallel.dims import ParallelDims
    from dist_llama.train.build import build_engine_and_step, compute_dtype
    from dist_llama.train.objectives import build_objective

    dims = ParallelDims.from_config(cfg.parallel)
    meshes = dims.build_mesh(device.type)
    objective = build_objective(cfg)
    engine, step = build_engine_and_step(cfg, dims, meshes, device, compute_dtype(cfg, device), objective)
    batch = synthetic_batch(objective, cfg, dims.dp, device)
    return tracked_steps(engine, step, batch, cfg.train.global_batch_size * cfg.data.seq_len, steps)


def tracked_memory_on_gloo(cfg: Config) -> dict:
    """One CPU rank of a gloo job (the torchrun environment variables set, as run_ranks sets them):
    join the job's process group, report as `tracked_memory`, leave."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return tracked_memory(cfg, torch.device("cpu")).to_dict()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_library():
    """Silence what the fake runs make torch say about the trainer's own layouts, which the
    planner's output is not the place for: FSDP2's warning that a wrapped module returned a view
    (the pipeline stage's output) and DTensor's note that a 2-D norm reduction takes two all-reduces."""
    import logging
    import warnings

    redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute.level
    redistribute.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module", category=UserWarning)
            yield
    finally:
        redistribute.setLevel(level)


def fake_memory(cfg: Config, world_size: int, rank: int, device_type: str = "cuda",
                steps: int = TRACKED_STEPS) -> dict:
    """Rank `rank` of a `world_size`-rank job stepped on fake tensors over a fake process group;
    `device_type` chooses the compute dtype (bf16 on cuda unless train.dtype says otherwise).
    Initialises and destroys the (process-global) fake process group."""
    with quiet_library():
        return _fake_memory(cfg, world_size, rank, device_type, steps)


def _fake_memory(cfg: Config, world_size: int, rank: int, device_type: str = "cuda",
                steps: int = TRACKED_STEPS) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dist_llama.parallel.dims import ParallelDims
    from dist_llama.train.build import build_engine_and_step
    from dist_llama.train.objectives import build_objective

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if cfg.train.compute_dtype(device_type) == "bf16" else torch.float32
    # Built on the meta device and materialised per shard after sharding, as on CUDA: no rank ever
    # makes the whole model, so a 405B stage builds in seconds.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, meta_init=True, compile=False))
    cpu = torch.device("cpu")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dims = ParallelDims.from_config(cfg.parallel)
        meshes = dims.build_mesh("cpu")
        # Outside the fake mode until the parts are materialised: DeviceMesh computes its rank
        # tables with tensor ops that have no fake implementation.
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        objective = build_objective(cfg)
        engine, step = build_engine_and_step(cfg, dims, meshes, cpu, dtype, objective, fake_mode=fake)
        with fake:
            batch = synthetic_batch(objective, cfg, dims.dp, cpu)
            # The hidden state crossing pipeline stages: the residual stream is in the weights'
            # dtype when the engine casts them, in fp32 under autocast (the embedding stays fp32).
            rows = micro_rows(cfg.train.micro_batch_size, cfg.train.global_batch_size // dims.dp, dims.pp)
            hidden = hidden_state(rows, cfg.data.seq_len // dims.cp, cfg.model.dim,
                                  dtype if engine.autocast_dtype is None else torch.float32,
                                  dims.tp)
            with (local_stage_metadata(hidden) if dims.pp > 1 else contextlib.nullcontext(),
                  cuda_attention(engine.parts) if device_type == "cuda" else contextlib.nullcontext()):
                report = tracked_steps(engine, step, batch, cfg.train.global_batch_size * cfg.data.seq_len, steps)
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "world_size": world_size, "dtype": str(dtype).removeprefix("torch."),
            **report.to_dict(), "seconds": time.perf_counter() - t0}


def _indexed_fake_memory(run: tuple) -> tuple[int, dict]:
    index, cfg, world_size, rank, device_type = run
    return index, fake_memory(cfg, world_size, rank, device_type)


def fake_memories(runs: list[tuple[Config, int, int]], device_type: str = "cuda", jobs: int | None = None):
    """fake_memory for each (config, world size, rank) of `runs`, each in a fresh forked process
    (DTensor and the pipeline keep process-group names that die with each fake group), `jobs` at a
    time (default: one per CPU core). Yields (index in runs, report) as each finishes; a failed run
    raises its exception here, with the child's traceback as its cause."""
    import multiprocessing as mp
    import os

    from dist_llama.parallel.env import after_fork, before_fork

    if not runs:
        return
    jobs = min(len(runs), jobs or os.cpu_count() or 1)
    before_fork()
    with mp.get_context("fork").Pool(jobs, initializer=after_fork, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_indexed_fake_memory,
                                       [(i, cfg, world, rank, device_type) for i, (cfg, world, rank) in enumerate(runs)])
