"""The trainer on 1..4 gloo ranks: every data-parallel engine reproduces the single-process run,
and a checkpointed-and-resumed run reproduces the uninterrupted one exactly."""

import json

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT
from distributed import run_ranks

DEBUG = str(ROOT / "configs" / "debug.yaml")
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "train.global_batch_size=8", "optim.warmup_steps=2", "optim.lr=3e-3", "logging.console=false"]


def _train(overrides, world_size):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dist_llama.train.cli import resolve_config, train

    cfg, dataset = resolve_config(DEBUG, [*TINY, *overrides], world_size)
    trainer = train(cfg, dataset)
    params = get_model_state_dict(trainer.p.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank()
    dist.destroy_process_group()
    return [h["loss"] for h in trainer.history], (params if rank == 0 else None)


def _run(world_size, tmp_path, name, *overrides):
    results = run_ranks(_train, world_size,
                        [f"train.run_dir={tmp_path / name}", "checkpoint.enabled=false", *overrides], world_size)
    return results[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("ref"), "single", "train.steps=5")


def _assert_same(reference, other):
    ref_losses, ref_params = reference
    losses, params = other
    assert len(losses) == len(ref_losses) == 5
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0]
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        err = (params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()
        assert err <= 1e-4, (k, err.item())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,world,overrides", [
    ("ddp2", 2, ["parallel.engine=ddp"]),
    ("fsdp2", 2, ["parallel.engine=fsdp"]),
    ("fsdp2_accum", 2, ["parallel.engine=fsdp", "train.micro_batch_size=2",
                        "parallel.reshard_after_forward=false"]),
    ("hsdp2x2", 4, ["parallel.engine=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("single_accum", 1, ["train.micro_batch_size=2"]),
])
def test_data_parallel_matches_single_process(reference, tmp_path, name, world, overrides):
    _assert_same(reference, _run(world, tmp_path, name, "train.steps=5", *overrides))


@pytest.mark.timeout(300)
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    """10 steps straight vs 5 steps, a checkpoint, and a second job that resumes: identical losses
    and parameters, bit for bit (model, optimizer, LR schedule, data position all restored)."""
    common = ["parallel.engine=fsdp", "checkpoint.interval=5", "optim.decay_steps=10"]
    straight, straight_params = run_ranks(
        _train, 2, [f"train.run_dir={tmp_path / 'straight'}", "train.steps=10", *common], 2)[0]
    first, _ = run_ranks(_train, 2, [f"train.run_dir={tmp_path / 'resumed'}", "train.steps=5", *common], 2)[0]
    second, resumed_params = run_ranks(
        _train, 2, [f"train.run_dir={tmp_path / 'resumed'}", "train.steps=10", *common], 2)[0]
    assert first + second == straight
    for k in straight_params:
        assert torch.equal(straight_params[k], resumed_params[k]), k
    events = [json.loads(l) for l in (tmp_path / "resumed" / "events.jsonl").read_text().splitlines()]
    loaded = [e for e in events if e["event"] == "checkpoint_loaded"]
    assert len(loaded) == 1 and loaded[0]["step"] == 5 and loaded[0]["rng_restored"]
    metrics = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))


@pytest.mark.timeout(300)
def test_resume_with_a_different_data_parallel_degree(tmp_path):
    """Saved by FSDP on 2 ranks, resumed by 1 process: DCP reshards the weights and optimizer state,
    the sampler continues at the same global sample, and the losses follow the 2-rank run's."""
    common = ["checkpoint.interval=5", "optim.decay_steps=10"]
    straight, _ = run_ranks(_train, 2, [f"train.run_dir={tmp_path / 'straight'}", "train.steps=10", *common], 2)[0]
    run_ranks(_train, 2, [f"train.run_dir={tmp_path / 'moved'}", "train.steps=5", *common], 2)
    resumed, _ = run_ranks(_train, 1, [f"train.run_dir={tmp_path / 'moved'}", "train.steps=10", *common], 1)[0]
    assert len(resumed) == 5
    for a, b in zip(resumed, straight[5:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, straight[5:])
