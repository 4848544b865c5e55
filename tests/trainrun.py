"""Train in every rank of a fork-started gloo job and bring back losses and gathered weights."""

from __future__ import annotations

import torch.distributed as dist

from conftest import ROOT
from dist_llama.testing import run_ranks

DEBUG = str(ROOT / "configs" / "debug.yaml")
# A tiny Llama: 4 layers so pipelines of 2 ranks x 2 virtual stages have a layer per stage,
# 2 kv heads for tp=2, 64-token sequences for cp=2 x tp=2, 12 sequences per step so that pipeline
# micro-batch counts are not multiples of the stage count.
TINY = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "train.global_batch_size=12", "optim.warmup_steps=2", "optim.lr=3e-3", "logging.console=false",
        "train.peak_flops=1e12"]  # a fixed MFU denominator: no matmul timing at every trainer start


def _train_rank(overrides, world_size):
    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.cli import resolve_config, train

    cfg, dataset = resolve_config(DEBUG, [*TINY, *overrides], world_size)
    trainer = train(cfg, dataset)
    params = gather_full_state_dict(trainer.engine.parts)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return [h["loss"] for h in trainer.history], (params if rank == 0 else None)


def train(world_size: int, *overrides: str, timeout: float = 240):
    """(losses, full parameters) of rank 0 of a `world_size`-rank run of the tiny model."""
    return run_ranks(_train_rank, world_size, list(overrides), world_size, timeout=timeout)[0]


def assert_same_run(reference, other, steps: int, loss_rtol: float = 1e-5, param_rtol: float = 1e-4):
    ref_losses, ref_params = reference
    losses, params = other
    assert len(losses) == len(ref_losses) == steps
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= loss_rtol * abs(b), (losses, ref_losses)
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        err = (params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()
        assert err <= param_rtol, (k, err.item())
