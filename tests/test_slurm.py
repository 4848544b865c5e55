"""dist-llama-submit against a real Slurm: a two-node cluster (slurmctld + two slurmd on this host,
slurm/local/) started by this module. Needs Debian's slurmctld, slurmd, slurm-client and munge, which
launch/setup.sh installs when it runs as root; without them these tests fail, they do not skip."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from rundir import events, losses

TRAIN = ["--config", "configs/debug.yaml", "--cluster", "local", "--cpu", "train.steps=24", "optim.decay_steps=24",
         "checkpoint.interval=4", "logging.console=false"]


def _free_port_block(n: int = 4) -> int:
    for base in range(21000, 30000, 10):
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports for the Slurm daemons")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment whose SLURM_CONF points at a fresh two-node cluster; torn down after the module."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)
               and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): run launch/setup.sh as root, "
                    "or apt-get install slurmctld slurmd slurm-client munge")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT": str(_free_port_block())}
    out = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh"), "slurm-2node.conf"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env["WANDB_MODE"] = "disabled"
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True).stdout
    assert sinfo.count("idle") == 2, sinfo
    yield env
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    time.sleep(2)
    subprocess.run(["bash", str(ROOT / "slurm/local/stop.sh")], env=env, capture_output=True, timeout=60)


def _submit(env, run_dir, *extra, wait=True):
    cmd = [sys.executable, "-m", "dist_llama.launch.slurm", *TRAIN, f"train.run_dir={run_dir}", *extra]
    if wait:
        cmd.append("--wait")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _job_id(proc) -> str:
    return proc.stdout.readline().strip()




def _wait_for_step(run_dir, step, timeout=180):
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def _wait_for_event(run_dir, kind, timeout):
    deadline = time.monotonic() + timeout
    while not ((run_dir / "events.jsonl").exists() and events(run_dir, kind)):
        assert time.monotonic() < deadline, f"no {kind} event in {run_dir} after {timeout} s"
        time.sleep(0.5)


def _job_log(run_dir, job_id) -> str:
    return "".join(p.read_text() for p in (run_dir / "slurm").glob(f"*-{job_id}.out"))


class Job:
    """A submitted `dist-llama-submit --wait`; result() waits for it and checks it succeeded."""

    def __init__(self, env, run_dir, *extra):
        self.run_dir = run_dir
        self.proc = _submit(env, run_dir, *extra)
        self.id = _job_id(self.proc)

    def result(self, timeout=360) -> list[float]:
        if self.proc.returncode is None:
            _, err = self.proc.communicate(timeout=timeout)
            assert self.proc.returncode == 0, self.log()[-4000:] + err
        return losses(self.run_dir)

    def log(self) -> str:
        return _job_log(self.run_dir, self.id)


@pytest.fixture(scope="module")
def clean(slurm, tmp_path_factory):
    """The issue's acceptance job, uninterrupted: 2 nodes x 2 gloo ranks; other tests run beside it."""
    return Job(slurm, tmp_path_factory.mktemp("clean"), "--nodes", "2", "--gpus-per-node", "2")


@pytest.mark.timeout(420)
def test_two_nodes_train_and_a_preempted_job_requeues_to_the_same_loss(slurm, clean, tmp_path):
    """The same job preempted (USR1 to the batch script, as Slurm sends before the time limit):
    it saves, requeues once, resumes, and ends with the uninterrupted job's losses, bit for bit."""
    preempted = Job(slurm, tmp_path / "preempted", "--nodes", "2", "--gpus-per-node", "2")
    _wait_for_step(preempted.run_dir, 9)
    subprocess.run(["scancel", "--batch", "--signal=USR1", preempted.id], env=slurm, check=True)
    reference = clean.result()
    assert len(reference) == 24
    assert preempted.result() == reference
    stop = events(preempted.run_dir, "preempted")
    assert len(stop) == 1 and stop[0]["signal"] == "stop_file" and stop[0]["step"] >= 9
    loaded = events(preempted.run_dir, "checkpoint_loaded")
    assert [e["step"] for e in loaded] == [stop[0]["step"]]
    log = preempted.log()
    assert "(requeue 1)" in log and "(requeue 2)" not in log, log[-3000:]
    assert "preflight ok on node n1" in log and "preflight ok on node n2" in log
    assert not (preempted.run_dir / "slurm" / "stop").exists()
    assert "(requeue 1)" not in clean.log()


@pytest.mark.timeout(420)
def test_405b_shaped_layout_runs_from_the_same_script(slurm, clean, tmp_path):
    """Llama 3 405B's layout scaled down: TP inside a node, PP across nodes, interleaved stages, DP
    over the rest (2 nodes x 4 ranks: tp2 x pp2 x dp2); it reproduces the 2x2 FSDP job's losses."""
    job = Job(slurm, tmp_path / "shaped", "--nodes", "2", "--gpus-per-node", "4", "parallel.tp=2", "parallel.pp=2",
              "parallel.dp_shard=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
              "train.steps=4", "cluster.cpus_per_task=4")
    losses, reference = job.result(), clean.result()
    assert events(job.run_dir, "train_start")[-1]["layout"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 2,
                                                                  "cp": 1, "tp": 2}
    assert len(losses) == 4
    for a, b in zip(losses, reference):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, reference[:4])


@pytest.mark.timeout(240)
def test_scancel_leaves_no_stray_processes(slurm, tmp_path):
    run_dir = tmp_path / "cancelled"
    proc = _submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "2", "train.steps=500", wait=False)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    job_id = out.strip()
    _wait_for_step(run_dir, 2)
    assert subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).returncode == 0
    subprocess.run(["scancel", job_id], env=slurm, check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes left after scancel:\n{left}"
    # Slurm lists the job as COMPLETING until its nodes report the cleanup, then drops it
    while (state := subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=slurm, capture_output=True,
                                   text=True).stdout.strip()):
        assert state == "COMPLETING" and time.monotonic() < deadline + 60, f"job {job_id} still {state}"
        time.sleep(1)


@pytest.mark.timeout(300)
def test_a_node_failing_preflight_is_excluded_and_the_job_resubmitted(slurm, tmp_path):
    """n1 fails its preflight: the job records it, resubmits itself without n1, and trains on n2."""
    run_dir = tmp_path / "badnode"
    env = {**slurm, "DIST_LLAMA_PREFLIGHT_FAIL": "n1"}
    proc = _submit(env, run_dir, "--nodes", "1", "--gpus-per-node", "2", "train.steps=3")
    first = _job_id(proc)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # the first job gave up its allocation
    log = _job_log(run_dir, first)
    assert "preflight FAILED on node n1: injected failure" in log, log
    assert (run_dir / "slurm" / "bad_nodes").read_text().split() == ["n1"]
    second = log.split("Submitted batch job ")[1].split()[0]
    _wait_for_event(run_dir, "train_end", timeout=150)
    second_log = _job_log(run_dir, second)
    assert " on n2" in second_log and "preflight ok on node n2" in second_log, second_log
    assert len(losses(run_dir)) == 3


def test_dry_run_renders_the_405b_job(tmp_path):
    """16,384 GPUs: 2,048 nodes x 8, TP 8 x PP 16 x DP 128 from the preset's layout; nothing written.
    `bash -n` checks the script parses, and sbatch's own option parser accepts its #SBATCH lines."""
    out = subprocess.run([sys.executable, "-m", "dist_llama.launch.slurm", "--config", "configs/llama3_405b.yaml",
                          "--cluster", "h100", "parallel.dp_shard=128", f"train.run_dir={tmp_path}/405b",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert "#SBATCH --nodes=2048\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "--nproc-per-node=8" in script and "--nnodes=2048" in script
    assert "16384 ranks" in out.stderr.replace(",", "")
    assert not (tmp_path / "405b").exists()
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("args, key", [
    (["--nodes", "3", "--gpus-per-node", "2"], "train.global_batch_size"),  # 6 ranks do not divide 8
    (["parallel.tp=2", "parallel.dp_shard=-1"], "--nodes"),  # no --nodes and no fixed world size
    (["--nodes", "1", "--cluster", "nosuch"], "--cluster"),
    (["--nodes", "1", "cluster.gpus_per_node=two"], "gpus_per_node"),
])
def test_bad_submissions_exit_2_naming_the_key(args, key, tmp_path):
    cmd = [sys.executable, "-m", "dist_llama.launch.slurm", "--config", "configs/debug.yaml", "--cpu",
           f"train.run_dir={tmp_path}/run", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and key in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


HOSTILE = "it's a $(touch PWNED) run"
"""A run directory name with a space, a single quote and a command substitution."""


def _dry_run(run_dir, *extra):
    cmd = [sys.executable, "-m", "dist_llama.launch.slurm", *TRAIN, "--nodes", "1", f"train.run_dir={run_dir}",
           "--dry-run", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_hostile_run_directory_renders_a_script_bash_accepts(tmp_path):
    out = _dry_run(tmp_path / HOSTILE)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "job.sbatch"
    path.write_text(out.stdout)
    assert subprocess.run(["bash", "-n", str(path)], cwd=tmp_path, capture_output=True).returncode == 0
    assert '"$SCRIPT"' in out.stdout and "{{" not in out.stdout
    assert "#SBATCH --job-name=dist-llama-it_s_a___touch_PWNED__run\n" in out.stdout
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.parametrize("args, key", [
    (["--job-name", "a\nrm -rf x"], "--job-name"),
    (["--job-name", "a b"], "--job-name"),
    (["--time", "1:00\nrm -rf x"], "--time"),
    (["--time", "tomorrow"], "--time"),
    (["cluster.time=1-2-3"], "cluster.time"),
    (["cluster.partition=gpu;reboot"], "cluster.partition"),
    (["cluster.account=$(id)"], "cluster.account"),
    (["cluster.sbatch=[mem=0]"], "cluster.sbatch"),
    (["--exclude", "n1 n2"], "--exclude"),
])
def test_values_for_the_script_are_validated_naming_the_flag(args, key, tmp_path):
    out = _dry_run(tmp_path / "run", *args)
    assert out.returncode == 2 and key in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not out.stdout


def test_a_newline_in_a_preset_value_exits_2_naming_the_key(tmp_path):
    preset = tmp_path / "cluster.yaml"
    preset.write_text('gpus_per_node: 2\nqos: "normal\\nrm -rf /"\n')
    cmd = [sys.executable, "-m", "dist_llama.launch.slurm", "--config", "configs/debug.yaml", "--cpu", "--nodes", "1",
           "--cluster", str(preset), f"train.run_dir={tmp_path}/run", "--dry-run"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cluster.qos" in out.stderr and "newline" in out.stderr, out.stderr


def _outcome(tmp_path, rc, stop=False, exit_status=None, failures=0, requeues=0):
    """The rendered script's own decision (between its `outcome` markers) for a torchrun exit code."""
    script = _dry_run(tmp_path / "run", "cluster.max_failures=2", "cluster.max_requeues=5").stdout
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    for name in ("stop", "exit_status", "failures"):
        (run_dir / "slurm" / name).unlink(missing_ok=True)
    if stop:
        (run_dir / "slurm" / "stop").touch()
    if exit_status:
        (run_dir / "slurm" / "exit_status").write_text(exit_status)
    if failures:
        (run_dir / "slurm" / "failures").write_text("failed\n" * failures)
    block = script[script.index("# outcome RC"):script.index("# end of outcome")]
    prelude = script[script.index("RUN_DIR="):script.index("requeues=")]
    out = subprocess.run(["bash", "-c", f"set -u\n{prelude}requeues={requeues}\n{block}\noutcome {rc}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_script_decides_by_exit_code_what_comes_next(tmp_path):
    assert _outcome(tmp_path, 0) == "done"
    assert _outcome(tmp_path, 0, stop=True) == "requeue-preempted"
    assert _outcome(tmp_path, 1, stop=True, requeues=5) == "preempted"  # the requeue budget is spent
    assert _outcome(tmp_path, 1, exit_status="2 config error: x") == "stop"
    assert _outcome(tmp_path, 1, exit_status="3 crash loop: y") == "stop"
    assert _outcome(tmp_path, 1) == "requeue-failure"  # torchrun's restarts exhausted
    assert _outcome(tmp_path, 137, failures=1) == "requeue-failure"
    assert _outcome(tmp_path, 1, failures=2) == "give-up"


@pytest.mark.timeout(400)
def test_hostile_run_dir_requeues_after_restarts_run_out_then_finishes(slurm, tmp_path):
    """A rank killed with no torchrun restarts left: the script requeues the job (failure budget),
    which resumes and finishes, in a run directory that a shell would misread if anything were
    unquoted; no PWNED file appears anywhere."""
    run_dir = tmp_path / HOSTILE
    job = Job(slurm, run_dir, "--nodes", "1", "--gpus-per-node", "2", "train.steps=6", "cluster.max_restarts=0",
              "health.faults=[kill:rank=1:step=5]")
    assert len(job.result()) == 6
    log = job.log()
    assert "failure 1 of 2; requeueing job" in log and "(requeue 1)" in log, log[-3000:]
    assert (run_dir / "slurm" / "failures").read_text().count("\n") == 1
    assert len(events(run_dir, "train_start")) == 2  # (step 4's async save may die with the kill)
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.timeout(400)
def test_a_crash_loop_stops_the_job_without_requeueing(slurm, tmp_path):
    """A crash at step 3 on every attempt: torchrun's two attempts fail, the job requeues once (the
    budget allows two), the requeued job finds two failures at step 3 and stops with exit 3."""
    run_dir = tmp_path / HOSTILE
    proc = _submit(slurm, run_dir, "--nodes", "1", "--gpus-per-node", "2", "train.steps=6",
                   "health.faults=[crash:rank=1:step=3]", "health.max_failures_at_step=2")
    job_id = _job_id(proc)
    proc.communicate(timeout=360)
    log = _job_log(run_dir, job_id)
    assert proc.returncode == 3, log[-3000:]
    assert "stopped for good, not requeueing: 3 crash loop" in log and "failed at step 3" in log, log[-3000:]
    assert "(requeue 1)" in log and "(requeue 2)" not in log
    assert len(events(run_dir, "crash_loop")) >= 1
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()
