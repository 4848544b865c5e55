"""train.dpo.reference=precomputed: the reference model's log-probabilities of every preference
pair, computed in one pass before training and kept in ``<run_dir>/dpo_reference.safetensors``.

The reference is the starting weights, so before the first step the policy *is* the reference:
the pass runs the policy itself (no second model is ever built) and training then holds no
reference at all; each batch row carries its pair's two numbers (PairLoader.reference). The pass
scores the pairs in the order of their indices, B (the global batch) at a time, each data-parallel
rank its share of the rows, through the step strategy's own forward (micro-batches, autocast, loss
parallel), and gathers the shares; every rank keeps the whole table ([n_pairs, 2] fp32: 8 bytes a
pair). Rank 0 writes it (safetensors, the identity below in its metadata; atomic replace).

A run that resumes, or starts again, reads the file when its identity still matches (dataset,
mask, starting weights, model, compute dtype); otherwise the table is computed again, from the
starting weights rebuilt as the model reference would be (`train/build.py:starting_model`), as the resumed
policy is no longer the reference.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

FILE = "dpo_reference.safetensors"
KEY = "logps"


def identity(cfg, loader, dtype) -> dict:
    """What the table's values depend on: a file whose metadata differs is not reused."""
    import dataclasses

    # "response": tables written before the response became the final answer alone are not reused
    return {"dataset": loader.data.fingerprint, "mask_special": loader.mask_special, "n_pairs": loader.n_pairs,
            "response": "final answer",
            "init_from": cfg.checkpoint.init_from or None, "seed": cfg.train.seed,
            "model": dataclasses.asdict(cfg.model), "dtype": str(dtype)}


def _read(path: Path, expected: dict) -> np.ndarray | None:
    """The table of `path` if its identity is `expected`, else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            if json.loads((f.metadata() or {}).get("dist_llama", "null")) != json.loads(json.dumps(expected)):
                return None
            table = f.get_tensor(KEY)
    except (OSError, ValueError, json.JSONDecodeError, KeyError, SafetensorError):
        return None  # missing, truncated (safetensors' own error) or not ours: computed again
    return table if table.shape == (expected["n_pairs"], 2) and table.dtype == np.float32 else None


def _write(path: Path, table: np.ndarray, ident: dict) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({KEY: table}, str(tmp), metadata={"dist_llama": json.dumps(ident)})
    os.replace(tmp, path)


def compute_table(step, objective, model: nn.Module, loader) -> np.ndarray:
    """[n_pairs, 2] fp32: `model`'s log-probs of every pair's chosen and rejected response (a
    collective over the step's data-parallel group; see the module docstring)."""
    B, dp, n = loader.global_batch_size, loader.dp_size, loader.n_pairs
    local = B // dp
    chunks = []
    for first in range(0, n, B):
        # pairs past the end (the last chunk) repeat the last pair; their rows are cut off below
        rows = [loader.row(min(first + loader.dp_rank * local + i, n - 1)) for i in range(local)]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(step.device) for k in rows[0]}
        logps = objective.sequence_logps(step, model, batch).float().contiguous()
        shares = [torch.empty_like(logps) for _ in range(dp)]
        dist.all_gather(shares, logps, group=step.dp_group)
        chunks.append(torch.cat(shares))
    return torch.cat(chunks)[:n].cpu().numpy()


def reference_table(cfg, step, objective, loader, run_dir: Path, rank: int, starting_model: Callable[[], nn.Module],
                    logger) -> np.ndarray:
    """The table for this run (every rank; collective): read from the run directory when it is
    this run's, else computed with `starting_model()` (the starting weights) and written."""
    path = Path(run_dir) / FILE
    ident = identity(cfg, loader, step.engine.autocast_dtype)
    table = _read(path, ident)
    found = torch.tensor([table is not None], dtype=torch.int32, device=step.device)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)  # every rank reads the same file: agree anyway
    if found.item():
        logger.event("dpo_reference_loaded", 0, path=str(path), pairs=loader.n_pairs)
        return table
    t0 = time.perf_counter()
    table = compute_table(step, objective, starting_model(), loader)
    if rank == 0:
        _write(path, table, ident)
    dist.barrier()
    logger.event("dpo_reference_computed", 0, path=str(path), pairs=loader.n_pairs,
                 seconds=round(time.perf_counter() - t0, 3))
    return table
