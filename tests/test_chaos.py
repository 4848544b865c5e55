"""Injected and real faults on multi-rank gloo runs: the run finishes on its own, the event log names
the fault and the action, and where the fault is deterministic the final weights are bitwise equal
to a fault-free run."""

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT
import rundir

COMMON = ["--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64", "data.seq_len=64",
          "train.steps=16", "checkpoint.interval=4", "logging.console=false"]


def _torchrun(nproc, max_restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "dist_llama.train"]


def _run(cmd, expect=0, timeout=240):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _final_model(run_dir, step=16):
    """The model tensors of a committed checkpoint, read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step:08d}", out)
    return torch.load(out, weights_only=True)["model"]


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}"])
    return _final_model(run_dir)


@pytest.mark.timeout(300)
def test_outside_kill_9_at_a_random_moment_restarts_and_matches(fault_free, tmp_path):
    """The issue's acceptance run: kill -9 one rank from outside, torchrun --max-restarts 3."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([*_torchrun(2, max_restarts=3), *COMMON, f"train.run_dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    target = random.Random().randint(3, 10)
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= target:
            break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(random.choice(workers)), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-5000:]
    starts = [e for e in rundir.events(run_dir) if e["event"] == "train_start"]
    assert len(starts) == 2, (target, starts)  # one restart
    _assert_bitwise_equal(_final_model(run_dir), fault_free)


@pytest.mark.timeout(300)
def test_injected_kill_under_torchrun_restarts_and_matches(fault_free, tmp_path):
    run_dir = tmp_path / "run"
    _run([*_torchrun(2, max_restarts=3), *COMMON, f"train.run_dir={run_dir}", "health.faults=[kill:rank=1:step=11]"])
    events = rundir.events(run_dir)
    assert any(e["event"] == "fault_injected" and e["fault"] == "kill" and e["rank"] == 1 for e in events)
    loaded = [e for e in events if e["event"] == "checkpoint_loaded"]
    # The step-8 save may still be in flight (async) when rank 1 dies; step 4's is committed.
    assert len(loaded) == 1 and loaded[0]["step"] in (4, 8), loaded
    _assert_bitwise_equal(_final_model(run_dir), fault_free)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("faults,saved", [
    ("sigterm:rank=0:step=6", 6),
    # The step that sees the signal is also retried (NaN): the checkpoint is step 5's, and it must
    # resume at step 6's batch, not after it (found by bench/chaos_soak.py --seed 2).
    ("nan:step=6,sigterm:rank=0:step=6", 5),
], ids=["at_a_step", "at_a_retried_step"])
def test_preemption_saves_exits_76_and_resumes_exactly(fault_free, tmp_path, faults, saved):
    """SIGTERM reaches rank 0 only; both ranks agree at the next step boundary, save, and exit."""
    run_dir = tmp_path / "run"
    proc = _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}", f"health.faults=[{faults}]"],
                expect=1)  # torchrun reports the workers' non-zero exit
    assert "exit code 76" in proc.stderr
    events = rundir.events(run_dir)
    preempted = [e for e in events if e["event"] == "preempted"]
    assert preempted and preempted[0]["step"] == saved and preempted[0]["signal"] == "SIGTERM"
    assert (run_dir / "checkpoints" / f"step-{saved:08d}" / "manifest.json").is_file()
    _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}"])
    assert [e["step"] for e in rundir.events(run_dir) if e["event"] == "checkpoint_loaded"] == [saved]
    _assert_bitwise_equal(_final_model(run_dir), fault_free)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("action", ["retry", "rollback"])
def test_transient_nan_then_retry_or_rollback_matches(fault_free, tmp_path, action):
    run_dir = tmp_path / "run"
    _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}", "health.faults=[nan:step=6]",
          f"health.nan_action={action}", "health.rollback_skip_data=false"])
    events = rundir.events(run_dir)
    checks = [e for e in events if e["event"] == "health_check"]
    assert checks and checks[0]["checks"] == ["nan"] and checks[0]["action"] == action and checks[0]["step"] == 6
    if action == "rollback":
        rollbacks = [e for e in events if e["event"] == "rollback"]
        assert rollbacks and rollbacks[0]["step"] == 4 and rollbacks[0]["failed_step"] == 6
    _assert_bitwise_equal(_final_model(run_dir), fault_free)


@pytest.mark.timeout(300)
def test_hang_is_detected_dumped_and_restarted(fault_free, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    _run([*_torchrun(2, max_restarts=2), *COMMON, f"train.run_dir={run_dir}", "health.faults=[hang:rank=1:step=9]",
          "health.hang_timeout_s=5"])
    events = rundir.events(run_dir)
    hangs = [e for e in events if e["event"] == "hang_detected"]
    assert {e["rank"] for e in hangs} >= {1}
    report = [e for e in events if e["event"] == "hang_report"]
    assert report and report[0]["stuck_ranks"] == [1], report
    fired = next(e for e in events if e["event"] == "fault_injected" and e["fault"] == "hang")
    assert min(e["time"] for e in hangs) - fired["time"] <= 5 + 3  # within the timeout, plus slack
    dump = (run_dir / "hangs" / "hang-rank-00001.txt").read_text()
    assert "faults.py" in dump  # the hung rank's stack shows where it hung
    assert time.monotonic() - t0 < 120
    _assert_bitwise_equal(_final_model(run_dir), fault_free)


@pytest.mark.timeout(300)
def test_silent_data_corruption_names_the_rank_and_rolls_back(tmp_path):
    run_dir = tmp_path / "run"
    clean = tmp_path / "clean"
    # Three replicas, so a majority says which one is corrupt (two could only say they differ).
    ddp = ["parallel.engine=ddp", "health.sdc_interval=1", "train.global_batch_size=6"]
    _run([*_torchrun(3), *COMMON, f"train.run_dir={clean}", *ddp])
    _run([*_torchrun(3), *COMMON, f"train.run_dir={run_dir}", *ddp, "health.faults=[bitflip:rank=1:step=6]",
          "health.rollback_skip_data=false"])
    detected = [e for e in rundir.events(run_dir) if e["event"] == "sdc_detected"]
    assert detected and detected[0]["divergent_ranks"] == [1] and detected[0]["step"] == 6
    assert detected[0]["action"] == "rollback"
    _assert_bitwise_equal(_final_model(run_dir), _final_model(clean))


@contextlib.contextmanager
def _cpu_hog(n: int = 2):
    """n busy-looping processes beside the test's ranks, as on a loaded machine (ended on the way out)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_straggler_slow_inside_its_forward_is_named(tmp_path, engine):
    """Rank 1's forward takes 20x as long (a slow device). Its step ends with collectives like every
    rank's, so all step times are equal: only the compute times can name it, at every check, also
    with the machine loaded (two busy loops beside the 2 ranks): each rank's median over the
    interval's 5 steps, not one step that a preempted rank 0 can make look as slow. Only the forward
    is slowed and it is about a third of the compute, so 20x makes rank 1 about 7x slower overall
    (10x made it only about 4x, and a loaded machine's noise on rank 0 once closed that gap to 2x)."""
    run_dir = tmp_path / "run"
    with _cpu_hog():
        _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}", "train.steps=15", "checkpoint.enabled=false",
              f"parallel.engine={engine}", "health.faults=[slow:rank=1:factor=20]", "health.straggler_interval=5"])
    reports = [e for e in rundir.events(run_dir) if e["event"] == "stragglers"]
    assert [(e["step"], e["ranks"], e["steps"]) for e in reports] == [(5, [1], 5), (10, [1], 5), (15, [1], 5)], reports
    fast = {m["step"]: m["compute_s"] for m in rundir.read_jsonl(run_dir / "metrics.jsonl")}  # rank 0's
    medians = {step: statistics.median(fast[s] for s in range(step - 4, step + 1)) for step in (5, 10, 15)}
    assert all(e["compute_s"][0] > 2 * medians[e["step"]] for e in reports), (reports, fast)


def _pid_of_rank(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The worker process torchrun started for `rank` (its environment says which)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def _running(pid: int) -> bool:
    """Whether the process's main thread is on a CPU or ready for one (state R), not waiting."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "R"


def _steps_logged(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _stop_while_it_works(pid: int, run_dir, steps: int, done: threading.Event, stops: list) -> None:
    """From the first logged step to the last: whenever the process's main thread is working (not
    waiting in a collective: stopping a rank that waits delays nobody), stop the process (SIGSTOP)
    for 40 ms, then let it run 3 ms at least, as a stalled host or a noisy neighbour would."""
    while not done.is_set() and _steps_logged(run_dir) < 1:
        time.sleep(0.01)
    try:
        while not done.is_set() and _steps_logged(run_dir) < steps:
            time.sleep(0.003)
            while not done.is_set() and not _running(pid):
                time.sleep(0.001)
            os.kill(pid, signal.SIGSTOP)
            stops.append(time.monotonic())
            time.sleep(0.04)
            os.kill(pid, signal.SIGCONT)
    except (ProcessLookupError, FileNotFoundError):
        pass  # the process has finished
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # never leave it stopped
        except ProcessLookupError:
            pass


@pytest.mark.timeout(300)
def test_straggler_stopped_from_outside_is_named(tmp_path):
    """Rank 1's process is stopped from outside (SIGSTOP / SIGCONT from a helper thread) for part
    of every step: its compute time grows, the others' does not, and only it is named."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    # The ranks run niced, so the helper thread gets a CPU as soon as it wakes, however busy the
    # machine: a helper that wakes late lets a whole step run without a stop.
    proc = subprocess.Popen(["nice", "-n", "10", *_torchrun(2), *COMMON, f"train.run_dir={run_dir}", "train.steps=10",
                             "checkpoint.enabled=false", "health.straggler_interval=1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done, stops = threading.Event(), []
    helper = threading.Thread(target=_stop_while_it_works, args=(_pid_of_rank(proc.pid, 1), run_dir, 10, done, stops))
    helper.start()
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        done.set()
        helper.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-5000:]
    assert len(stops) >= 12, stops  # stopped in every step after the first, more than once
    reports = rundir.events(run_dir, "stragglers")
    fast = {m["step"]: m["compute_s"] for m in rundir.read_jsonl(run_dir / "metrics.jsonl")}  # rank 0's
    # The stops start once step 1 is logged, when rank 1 may be into step 2 already, so checks 1
    # and 2 see only the machine's own noise. A stop that lands while rank 1 waits in a collective
    # counts as waiting, so a check can miss: from step 3 on, rank 1 must be named at most checks,
    # with its compute time above twice rank 0's, and no check may name another rank.
    named = {e["step"]: e for e in reports if e["step"] >= 3}
    summary = ([(e["step"], e["ranks"], e["compute_s"]) for e in reports], fast)
    assert all(e["ranks"] == [1] for e in named.values()) and len(named) >= 5, summary
    assert all(e["compute_s"][0] > 2 * fast[step] for step, e in named.items()), summary


@pytest.mark.timeout(300)
def test_failed_checkpoint_write_keeps_training(tmp_path):
    run_dir = tmp_path / "run"
    _run([*_torchrun(2), *COMMON, f"train.run_dir={run_dir}", "health.faults=[ckpt_fail:step=8,ckpt_corrupt:step=12]"])
    events = rundir.events(run_dir)
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [8, 12]
    saved = [e["step"] for e in events if e["event"] == "checkpoint_saved"]
    assert saved == [4, 16]


@pytest.mark.timeout(300)
def test_crash_at_the_same_step_every_attempt_stops_as_a_crash_loop(tmp_path):
    """A deterministic crash at step 7 (rank 1, every attempt): three attempts fail at 7 (the first
    saved step 4, the next two resumed from it); the fourth exits 3 before training, naming the step
    and the cause, and ends torchrun's agent though it has restarts left: no fifth attempt. The
    launcher exits 3 with the reason (from the trainer's exit file)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DIST_LLAMA_EXIT_FILE", None)
    proc = subprocess.run(["bash", "launch/train.sh", "-n", "2", "--max-restarts", "6", *COMMON,
                           f"train.run_dir={run_dir}", "health.faults=[crash:rank=1:step=7]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 3, proc.stderr[-3000:]  # EXIT_UNRECOVERABLE
    code, reason = (run_dir / "logs" / "exit_status").read_text().split(" ", 1)
    assert int(code) == 3 and "failed at step 7" in reason, reason
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dist_llama: stopped for good") and "failed at step 7" in last, last
    loop = [e for e in rundir.events(run_dir) if e["event"] == "crash_loop"]
    assert len(loop) == 1 and loop[0]["step"] == 4, loop  # one attempt found the loop, and none followed
    assert "failed at step 7" in loop[0]["reason"] and "injected crash at step 7" in loop[0]["reason"], loop
    starts = [e for e in rundir.events(run_dir) if e["event"] == "train_start"]
    assert [e["step"] for e in starts] == [0, 4, 4], starts  # the fourth attempt stopped before training
    attempts = sorted(p.name for p in (run_dir / "logs").glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1", "attempt_2", "attempt_3"], attempts


def test_crash_loop_needs_the_same_step_and_no_progress(tmp_path):
    from dist_llama.train import crashloop

    for step in (4, 4, 4):
        crashloop.record_start(tmp_path, step, 0)
        crashloop.record_failure(tmp_path, 7, 1, "RuntimeError: boom\nat line 3")
    attempts = crashloop.read_attempts(tmp_path)
    assert "failed at step 7" in crashloop.crash_loop(attempts, 4, 3)
    assert "boom at line 3" in crashloop.crash_loop(attempts, 4, 3)
    assert crashloop.crash_loop(attempts, 4, 4) is None  # only three attempts
    assert crashloop.crash_loop(attempts, 8, 3) is None  # progress: resumed past the failing step
    crashloop.record_start(tmp_path, 4, 0)
    crashloop.record_failure(tmp_path, 6, 0, "OSError")
    assert crashloop.crash_loop(crashloop.read_attempts(tmp_path), 4, 3) is None  # a different step
    crashloop.record_start(tmp_path, 4, 0)
    crashloop.record_end(tmp_path, 4, 0)
    assert crashloop.crash_loop(crashloop.read_attempts(tmp_path), 4, 1) is None  # ended cleanly
    killed = tmp_path / "killed"
    for _ in range(2):
        crashloop.record_start(killed, 4, 0)  # SIGKILLed: nothing recorded but the start
    assert "no cause recorded" in crashloop.crash_loop(crashloop.read_attempts(killed), 4, 2)
    assert crashloop.crash_loop(crashloop.read_attempts(killed), 8, 2) is None  # unknown step: same start needed
