"""A hang names the rank that stopped: injected hangs (the rank is alive but behind) and frozen
processes (SIGSTOP from outside: the rank never reports, the others wait for it)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
import rundir
from dist_llama.train.watchdog import Watchdog
from dist_llama.train.heartbeats import Heartbeats, attribute

COMMON = ["--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64", "data.seq_len=64",
          "logging.console=false", "checkpoint.enabled=false"]
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def _beat(step, phase, beat_age, silent, now=1000.0):
    return {"step": step, "phase": phase, "beat": now - beat_age, "alive": now - silent}


def test_attribute_silent_then_behind_then_all():
    now = 1000.0
    silent = {0: _beat(5, "forward_backward", 9, 0.5), 1: _beat(5, "forward_backward", 9.5, 9)}
    assert attribute(silent, stale_s=3, now=now)["suspects"] == [1]
    missing = {0: _beat(5, "forward_backward", 9, 0.5), 1: None}
    assert attribute(missing, stale_s=3, now=now)["suspects"] == [1]
    behind = {0: _beat(5, "health_agreement", 9, 0.5), 1: _beat(5, "step_start", 9.1, 0.2),
              2: _beat(5, "health_agreement", 9, 0.1)}
    report = attribute(behind, stale_s=3, now=now)
    assert report["suspects"] == [1] and report["reason"] == "behind"
    assert report["ranks"][1] == {"step": 5, "phase": "step_start", "age_s": 9.1, "silent_s": 0.2}
    equal = {0: _beat(5, "optimizer", 9, 0.5), 1: _beat(5, "optimizer", 9, 0.5)}
    assert attribute(equal, stale_s=3, now=now) | {"ranks": None} == \
        {"suspects": [0, 1], "reason": "all_equal", "ranks": None}


@pytest.mark.timeout(30)
def test_watchdog_names_a_silent_peer(tmp_path):
    """Rank 1's heartbeat stops being refreshed (as a stopped process's would): rank 0 names it."""
    peer = Heartbeats(tmp_path, 1, 2)
    peer.publish(3, "forward_backward", time.time())
    fired = threading.Event()
    wd = Watchdog(2.0, tmp_path, rank=0, on_hang=fired.set, heartbeats=Heartbeats(tmp_path, 0, 2))
    wd.beat(3, "forward_backward")
    assert fired.wait(10)
    assert wd.report["suspects"] == [1] and wd.report["reason"] == "silent", wd.report
    assert "suspects: ranks [1]" in (tmp_path / "hang-rank-00000.txt").read_text()


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", "0", "-m", "dist_llama.train", *COMMON, *args]


@pytest.mark.timeout(180)
def test_injected_hang_names_the_hung_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(_torchrun(f"train.run_dir={run_dir}", "train.steps=6", "health.hang_timeout_s=4",
                                    "health.faults=[hang:rank=1:step=3]"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0  # the hang exits 75 for the launcher to restart; no restarts left
    hangs = rundir.events(run_dir, "hang_detected")
    assert hangs and all(e["suspects"] == [1] for e in hangs), hangs
    assert hangs[0]["ranks"]["1"]["phase"] == "step_start"  # it hung at the step's start


def _pid_of_rank(agent: int, rank: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split():
            try:
                if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under {agent}")


def _running(pid: int) -> bool:
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "R"


@pytest.mark.timeout(240)
def test_frozen_rank_is_named_by_the_healthy_one(tmp_path):
    """Rank 1 is stopped (SIGSTOP) from outside while it works: it never reports; rank 0 waits for
    it in a collective until its watchdog fires, and names rank 1, not itself."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(f"train.run_dir={run_dir}", "train.steps=100000", "health.hang_timeout_s=6"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    victim = _pid_of_rank(proc.pid, 1)
    try:
        deadline = time.monotonic() + 120
        while len((run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists()
                  else []) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        while not _running(victim):  # stopped while it computes, not while it waits for rank 0
            time.sleep(0.001)
        os.kill(victim, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not [e for e in rundir.events(run_dir, "hang_detected") if e["rank"] == 0]:
            assert time.monotonic() < deadline, "rank 0's watchdog did not fire"
            time.sleep(0.2)
    finally:
        os.kill(victim, signal.SIGKILL)  # a stopped process still takes SIGKILL
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    hang = [e for e in rundir.events(run_dir, "hang_detected") if e["rank"] == 0][0]
    assert hang["suspects"] == [1] and hang["suspect_reason"] == "silent", hang
    assert hang["ranks"]["1"]["silent_s"] > 3 and hang["ranks"]["0"]["silent_s"] < 2, hang
