"""Checkpoints at the edges (issue 25): a real full disk, manifests and indexes that name devices,
FIFOs or files outside the checkpoint, pickles in RNG / DeepSpeed files, a checkpoint that lies about
its model, a truncated DPO reference table, an export that fails half-way, and an export that reads a
checkpoint while the run's retention wants it gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dist_llama.testing import run_ranks
from trainrun import DEBUG, TINY

COMMON = [*TINY, "checkpoint.interval=2", "logging.wandb_mode=disabled"]
CHECKPOINT_BYTES = 3.7e6
"""What one checkpoint of the TINY model takes on disk (3.6 MB of DCP shards, 0.17 MB of metadata)."""


def _train(run_dir, overrides):
    from dist_llama.train.cli import main

    return main(["--config", DEBUG, *COMMON, f"train.run_dir={run_dir}", *overrides])


def _events(run_dir: Path, kind: str) -> list[dict]:
    from rundir import events

    return events(run_dir, kind)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of the TINY model and the logs, not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> None:
    """Write into `directory` until the filesystem has no room left."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "__0_0.distcp", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC


# --- 1: a full disk --------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_a_full_disk_under_the_launcher_fails_saves_naming_enospc_and_stops_74_saying_so(small_disk):
    """The probe's case on a real full filesystem: the first checkpoint commits, the next ones cannot
    be written. Each failure is a checkpoint_failed event naming ENOSPC and the .tmp path (not an
    AttributeError on DCP's (exception, traceback) pairs), the .tmp is removed, max_failed_saves in a
    row stop the run with 74 (for good: no restart would find more room), the launcher's last line
    says the disk is full, and the committed checkpoint is intact."""
    from dist_llama.train.checkpoint_integrity import check_checkpoint

    run_dir = small_disk / "run"
    env = {k: v for k, v in os.environ.items() if k != "DIST_LLAMA_EXIT_FILE"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "launch/train.sh", "-n", "1", "--max-restarts", "2", "--config", DEBUG, *COMMON,
                           "train.steps=10", "checkpoint.max_failed_saves=2", f"train.run_dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=130)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "disk holding" in lines[-1] and "is full" in lines[-1] and str(run_dir) in lines[-1], lines[-3:]
    failed = _events(run_dir, "checkpoint_failed")
    assert len(failed) == 2, failed
    for event in failed:
        assert event["reason"].startswith("No space left on device: ") and ".tmp-step-" in event["reason"], event
        assert ".tmp-step-" in event["path"]
    assert len(_events(run_dir, "process_start")) == 1  # not restarted
    assert check_checkpoint(run_dir / "checkpoints" / "step-00000002", deep=True) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.timeout(120)
def test_a_restart_on_a_disk_filled_by_a_stale_tmp_removes_it_before_writing_anything(small_disk):
    """A save killed half-way on a full disk leaves its .tmp-step-*: the restart must remove it before
    it writes config.yaml (which failed with ENOSPC), then resume from the committed checkpoint."""
    from dist_llama.train.checkpoint_integrity import check_checkpoint

    run_dir = small_disk / "run"
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=2"], timeout=100) == [0]
    stale = run_dir / "checkpoints" / ".tmp-step-00000004"
    _fill(stale)
    assert shutil.disk_usage(small_disk).free < 64 * 1024
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=2"], timeout=100) == [0]
    assert not stale.exists()
    (removed,) = _events(run_dir, "checkpoint_tmp_removed")
    assert removed["path"] == str(stale)
    assert [e["step"] for e in _events(run_dir, "checkpoint_loaded")] == [2]
    assert check_checkpoint(run_dir / "checkpoints" / "step-00000002", deep=True) is None
