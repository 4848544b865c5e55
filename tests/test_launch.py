"""launch/train.sh, the local launcher: standalone with restarts, and the multi-node form (one launcher
per node, c10d rendezvous on an endpoint), both checked against a plain 2-rank run's losses."""

import os
import socket
import subprocess

import pytest

from conftest import ROOT
from rundir import events, losses

TINY = ["--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64", "data.seq_len=64",
        "train.steps=12", "checkpoint.interval=4", "logging.console=false"]
LAUNCH = ["bash", str(ROOT / "launch" / "train.sh")]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled"}


def _launch(*args, timeout=240, expect=0):
    proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    _launch("-n", "2", "--max-restarts", "0", *TINY, f"train.run_dir={run_dir}")
    logs = sorted(p.relative_to(run_dir / "logs").parts[1:] for p in (run_dir / "logs").rglob("stdout.log"))
    assert logs == [("attempt_0", "0", "stdout.log"), ("attempt_0", "1", "stdout.log")]
    return losses(run_dir)


@pytest.mark.timeout(300)
def test_killed_rank_is_restarted_and_the_run_matches(reference, tmp_path):
    run_dir = tmp_path / "run"
    out = _launch("-n", "2", "--max-restarts", "1", *TINY, f"train.run_dir={run_dir}",
                  "health.faults=[kill:rank=1:step=11]")
    assert "OMP_NUM_THREADS=1" in out.stderr  # 2 cores shared by 2 ranks
    assert len(events(run_dir, "train_start")) == 2
    # the newest committed checkpoint (on a loaded machine the async write of step 8 may still be in flight)
    assert [e["step"] for e in events(run_dir, "checkpoint_loaded")] in ([4], [8])
    assert losses(run_dir) == reference
    assert list((run_dir / "logs").rglob("attempt_1/1/stdout.log"))


@pytest.mark.timeout(300)
def test_two_node_form_rendezvous_on_an_endpoint(reference, tmp_path):
    """Two launchers, one per 'node', each with one rank: the same run as one node with two ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    node = ["-n", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n",
            *TINY, f"train.run_dir={run_dir}"]
    procs = [subprocess.Popen([*LAUNCH, *node], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:]
    assert losses(run_dir) == reference
    assert events(run_dir, "train_start")[0]["layout"]["dp_shard"] == 2


def test_bad_config_exits_2_before_any_rank_starts(tmp_path):
    out = _launch("-n", "3", *TINY, f"train.run_dir={tmp_path}/run", expect=2, timeout=60)
    assert "train.global_batch_size" in out.stderr and "torch.distributed.run" not in out.stderr
    assert not (tmp_path / "run").exists()
