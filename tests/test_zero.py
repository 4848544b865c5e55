"""parallel.engine=deepspeed (ZeRO-1/2/3) on 2 gloo ranks: the same losses as an independent FSDP run,
exact resume, a dropped step leaves no trace, and the fault-tolerance drills (NaN rollback and retry,
preemption, a killed rank) end bitwise where a fault-free run ends."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from rundir import read_jsonl
from trainrun import DEBUG, TINY
from dist_llama.testing import run_ranks

STEPS = ["train.steps=10", "optim.decay_steps=10"]


def _train_rank(overrides):
    import torch.distributed as dist

    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.engines import ZeroEngine
    from dist_llama.train.cli import resolve_config, train

    cfg, dataset = resolve_config(DEBUG, [*TINY, *overrides], 2)
    trainer = train(cfg, dataset)
    if not isinstance(trainer.engine, ZeroEngine):
        params = gather_full_state_dict(trainer.engine.parts)
    else:  # DeepSpeed's fp32 master weights, gathered from the ZeRO shards
        from deepspeed.utils import safe_get_full_fp32_param

        params = {name: safe_get_full_fp32_param(p).clone()
                  for name, p in trainer.engine.engine.module.named_parameters()}
    dist.destroy_process_group()
    return [h["loss"] for h in trainer.history], [h["grad_norm"] for h in trainer.history], params


def _train(run_dir, *overrides):
    return run_ranks(_train_rank, 2, [f"train.run_dir={run_dir}", *overrides], timeout=120)[0]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("fsdp"), "parallel.engine=fsdp", "checkpoint.enabled=false", *STEPS)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage,options", [
    (1, ["train.micro_batch_size=3"]),  # gradient accumulation over 2 micro-batches
    (2, ["train.micro_batch_size=3", "parallel.offload_optimizer=true"]),
    (3, ["parallel.offload_optimizer=true", "parallel.offload_params=true"]),
])
def test_zero_matches_fsdp_and_resumes_exactly(fsdp, tmp_path, stage, options):
    """fp32 losses and final weights equal an independent FSDP run's (1e-5); 5 steps, a checkpoint
    through DeepSpeed's save, a new job that loads it and runs to 10: bitwise the uninterrupted run."""
    common = ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", *options, "checkpoint.interval=5",
              "optim.decay_steps=10"]
    straight, _, params = _train(tmp_path / "straight", *common, "train.steps=10")
    fsdp_losses, _, fsdp_params = fsdp
    assert len(straight) == 10
    for a, b in zip(straight, fsdp_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (straight, fsdp_losses)
    assert params.keys() == fsdp_params.keys()
    for k in params:
        assert ((params[k] - fsdp_params[k]).abs().max() / fsdp_params[k].abs().max()).item() <= 1e-4, k

    first, _, _ = _train(tmp_path / "resumed", *common, "train.steps=5")
    second, _, resumed_params = _train(tmp_path / "resumed", *common, "train.steps=10")
    assert first + second == straight
    for k in params:
        assert torch.equal(params[k], resumed_params[k]), k
    events = read_jsonl(tmp_path / "resumed" / "events.jsonl")
    assert [(e["step"], e["rng_restored"]) for e in events if e["event"] == "checkpoint_loaded"] == [(5, True)]
    manifest = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000010" / "manifest.json").read_text())
    assert manifest["state"] == "deepspeed"
    assert "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifest["files"]


def _discard_rank(overrides):
    """A step computed and dropped, then three steps: the dropped step changed nothing."""
    import torch.distributed as dist

    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config(DEBUG, [*TINY, *overrides], 2)
    trainer = build_trainer(cfg, init_distributed("cpu"), dataset)
    batches = [trainer.parts.loader.next_batch() for _ in range(3)]
    dropped = [t.item() for t in trainer.compute_gradients(batches[0])]
    trainer.engine.discard()
    kept = [[t.item() for t in trainer.train_step(b)] for b in batches]
    trainer.close()
    dist.destroy_process_group()
    return dropped, kept


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_dropped_step_changes_nothing(fsdp, tmp_path, stage):
    """The skip / retry / rollback path with finite gradients (a loss spike's): DeepSpeed's buffers
    are cleared without an update, so the retried batch sees the same weights, and the next updates
    start from the same optimizer state: the losses and norms of the FSDP run that never dropped one."""
    dropped, kept = run_ranks(_discard_rank, 2, [f"train.run_dir={tmp_path}", "checkpoint.enabled=false",
                                                 "parallel.engine=deepspeed", f"parallel.zero_stage={stage}",
                                                 "train.micro_batch_size=3", *STEPS], timeout=90)[0]
    assert dropped == kept[0]  # loss and gradient norm of the same batch on the same weights
    fsdp_losses, fsdp_norms, _ = fsdp
    for (loss, norm), ref_loss, ref_norm in zip(kept, fsdp_losses, fsdp_norms):
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss and abs(norm - ref_norm) <= 1e-5 * ref_norm


# --- fault drills under torchrun (the command line users run) -------------------------------------
ZERO3 = ["--config", "configs/debug.yaml", *TINY, "parallel.engine=deepspeed", "parallel.zero_stage=3",
         "train.steps=12", "optim.decay_steps=12", "checkpoint.interval=3"]


def _torchrun(*args, max_restarts=0, expect=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "-m", "dist_llama.train", *ZERO3, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(run_dir):
    """The loss of every step; a step run again after a restart counts once, with its last value."""
    return {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.timeout(420)
def test_zero3_nan_rollback_preemption_retry_and_kill_end_where_a_clean_run_ends(tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "run"
    _torchrun(f"train.run_dir={clean}")
    # Job 1: a NaN at step 4 rolls back to step 3 and replays it; SIGTERM at step 7: save, exit 76.
    proc = _torchrun(f"train.run_dir={run}", "health.faults=[nan:step=4,sigterm:rank=0:step=7]",
                     "health.nan_action=rollback", "health.rollback_skip_data=false", expect=1)
    assert "exit code 76" in proc.stderr
    # Job 2 (the requeue): resumes at 7; a NaN at step 9 is retried; rank 1 is killed at step 11 and
    # torchrun restarts both, which resume from the newest checkpoint.
    _torchrun(f"train.run_dir={run}", "health.faults=[nan:step=9,kill:rank=1:step=11]", max_restarts=1)
    events = read_jsonl(run / "events.jsonl")
    checks = [(e["step"], e["checks"], e["action"]) for e in events if e["event"] == "health_check"]
    assert checks == [(4, ["nan"], "rollback"), (9, ["nan"], "retry")]
    assert [(e["step"], e["failed_step"]) for e in events if e["event"] == "rollback"] == [(3, 4)]
    assert [e["step"] for e in events if e["event"] == "preempted"] == [7]
    loaded = [e["step"] for e in events if e["event"] == "checkpoint_loaded"]
    assert loaded[:2] == [3, 7] and loaded[2] in (7, 9), loaded  # step 9's save may be in flight at the kill
    assert any(e["event"] == "fault_injected" and e["fault"] == "kill" for e in events)
    assert _losses(run) == _losses(clean)
    assert (run / "checkpoints" / "step-00000012" / "manifest.json").is_file()


def _mismatched_engine(tmp_path):
    import torch.distributed as dist

    from dist_llama.train.checkpoint import CheckpointError, Checkpointer
    from dist_llama.train.checkpoint_dcp import DCPState

    dist.init_process_group("gloo")
    saved = tmp_path / "checkpoints" / "step-00000005"
    saved.mkdir(parents=True)
    (saved / "manifest.json").write_text(json.dumps({"step": 5, "state": "deepspeed", "world_size": 1, "files": {}}))
    try:
        Checkpointer(tmp_path, 2, torch.device("cpu"), async_save=False).load(saved, DCPState([], []))
    except CheckpointError as e:
        return str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_a_deepspeed_checkpoint_is_not_loaded_by_fsdp(tmp_path):
    (message,) = run_ranks(_mismatched_engine, 1, tmp_path, timeout=30)
    assert "holds deepspeed state" in message and "parallel.engine" in message


def _replica_groups_on_fake_world():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dist_llama.parallel.dims import ParallelDims
    from dist_llama.config import Config, ParallelConfig
    from dist_llama.train.engines import build_engine

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=4, cp=1, tp=1)
        meshes = dims.build_mesh("cpu")
        groups = {stage: build_engine(Config(parallel=ParallelConfig(engine="deepspeed", zero_stage=stage)), dims,
                                      meshes, torch.device("cpu"), torch.float32, 1).replica_group
                  for stage in (1, 2, 3)}
        return {stage: group and dist.get_process_group_ranks(group) for stage, group in groups.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_zero1_and_2_ranks_are_replicas_for_the_corruption_check():
    """ZeRO-1/2 all-gather whole weights to every rank after each update (a bit flip in one shows
    against the others: checked by hand with 3 ranks, a bitflip fault and a rollback); ZeRO-3 shards them."""
    groups = run_ranks(_replica_groups_on_fake_world, 1, timeout=30)[0]
    assert groups == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3], 3: None}


@pytest.mark.timeout(180)
def test_resuming_a_deepspeed_run_under_fsdp_exits_2_with_one_line(tmp_path):
    """Bad input, not a crash: the run directory holds DeepSpeed state and the command asks for FSDP."""
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "dist_llama.train", "--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64",
              "data.seq_len=64", "logging.console=false", f"train.run_dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "DIST_LLAMA_EXIT_FILE": str(tmp_path / "exit_status")}
    first = subprocess.run([*common, "train.steps=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*common, "train.steps=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    lines = [line for line in second.stderr.splitlines() if line.startswith("dist_llama: checkpoint error")]
    assert len(lines) == 2 and "holds deepspeed state" in lines[0] and "parallel.engine" in lines[0], second.stderr
    assert "raise CheckpointError" not in second.stderr  # no worker traceback
    assert (tmp_path / "exit_status").read_text().startswith("2 checkpoint error: ")  # for the launcher
