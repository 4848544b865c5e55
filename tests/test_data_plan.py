"""Mixtures and curriculum stages: proportions, exact resume and resharding with a mixture and across
a stage boundary, the switch at the boundary, epochs of a source that runs out, stage validation,
and a two-rank training run through both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_llama.config.data_plan import token_clock
from dist_llama.data.loader import PackedLoader, Source, Stage


class ArraySource:
    """An in-memory TokenSource: tokens = offset + position, documents every `doc` tokens."""

    def __init__(self, n: int, offset: int, doc: int = 37):
        self.n, self.offset, self.doc = n, offset, doc
        self.fingerprint = f"array:{n}:{offset}:{doc}"

    def __len__(self):
        return self.n

    def tokens(self, start, stop):
        return np.arange(start, stop, dtype=np.int64) + self.offset

    def doc_starts_in(self, start, stop):
        first = start // self.doc * self.doc
        return np.arange(first, max(stop, first + 1), self.doc, dtype=np.int64)


def sources(weights=(0.7, 0.3)):
    return [Source("a", ArraySource(20_000, 0), weights[0]), Source("b", ArraySource(3_000, 1_000_000), weights[1])]


STAGES = [Stage(16, 8, {"a": 0.7, "b": 0.3}, until_tokens=16 * 8 * 5),  # 5 steps
          Stage(32, 4, {"a": 0.2, "b": 0.8}, until_tokens=16 * 8 * 5 + 32 * 4 * 4),  # 4 steps
          Stage(8, 16, {"a": 1.0, "b": 0.0})]


def loaders(dp, stages=STAGES, seed=0):
    return [PackedLoader(sources(), 16, 8, r, dp, seed=seed, stages=stages) for r in range(dp)]


def global_steps(dp, k, state=None, stages=STAGES):
    """k global batches assembled from dp ranks, and the state after them."""
    ranks = loaders(dp, stages)
    if state is not None:
        for ld in ranks:
            ld.load_state_dict(state)
    out = []
    for _ in range(k):
        parts = [ld.next_batch() for ld in ranks]
        out.append({n: torch.cat([p[n] for p in parts]) for n in parts[0]})
    return out, ranks[0].state_dict()


def source_of(tokens: torch.Tensor) -> np.ndarray:
    """Which source a row came from (source b's tokens are offset by 1e6)."""
    return (tokens[:, 0] >= 1_000_000).numpy().astype(int)


@pytest.mark.timeout(60)
def test_mixture_proportions_follow_the_weights():
    (loader,) = loaders(1, stages=[Stage(16, 64, {"a": 0.7, "b": 0.3})])
    picks = np.concatenate([source_of(loader.next_batch()["tokens"]) for _ in range(50)])  # 3200 samples
    share_b = picks.mean()
    assert abs(share_b - 0.3) < 4 * (0.3 * 0.7 / len(picks)) ** 0.5  # within 4 binomial sigmas
    tbs = loader.tokens_by_source
    assert tbs["a"] + tbs["b"] == 50 * 64 * 16 and tbs["b"] == int(picks.sum()) * 16


@pytest.mark.timeout(60)
def test_stages_switch_at_the_first_step_starting_past_the_boundary():
    batches, _ = global_steps(1, 12)
    shapes = [tuple(b["tokens"].shape) for b in batches]
    assert shapes == [(8, 16)] * 5 + [(4, 32)] * 4 + [(16, 8)] * 3
    assert token_clock(STAGES, 12)[5] == 16 * 8 * 5
    # stage weights apply: stage 2 draws from source a only
    assert all((source_of(b["tokens"]) == 0).all() for b in batches[9:])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", [3, 5, 7, 9])  # inside stage 0, at both boundaries, inside stage 1
@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 1), (1, 4), (4, 2)])
def test_resume_and_reshard_are_exact_with_a_mixture_and_across_stages(stop, dp_before, dp_after):
    full, _ = global_steps(1, 12)
    _, state = global_steps(dp_before, stop)
    rest, _ = global_steps(dp_after, 12 - stop, state=state)
    for a, b in zip(full[stop:], rest):
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.timeout(60)
def test_a_source_that_runs_out_starts_a_new_epoch_and_says_so():
    (loader,) = loaders(1, stages=[Stage(16, 64, {"a": 0.5, "b": 0.5})])
    windows_b = PackedLoader.num_windows_for(3_000, 16)  # 187: about 6 steps of 32 draws
    seen, epochs = [], []
    for _ in range(16):  # about 512 draws from b: into its third epoch
        batch = loader.next_batch()
        epochs += loader.new_epochs
        rows = batch["tokens"][source_of(batch["tokens"]) == 1]
        seen += [int(r[0]) - 1_000_000 for r in rows]
    first_epoch = seen[:windows_b]
    assert sorted(first_epoch) == [16 * w for w in range(windows_b)]  # every window once, then again
    assert ("b", 1) in epochs and ("b", 2) in epochs and all(e[0] == "b" for e in epochs)


@pytest.mark.timeout(60)
def test_a_resumed_state_must_match_the_sources_and_the_stage_seq_len():
    _, state = global_steps(1, 6)  # in stage 1 (seq_len 32)
    other = [Stage(16, 8, {"a": 0.7, "b": 0.3}, until_tokens=16 * 8 * 5), Stage(64, 4, {"a": 1.0})]
    with pytest.raises(ValueError, match="'seq_len'"):
        PackedLoader(sources(), 16, 8, 0, 1, stages=other).load_state_dict(state)
    with pytest.raises(ValueError, match="'dataset'"):
        PackedLoader([Source("a", ArraySource(20_000, 0))], 16, 8, 0, 1).load_state_dict(state)


def _config_error(overrides, world=1):
    from dist_llama.config import ConfigError
    from dist_llama.train.cli import resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config("configs/debug.yaml", overrides, world)
    return str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides,world,key", [
    (["data.stages=[{until_tokens: 1000}, {seq_len: 102}]", "parallel.cp=2", "parallel.dp_shard=1"], 2,
     "data.stages[1].seq_len"),
    (["data.stages=[{until_tokens: 1000}, {global_batch_size: 7}]"], 2, "data.stages[1].global_batch_size"),
    (["data.stages=[{until_tokens: 1000}, {seq_len: 4096}]"], 1, "data.stages[1].seq_len"),
    (["data.stages=[{until_tokens: 1000}, {until_tokens: 500}]"], 1, "data.stages[1].until_tokens"),
    (["data.stages=[{seq_len: 64}, {seq_len: 128}]"], 1, "data.stages[0].until_tokens"),
    (["data.stages=[{until_tokens: 1000}, {weights: {nope: 1.0}}]"], 1, "data.stages[1].weights"),
    (["data.stages=[{until_tokens: 1000}, {global_batch_size: 16}]", "parallel.engine=deepspeed"], 2,
     "data.stages[1].global_batch_size"),
    (["data.sources=[{name: a, path: kjv, weight: 1}, {name: a, path: kjv, weight: 1}]"], 1, "data.sources[1].name"),
    (["data.sources=[{name: a, path: /nonexistent, weight: 1}]"], 1, "data.sources[0].path"),
])
def test_bad_stages_and_sources_exit_2_naming_the_stage_and_key(overrides, world, key, monkeypatch):
    message = _config_error(overrides, world)
    assert message.startswith(key + ":"), message


def _train(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.train.cli import resolve_config, train

    cfg, srcs = resolve_config("configs/debug.yaml", ["logging.console=false", "logging.wandb_mode=disabled",
                                                      "model.n_layers=2", *overrides], world_size)
    trainer = train(cfg, srcs)
    dist.destroy_process_group()
    return [(h["loss"], h["seq_len"], h["tokens"], h["tokens_by_source"], h["lr"]) for h in trainer.history]


@pytest.mark.timeout(300)
def test_training_with_a_mixture_resumes_bit_exact_across_a_stage_switch(tmp_path):
    """Two ranks, two sources, a stage that doubles seq_len after 6 steps: stopped at step 5 and
    resumed, it gives the uninterrupted run's losses bit for bit, across the switch."""
    from dist_llama.testing import run_ranks

    common = ["data.sources=[{name: kjv, path: kjv, weight: 0.7}, {name: kjv2, path: kjv, weight: 0.3}]",
              "data.stages=[{until_tokens: 6144, seq_len: 128}, {seq_len: 256, global_batch_size: 4}]",
              "train.steps=9", "checkpoint.interval=5", "optim.warmup_steps=2", "optim.decay_steps=9"]
    full = run_ranks(_train, 2, [f"train.run_dir={tmp_path}/full", *common], 2, timeout=250)[0]
    assert [r[1] for r in full] == [128] * 6 + [256] * 3
    assert full[-1][2] == 6 * 8 * 128 + 3 * 4 * 256 == sum(full[-1][3].values())
    first = run_ranks(_train, 2, [f"train.run_dir={tmp_path}/cut", *common, "train.steps=5"], 2, timeout=250)[0]
    rest = run_ranks(_train, 2, [f"train.run_dir={tmp_path}/cut", *common], 2, timeout=250)[0]
    assert [r[0] for r in first + rest] == [r[0] for r in full]
    assert [r[3] for r in first + rest] == [r[3] for r in full]


@pytest.mark.timeout(200)
def test_annealing_takes_the_lr_linearly_to_0_on_its_own_mixture(tmp_path):
    """10 steps of 8 x 128 tokens, the last 3000 annealed on kjv only: steps 9 and 10 (starting at or
    after token 7240) draw from kjv only, and their LR falls linearly from the schedule's value at
    step 9 towards 0 after step 10."""
    import math

    from dist_llama.config.data_plan import anneal_start_step
    from dist_llama.testing import run_ranks
    from dist_llama.train.cli import resolve_config

    overrides = [f"train.run_dir={tmp_path}", "checkpoint.enabled=false", "train.steps=10", "optim.warmup_steps=0",
                 "optim.lr=1e-3", "data.anneal_tokens=3000", "data.anneal_weights={kjv: 1.0}",
                 "data.sources=[{name: kjv, path: kjv, weight: 0.5}, {name: rev, path: kjv, weight: 0.5}]"]
    cfg, _ = resolve_config("configs/debug.yaml", overrides, 1)
    assert anneal_start_step(cfg) == 8
    records = run_ranks(_train, 1, overrides, 1, timeout=180)[0]
    rev = [r[3]["rev"] for r in records]
    assert rev[7] > 0 and rev[9] == rev[8] == rev[7]  # nothing from rev while annealing

    def cosine(step):  # 0-based step, decay over 10 steps to 0.1 x
        return 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 10)))

    lrs = [r[4] for r in records]
    assert lrs[:8] == pytest.approx([cosine(s) for s in range(8)], rel=1e-12)
    assert lrs[8:] == pytest.approx([cosine(8), cosine(8) / 2], rel=1e-12)



@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=2"],
                                    ["parallel.cp=2", "parallel.dp_shard=1"]], ids=["pp2", "cp2"])
def test_layouts_follow_a_stage_switch_like_one_process(tmp_path, layout):
    """A pipeline rebuilds its stages and schedule for the new sequence length and batch, context
    parallel shards the longer sequences: the losses on both sides of the switch equal the
    single-process run's."""
    from dist_llama.testing import run_ranks

    common = ["data.stages=[{until_tokens: 2048, seq_len: 64}, {seq_len: 128, global_batch_size: 4}]",
              "train.steps=6", "checkpoint.enabled=false", "optim.warmup_steps=2", "train.global_batch_size=8"]
    one = run_ranks(_train, 1, [f"train.run_dir={tmp_path}/one", *common], 1, timeout=250)[0]
    other = run_ranks(_train, 2, [f"train.run_dir={tmp_path}/other", *common, *layout], 2, timeout=250)[0]
    assert [r[1] for r in one] == [64] * 4 + [128] * 2
    assert [r[0] for r in other] == pytest.approx([r[0] for r in one], rel=1e-5)
