"""Time from a killed rank to the first completed step after the restart, split into detection,
restart, initialisation + checkpoint load, and the first step; then effective training time of a
longer run with a fault injected every minute.

  python bench/restart_time.py                 # kill-to-first-step breakdown (about 1 minute)
  python bench/restart_time.py --ett 300       # also a 5-minute run, one fault a minute
  python bench/restart_time.py --quick         # the breakdown on a tiny model, 10 steps (a smoke test)

All timestamps come from the run's own logs: the fault's `fault_injected` event (just before the
SIGKILL), torchrun's "failed (exitcode: -9)" line, the new process's `process_start` event, its
`checkpoint_loaded` event, and the `time` of its first metrics record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT_FAILED = re.compile(r"^E(\d{2})(\d{2}) (\d{2}:\d{2}:\d{2}\.\d+) .*failed \(exitcode")


def _torchrun(run_dir: Path, overrides: list[str], max_restarts: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "-m", "dist_llama.train", "--config", "configs/debug.yaml",
           f"train.run_dir={run_dir}", "logging.console=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-4000:]}")
    return proc.stderr


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _agent_times(log: str) -> list[float]:
    """Wall times of torchrun's worker-failure lines (glog stamps are local time, no year)."""
    out = []
    for line in log.splitlines():
        m = AGENT_FAILED.match(line)
        if m:
            month, day, clock = int(m.group(1)), int(m.group(2)), m.group(3)
            year = dt.date.today().year
            stamp = dt.datetime.strptime(f"{year}-{month:02d}-{day:02d} {clock}", "%Y-%m-%d %H:%M:%S.%f")
            out.append(stamp.timestamp())
    return out


def kill_breakdown(kill_step: int, steps: int = 40, interval: int = 10, model: tuple = ()) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="restart-"))
    log = _torchrun(run_dir, [*model, f"train.steps={steps}", f"checkpoint.interval={interval}",
                              f"health.faults=[kill:rank=1:step={kill_step}]"], max_restarts=1)
    events = _jsonl(run_dir / "events.jsonl")
    metrics = _jsonl(run_dir / "metrics.jsonl")
    t_kill = next(e["time"] for e in events if e["event"] == "fault_injected")
    t_detect = next(t for t in _agent_times(log) if t >= t_kill - 1)
    restart = [e for e in events if e["event"] == "process_start" and e["restart_count"] == 1][0]
    t_proc = restart["started"]
    # None: no checkpoint was committed before the kill (the async write still in flight): from step 0.
    loaded = next((e for e in events if e["event"] == "checkpoint_loaded"), None)
    if loaded is None:
        loaded = {"step": 0, "time": next(e["time"] for e in events if e["event"] == "train_start"
                                          and e["time"] > t_proc)}
    t_loaded = loaded["time"]
    t_step = next(m["time"] for m in metrics if m["time"] > t_loaded)
    print(f"killed rank 1 at step {kill_step}; resumed from step {loaded['step']} (checkpoint every {interval} steps)")
    print(f"{'phase':<42}{'seconds':>9}")
    for name, secs in [("detection (kill -> torchrun notices)", t_detect - t_kill),
                       ("restart (-> new worker process started)", t_proc - t_detect),
                       ("init + load (-> checkpoint loaded)", t_loaded - t_proc),
                       ("first step after load", t_step - t_loaded),
                       ("total: kill -> first completed step", t_step - t_kill)]:
        print(f"{name:<42}{secs:>9.2f}")
    lost = kill_step - 1 - loaded["step"]
    print(f"steps recomputed: {lost}")


def effective_training_time(seconds: float) -> None:
    """A run of about `seconds` with one fault a minute: kills, a hang, a NaN rollback."""
    run_dir = Path(tempfile.mkdtemp(prefix="ett-"))
    probe = Path(tempfile.mkdtemp(prefix="ett-probe-"))
    _torchrun(probe, ["train.steps=30", "checkpoint.enabled=false"], max_restarts=0)
    step_s = sorted(m["step_time_s"] for m in _jsonl(probe / "metrics.jsonl"))[15]
    per_min = int(60 / step_s)
    steps = int(seconds / step_s)
    kinds = ["kill:rank=1", "hang:rank=0", "nan", "kill:rank=0", "sigterm:rank=1"]
    faults = [f"{kinds[i % len(kinds)]}:step={per_min * (i + 1)}" for i in range(int(seconds // 60) - 1 or 1)]
    print(f"\n{steps} steps of ~{step_s:.3f} s, faults: {', '.join(faults)}")
    t0 = time.time()
    _torchrun(run_dir, [f"train.steps={steps}", "checkpoint.interval=100", "health.hang_timeout_s=10",
                        "health.nan_action=rollback", f"health.faults=[{','.join(faults)}]"],
              max_restarts=len(faults) + 1)
    wall = time.time() - t0
    events = _jsonl(run_dir / "events.jsonl")
    goodput = [e for e in events if e["event"] == "goodput"][-1]
    print(f"wall {wall:.0f} s, productive step time {goodput['productive_s']:.0f} s, "
          f"checkpoint blocking {goodput['checkpoint_blocking_s']:.1f} s, "
          f"restarts {sum(e['event'] == 'process_start' for e in events) - 1}, "
          f"rollbacks {sum(e['event'] == 'rollback' for e in events)}")
    print(f"effective training time: {100 * goodput['effective_training_time']:.1f}% "
          f"(productive step time / wall time since the first start)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-step", type=int, default=25)
    parser.add_argument("--ett", type=float, default=0, help="seconds of the fault-every-minute run (0 = skip)")
    parser.add_argument("--quick", action="store_true", help="the breakdown only, tiny model, 10 steps (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        kill_breakdown(8, steps=10, interval=2, model=("model.n_layers=2", "model.dim=64", "data.seq_len=64"))
        return
    kill_breakdown(args.kill_step)
    if args.ett:
        effective_training_time(args.ett)


if __name__ == "__main__":
    main()
