"""Chaos soak: episodes of a 2-rank training job under random faults, from inside (injected NaN,
kill, SIGTERM, a hang, failed and corrupted checkpoint writes) and from outside (kill -9 of a worker,
SIGSTOP/SIGCONT of a worker), relaunched like a scheduler would until it finishes. Every fault here
is one the job must survive exactly: each episode's final weights must equal a clean run's bit for
bit. Prints faults injected and survived, episodes, and the effective training time (goodput).

    .venv/bin/python bench/chaos_soak.py --minutes 10 [--seed 0]
    .venv/bin/python bench/chaos_soak.py --quick     # one short episode, one cheap inside fault (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, INTERVAL = 16, 4
COMMON = ["--config", "configs/debug.yaml", "model.n_layers=2", "model.dim=64", "data.seq_len=64",
          f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}", "logging.console=false",
          "health.hang_timeout_s=6", "health.rollback_skip_data=false", "checkpoint.keep_last=4"]
EXACT_EXITS = {0, 1, 75, 76}
"""Exit codes after which the scheduler relaunches (0 ends the episode when the run finished)."""


QUICK_STEPS = 8
"""--quick: the episode's length (the clean run's too), two checkpoints."""
QUICK_FAULTS = ["nan:step={s}", "ckpt_fail:step={c}", "ckpt_corrupt:step={c}"]
"""--quick: faults that cost no restart (a hang costs its timeout, a kill a restart)."""


def torchrun(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", "-m", "dist_llama.train", *COMMON, f"train.run_dir={run_dir}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def final_weights(run_dir: Path) -> dict:
    import warnings

    from dist_llama.weights import open_weights

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process reads: intended

    source = open_weights(run_dir)
    return {name: source.read(name) for name in source.names()}


def workers_of(agent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def outside_faults(proc: subprocess.Popen, rng: random.Random, log: list[str], stop: threading.Event) -> None:
    """At random moments: kill -9 a worker (the agent restarts the group), or freeze one for a
    moment shorter than the hang timeout (only a delay)."""
    while not stop.wait(rng.uniform(3.0, 8.0)) and proc.poll() is None:
        workers = workers_of(proc.pid)
        if not workers:
            continue
        victim = rng.choice(workers)
        try:
            if rng.random() < 0.5:
                os.kill(victim, signal.SIGKILL)
                log.append("outside kill -9")
            else:
                os.kill(victim, signal.SIGSTOP)
                time.sleep(rng.uniform(0.5, 2.0))
                os.kill(victim, signal.SIGCONT)
                log.append("outside SIGSTOP/SIGCONT")
        except ProcessLookupError:
            pass


def inside_faults(rng: random.Random, steps: int = STEPS, quick: bool = False) -> list[str]:
    """A few injected faults at random steps (each fires once per run directory)."""
    kinds = ["nan:step={s}", "kill:rank={r}:step={s}", "sigterm:rank={r}:step={s}", "hang:rank={r}:step={s}",
             "ckpt_fail:step={c}", "ckpt_corrupt:step={c}"]
    chosen = rng.sample(QUICK_FAULTS, k=1) if quick else rng.sample(kinds, k=rng.randint(1, 3))
    return [k.format(s=rng.randint(2, steps), r=rng.randint(0, 1), c=INTERVAL * rng.randint(1, steps // INTERVAL - 1))
            for k in chosen]


def episode(run_dir: Path, rng: random.Random, deadline: float, steps: int = STEPS,
            quick: bool = False) -> tuple[list[str], int]:
    faults = inside_faults(rng, steps, quick)
    log = [f"inside {f}" for f in faults]
    launches = 0
    while True:
        launches += 1
        proc = torchrun(run_dir, [f"train.steps={steps}", f"health.faults=[{','.join(faults)}]"])
        stop = threading.Event()
        outside = threading.Thread(target=outside_faults, args=(proc, rng, log, stop), daemon=True)
        if time.time() < deadline:
            outside.start()
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            stop.set()
        if proc.returncode == 0:
            return log, launches
        if proc.returncode not in EXACT_EXITS or launches > 12:
            raise RuntimeError(f"episode in {run_dir} ended with exit {proc.returncode}:\n{err[-3000:]}")


def goodput(run_dir: Path) -> float:
    from dist_llama.train.metrics import read_jsonl

    records = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "goodput"]
    return records[-1].get("effective_training_time", float("nan")) if records else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"one {QUICK_STEPS}-step episode with one inside fault that costs no restart, "
                             "no outside faults (a smoke test)")
    args = parser.parse_args()
    steps = QUICK_STEPS if args.quick else STEPS
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    clean = work / "clean"
    if torchrun(clean, [f"train.steps={steps}"]).wait() != 0:
        raise SystemExit("the clean run failed")
    reference = final_weights(clean)
    deadline = time.time() + (0 if args.quick else 60 * args.minutes)
    injected = survived = episodes = 0
    kinds: dict[str, int] = {}
    while time.time() < deadline or (args.quick and episodes == 0):
        run_dir = work / f"episode-{episodes}"
        log, launches = episode(run_dir, rng, deadline, steps, args.quick)
        weights = final_weights(run_dir)
        exact = weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
        episodes += 1
        injected += len(log)
        survived += len(log) if exact else 0
        for entry in log:
            kind = entry.split(":")[0].split("=")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"episode {episodes}: {len(log)} faults, {launches} launches, final weights "
              f"{'bit-exact' if exact else 'DIFFER'}, goodput {goodput(run_dir):.2f}: {'; '.join(log)}", flush=True)
        if not exact:
            raise SystemExit(f"episode {episodes} ended with weights that differ from the clean run ({run_dir})")
    print(f"\n{episodes} episodes in {0 if args.quick else args.minutes:g} min: {injected} faults injected, {survived} survived "
          f"bit-exact; by kind: {kinds}")


if __name__ == "__main__":
    main()
