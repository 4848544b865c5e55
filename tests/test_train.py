"""The trainer on 1..4 gloo ranks: every data-parallel engine reproduces the single-process run,
and a checkpointed-and-resumed run reproduces the uninterrupted one exactly."""


import pytest
import torch

from rundir import read_jsonl
from trainrun import assert_same_run, train

def _run(world_size, tmp_path, name, *overrides):
    return train(world_size, f"train.run_dir={tmp_path / name}", "checkpoint.enabled=false", *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("ref"), "single", "train.steps=5")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,world,overrides", [
    ("ddp2", 2, ["parallel.engine=ddp"]),
    ("fsdp2", 2, ["parallel.engine=fsdp"]),
    ("fsdp2_accum", 2, ["parallel.engine=fsdp", "train.micro_batch_size=3",
                        "parallel.reshard_after_forward=false"]),
    ("hsdp2x2", 4, ["parallel.engine=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("single_accum", 1, ["train.micro_batch_size=2"]),
    ("ddp2_accum", 2, ["parallel.engine=ddp", "train.micro_batch_size=3"]),
])
def test_data_parallel_matches_single_process(reference, tmp_path, name, world, overrides):
    assert reference[0][-1] < reference[0][0]
    assert_same_run(reference, _run(world, tmp_path, name, "train.steps=5", *overrides), steps=5)


@pytest.mark.timeout(300)
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    """10 steps straight vs 5 steps, a checkpoint, and a second job that resumes: identical losses
    and parameters, bit for bit (model, optimizer, LR schedule, data position all restored)."""
    common = ["parallel.engine=fsdp", "checkpoint.interval=5", "optim.decay_steps=10"]
    straight, straight_params = train(2, f"train.run_dir={tmp_path / 'straight'}", "train.steps=10", *common)
    first, _ = train(2, f"train.run_dir={tmp_path / 'resumed'}", "train.steps=5", *common)
    second, resumed_params = train(2, f"train.run_dir={tmp_path / 'resumed'}", "train.steps=10", *common)
    assert first + second == straight
    for k in straight_params:
        assert torch.equal(straight_params[k], resumed_params[k]), k
    events = read_jsonl(tmp_path / "resumed" / "events.jsonl")
    loaded = [e for e in events if e["event"] == "checkpoint_loaded"]
    assert len(loaded) == 1 and loaded[0]["step"] == 5 and loaded[0]["rng_restored"]
    metrics = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))


@pytest.mark.timeout(300)
def test_resume_with_a_different_data_parallel_degree(tmp_path):
    """Saved by FSDP on 2 ranks, resumed by 1 process: DCP reshards the weights and optimizer state,
    the sampler continues at the same global sample, and the losses follow the 2-rank run's."""
    common = ["checkpoint.interval=5", "optim.decay_steps=10"]
    straight, _ = train(2, f"train.run_dir={tmp_path / 'straight'}", "train.steps=10", *common)
    train(2, f"train.run_dir={tmp_path / 'moved'}", "train.steps=5", *common)
    resumed, _ = train(1, f"train.run_dir={tmp_path / 'moved'}", "train.steps=10", *common)
    assert len(resumed) == 5
    for a, b in zip(resumed, straight[5:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, straight[5:])
