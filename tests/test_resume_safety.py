"""Starting in a run directory that already has checkpoints: a different model, seed or sequence
length, checkpoint.resume=false, or checkpoints that are all invalid exit 2 naming the key before
anything is written (config.yaml included); a torn last line in events.jsonl does not stop a resume."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch.distributed as dist

from conftest import ROOT
from dist_llama.testing import run_ranks
from trainrun import DEBUG, TINY

COMMON = [*TINY, "train.steps=2", "checkpoint.interval=2", "logging.wandb_mode=disabled"]


def _train(run_dir, overrides):
    from dist_llama.train.cli import main

    return main(["--config", DEBUG, *COMMON, f"train.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert run_ranks(_train, 1, str(run_dir), [], timeout=120) == [0]
    return run_dir


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,message", [
    (["model.n_layers=2"], "model.n_layers: checkpoint step-00000002 has 4, config has 2"),
    (["model.dim=32"], "model.dim: checkpoint step-00000002 has 64, config has 32"),
    (["train.seed=7"], "train.seed: checkpoint step-00000002 has 0, config has 7"),
    (["data.seq_len=32"], "data.seq_len: checkpoint step-00000002 has 64, config has 32"),
    (["checkpoint.resume=false"], "checkpoint.resume: false, but"),
])
def test_a_start_that_does_not_fit_the_checkpoints_exits_2_and_writes_nothing(trained, tmp_path, overrides,
                                                                             message, capsys, monkeypatch):
    from dist_llama.train.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "config.yaml").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["--config", DEBUG, *COMMON, "train.steps=4", f"train.run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_checkpoints_that_are_all_invalid_stop_the_job_instead_of_being_overwritten(trained, tmp_path, capsys,
                                                                                    monkeypatch):
    from dist_llama.train.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    step = run_dir / "checkpoints" / "step-00000002"
    (step / "manifest.json").unlink()
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["--config", DEBUG, *COMMON, "train.steps=4", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.run_dir" in err and "none is valid" in err, err
    assert step.is_dir()


@pytest.mark.timeout(180)
def test_a_torn_last_line_in_the_logs_does_not_stop_a_resume(trained, tmp_path):
    from rundir import events

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"event": "train_st')  # a full disk or a crash in the middle of a write
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=4"], timeout=120) == [0]
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds.count("checkpoint_loaded") == 1 and kinds[-1] == "goodput"


def test_a_failed_save_names_the_operating_system_error_and_its_file():
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from dist_llama.train.checkpoint import failure_reason

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.tmp-8/__0_0.distcp")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == "No space left on device: /runs/x/checkpoints/.tmp-8/__0_0.distcp"
    # DCP's per-rank failures, as torch 2.13 gathers them: (exception, traceback summary) per rank
    dcp_failure = CheckpointException("save failed", {0: _wrap_exception(RuntimeError("peer")), 1: _wrap_exception(full)})
    assert failure_reason(dcp_failure).startswith("No space left on device: /runs/x")


@pytest.mark.timeout(120)
def test_a_final_save_that_fails_exits_74_naming_the_last_committed_step(tmp_path):
    from rundir import events

    run_dir = tmp_path / "run"
    codes = run_ranks(_train, 1, str(run_dir), ["train.steps=4", "health.faults=[ckpt_fail:step=4]"], timeout=120)
    assert codes == [74]
    (failed,) = events(run_dir, "final_checkpoint_failed")
    assert failed["step"] == 4 and failed["last_committed"] == 2


@pytest.mark.timeout(120)
def test_saves_failing_in_a_row_stop_the_run_naming_the_last_committed_step(tmp_path):
    from rundir import events

    run_dir = tmp_path / "run"
    codes = run_ranks(_train, 1, str(run_dir), [
        "train.steps=10", "checkpoint.async_save=false", "checkpoint.max_failed_saves=2",
        "health.faults=[ckpt_fail:step=4,ckpt_fail:step=6,ckpt_fail:step=8]"], timeout=120)
    assert codes == [74]
    (stop,) = events(run_dir, "checkpoints_failing")
    assert stop["step"] == 8 and stop["last_committed"] == 2 and stop["failed_in_a_row"] == 2


@pytest.mark.timeout(120)
def test_under_torchrun_a_start_that_does_not_fit_is_not_restarted(trained, tmp_path):
    """The same refusal on 2 ranks under launch/train.sh with restarts to spare: the first attempt's
    exit 2 ends torchrun's agent (a restart would be refused the same way), and the launcher exits 2
    with the reason as its last line."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    env = {key: value for key, value in os.environ.items() if key != "DIST_LLAMA_EXIT_FILE"}
    proc = subprocess.run(["bash", "launch/train.sh", "-n", "2", "--max-restarts", "3", "--config", DEBUG, *COMMON,
                           "train.steps=4", f"train.run_dir={run_dir}", "model.n_layers=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "model.n_layers: checkpoint step-00000002 has 4, config has 2" in last, \
        proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "logs").glob("*/attempt_*")) == ["attempt_0"]
