"""Tensor, sequence, pipeline and context parallelism, alone and composed on one mesh, on both init
paths (train.meta_init): 3 fp32 training steps of the tiny model give the single-process losses
(≤ 1e-5) and final weights (≤ 1e-4), and checkpoints move between layouts."""

import pytest

from trainrun import assert_same_run, train

STEPS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(1, f"train.run_dir={tmp_path_factory.mktemp('ref')}", "checkpoint.enabled=false",
                 f"train.steps={STEPS}")


LAYOUTS = [
    # name, world size, overrides
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2_1f1b", 2, ["parallel.pp=2", "train.micro_batch_size=4"]),  # 3 micro-batches on 2 stages
    ("pp2_gpipe", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.micro_batch_size=4"]),
    ("pp2_interleaved_1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                 "parallel.pp_virtual_stages=2", "train.micro_batch_size=4"]),
    ("pp2_interleaved_zb", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb",
                               "parallel.pp_virtual_stages=2", "train.micro_batch_size=4"]),
    ("pp2_lighter_ends", 2, ["parallel.pp=2", "parallel.pp_virtual_stages=2", "train.micro_batch_size=4",
                             "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_lighter_ends=true"]),
    ("cp2", 2, ["parallel.cp=2"]),
    ("dp2_ac_full", 2, ["parallel.ac=full"]),
    # FSDP holding whole gradients over the micro-batches and reducing once per step
    ("dp2_reduce_once", 2, ["parallel.reduce_every_micro_batch=false", "train.micro_batch_size=1"]),
    ("dp2_tp2", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("dp2_pp2", 4, ["parallel.dp_shard=2", "parallel.pp=2"]),
    ("tp2_pp2_selective_ac", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.ac=selective",
                                 "parallel.pp_layers_per_stage=[1,3]"]),
    ("dp2_cp2_tp2", 8, ["parallel.dp_shard=2", "parallel.cp=2", "parallel.tp=2"]),
    ("dp2_pp2_tp2", 8, ["parallel.dp_shard=2", "parallel.pp=2", "parallel.tp=2"]),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("meta_init", [False, True], ids=["whole_init", "meta_init"])
@pytest.mark.parametrize("name,world,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_single_process(reference, tmp_path, name, world, overrides, meta_init):
    """Either init path (the whole model initialised then split and sharded, or each rank
    initialising its shard of a meta-device build) trains like the single process."""
    run = train(world, f"train.run_dir={tmp_path}", "checkpoint.enabled=false", f"train.steps={STEPS}",
                f"train.meta_init={meta_init}", *overrides, timeout=280)
    assert_same_run(reference, run, steps=STEPS)


@pytest.mark.timeout(300)
def test_checkpoint_moves_from_fsdp4_to_tp2_pp2(reference, tmp_path):
    """Saved under dp_shard=4, resumed under tp=2 x pp=2: DCP reshards model and optimizer, and
    the continued run follows the single-process losses and weights."""
    common = [f"train.run_dir={tmp_path}", "checkpoint.interval=2", "checkpoint.save_final=false"]
    first, _ = train(4, *common, "train.steps=2", f"optim.decay_steps={STEPS}")
    second, params = train(4, *common, f"train.steps={STEPS}", "parallel.tp=2", "parallel.pp=2",
                           "parallel.dp_shard=1", f"optim.decay_steps={STEPS}")
    assert_same_run(reference, (first + second, params), steps=STEPS)
