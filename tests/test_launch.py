"""launch/train.sh, the local launcher: standalone with restarts, and the multi-node form (one launcher
per node, c10d rendezvous on an endpoint), both checked against a plain 2-rank run's losses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from procs import alive, children, descendants, gone_within
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


@pytest.mark.timeout(180)
def test_sigkill_of_the_launcher_ends_torchrun_and_its_workers(tmp_path):
    """kill -9 of launch/train.sh (which can forward nothing) leaves no torchrun and no worker training
    on: torchrun dies with the launcher (PR_SET_PDEATHSIG), the workers with torchrun."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([*LAUNCH, "-n", "2", "--max-restarts", "3", *TINY, "train.steps=100000",
                                 "checkpoint.enabled=false", f"train.run_dir={run_dir}"], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    family = []
    try:
        deadline = time.monotonic() + 150
        while not (run_dir / "metrics.jsonl").exists():  # training
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.2)
        (torchrun,) = children(launcher.pid)
        family = [torchrun, *children(torchrun)]
        assert len(family) == 3, family  # torchrun and its 2 workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert all(gone_within(pid, 10) for pid in family), [pid for pid in family if alive(pid)]
    finally:  # nothing left running, also when an assertion above failed
        family = family or (descendants(launcher.pid) if launcher.poll() is None else [])
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _raw_torchrun(max_restarts: int, *args, timeout=120):
    """torchrun itself, as people run it (no launcher, no exit file)."""
    env = {key: value for key, value in _env().items() if key != "DIST_LLAMA_EXIT_FILE"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                           f"--max-restarts={max_restarts}", "-m", "dist_llama.train", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_restarts", [0, 2])
def test_under_raw_torchrun_a_bad_layout_fails_once_and_is_not_killed(tmp_path, max_restarts):
    """3 ranks cannot split a global batch of 8. Without restarts left torchrun is left to give up
    (exit 1, the workers' exit code 2 in its table); with restarts left its agent is ended with
    SIGTERM, so it exits 1 as well: never 137 (SIGKILL, read as out of memory), and no second attempt.
    The error is printed once, by local rank 0."""
    proc = _raw_torchrun(max_restarts, *TINY, f"train.run_dir={tmp_path}/run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-5000:]
    errors = [line for line in out.splitlines() if "dist_llama: config error: train.global_batch_size" in line]
    assert len(errors) == 1, out[-5000:]
    if max_restarts == 0:
        assert "exitcode  : 2" in out, out[-5000:]
    else:
        assert "Received 15 death signal" in out and "will restart worker group" not in out, out[-5000:]


def _prepared_then_corrupted(tmp_path):
    """A dataset from dist-llama-prepare (byte tokenizer, 4 shards), whose last shard is then
    overwritten with token ids outside the vocabulary, as a shard changed after prepare would be."""
    from dist_llama.data import ByteTokenizer, prepare

    docs = tmp_path / "docs.jsonl"
    text = (ROOT / "README.md").read_text()
    docs.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, 40000, 1000)))
    out = tmp_path / "ds"
    meta = prepare([str(docs)], ByteTokenizer(), str(out), shard_tokens=20000, progress=False)
    shard = out / meta["shards"][-1]["file"]
    data = np.fromfile(shard, dtype="<u2")
    data[:] = 60000
    data.tofile(shard)
    return out, shard


@pytest.mark.timeout(240)
def test_a_shard_changed_after_prepare_stops_training_with_exit_2_naming_it(tmp_path):
    """Bad data read mid-training is bad input, not a crash: exit 2 with the shard file and position
    named, the cause in the crash-loop ledger, and no second attempt though 2 restarts remain."""
    data, shard = _prepared_then_corrupted(tmp_path)
    run_dir = tmp_path / "run"
    env = {key: value for key, value in _env().items() if key != "DIST_LLAMA_EXIT_FILE"}
    proc = subprocess.run([*LAUNCH, "-n", "2", "--max-restarts", "2", *TINY, "train.steps=40",
                           f"data.path={data}", f"train.run_dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-5000:]
    assert last.startswith("dist_llama: stopped for good") and f"data error: {shard}: token id 60000 at position" \
        in last, proc.stderr[-5000:]
    assert sorted(p.name for p in (run_dir / "logs").glob("*/attempt_*")) == ["attempt_0"]
    assert len(events(run_dir, "train_start")) == 1  # found while training, not before
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert f"DataError: {shard}: token id 60000" in [f for f in failures if f["kind"] == "failure"][0]["cause"]
