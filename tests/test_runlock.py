"""One job per run directory (the run lock) and workers that end with their torchrun agent."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dist_llama.train.runlock import RunDirInUse, RunLock, restarts_left
from procs import alive as _alive, children as _workers, gone_within as _gone_within

COMMON = ["--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64", "data.seq_len=64",
          "logging.console=false", "checkpoint.enabled=false"]
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(30)
def test_lock_is_exclusive_released_and_ignores_a_dead_holder(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "job": "old"}))
    first = RunLock(tmp_path, wait_own_job_s=0)
    first.acquire()  # a file left by a dead process is not a held lock
    assert first.holder()["pid"] == os.getpid()
    with pytest.raises(RunDirInUse, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        RunLock(tmp_path, wait_own_job_s=0).acquire()  # flock: per open file, so even in one process
    first.release()
    again = RunLock(tmp_path, wait_own_job_s=0)
    again.acquire()
    again.release()


@pytest.mark.timeout(30)
def test_worker_dies_with_its_launcher(tmp_path):
    """A process that called die_with_launcher ends within a second or two of its parent's SIGKILL."""
    pid_file = tmp_path / "child.pid"
    child = (f"from dist_llama.train.runlock import die_with_launcher; import os, time; die_with_launcher(); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
                               f"time.sleep(60)"], cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    time.sleep(1)
    assert _alive(pid)  # the parent is alive: nothing fires
    parent.kill()
    parent.wait()
    assert _gone_within(pid, 3)


@pytest.mark.timeout(300)
def test_second_job_exits_2_naming_the_holder_and_orphans_die_with_their_agent(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "dist_llama.train", *COMMON, f"train.run_dir={run_dir}", "train.steps=100000"],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():  # the first job trains
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        holder = json.loads((run_dir / ".lock").read_text())
        workers = _workers(first.pid)
        assert holder["pid"] in workers and holder["host"] == socket.gethostname()

        second = subprocess.run([sys.executable, "-m", "dist_llama.train", *COMMON, f"train.run_dir={run_dir}",
                                 "train.steps=2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"host {holder['host']}, pid {holder['pid']}" in line and "in use" in line, second.stderr
        assert first.poll() is None  # the first job was not disturbed

        first.send_signal(signal.SIGKILL)  # the agent alone: its workers run in sessions of their own
        first.wait()
        assert all(_gone_within(pid, 5) for pid in workers), [p for p in workers if _alive(p)]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    after = subprocess.run([sys.executable, "-m", "dist_llama.train", *COMMON, f"train.run_dir={run_dir}",
                            "train.steps=2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads((run_dir / ".lock").read_text())["pid"] != holder["pid"]


def test_restarts_left_from_what_torchrun_tells_its_workers():
    """stop_launcher ends the agent only while it would restart: max restarts minus those done."""
    assert restarts_left({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "1"}) == 2
    assert restarts_left({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "3"}) == 0
    assert restarts_left({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RESTART_COUNT": "0"}) == 0
    assert restarts_left({}) == 0  # not under torchrun
