"""`launch/train.sh`: start a training job with torchrun on this machine, or one node of several.

    launch/train.sh -n 4 --config configs/debug.yaml train.steps=50
    launch/train.sh -n 8 --nnodes 2 --rdzv-endpoint node1:29500 --rdzv-id myjob --config ...   # on each node

torchrun restarts every worker when one fails (up to --max-restarts), and the trainer resumes from the
newest valid checkpoint, so a killed rank costs one restart. Each rank's output goes to
<run_dir>/logs/<torchrun run id>/attempt_<k>/<local rank>/{stdout,stderr}.log, and is also echoed here
with a rank prefix. The Slurm batch script (slurm.py) builds its torchrun line with the same function.

A run that stops for good (exit 2: a checkpoint this configuration cannot resume, or bad data; 3:
unrecoverable, a crash loop) ends torchrun's agent rather than let it restart (train/runlock.py
stop_launcher), so torchrun's own status (1) says little; the trainer's exit file says more, and this
launcher exits with that code after one line with the reason.

torchrun dies with this launcher, SIGKILL included (PR_SET_PDEATHSIG, runlock.die_with_parent), and
its workers with torchrun: nothing trains on unsupervised after `kill -9` of the launcher.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from dist_llama import config as config_lib
from dist_llama.config import EXIT_CONFIG, EXIT_FILE_ENV, ConfigError
from dist_llama.train.runlock import die_with_parent



FULL_BELOW_BYTES = 64 * 2**20
"""A filesystem with less free than this (and under 1% of its size) counts as full."""
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def threads_per_rank(nproc: int, cpus: Optional[int] = None) -> int:
    """OMP threads so the ranks on a node share its cores instead of oversubscribing them."""
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(1, cpus // nproc)


def torchrun_args(nproc: int, nnodes: int, rdzv_endpoint: Optional[str], rdzv_id: str, max_restarts: int,
                  log_dir: str, train_args: Sequence[str]) -> list[str]:
    """Arguments after `python -m torch.distributed.run`. One node without an endpoint is standalone."""
    if nnodes == 1 and rdzv_endpoint is None:
        rdzv = ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("more than one node needs a rendezvous endpoint (host:port of one of them)")
        rdzv = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    return [*rdzv, f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            f"--log-dir={log_dir}", "--redirects=3", "--tee=3", "-m", "dist_llama.train", *train_args]


def check_config(config_path: Optional[str], overrides: Sequence[str], world_size: int):
    """Everything checkable before starting any process: a bad key exits 2 here, not on N ranks."""
    cfg = config_lib.to_object(config_lib.load(config_path, overrides))
    return config_lib.validate(cfg, world_size)


def parse_args(argv: Optional[Sequence[str]]):
    parser = argparse.ArgumentParser(
        prog="launch/train.sh",
        description="Train with torchrun on this machine (or as one node of a multi-node job). "
                    "Everything not listed here is passed to the trainer (--config and key=value overrides).")
    parser.add_argument("-n", "--nproc-per-node", type=int, default=2, help="ranks on this node (default 2)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--rdzv-endpoint", help="host:port that every node reaches (multi-node)")
    parser.add_argument("--rdzv-id", default="dist_llama", help="job id shared by the nodes of one job")
    parser.add_argument("--max-restarts", type=int, default=3, help="worker-group restarts on a failure (default 3)")
    parser.add_argument("--threads", type=int, help="OMP threads per rank (default: cores / ranks)")
    parser.add_argument("--config", help="YAML preset (a path, or a name in configs/)")
    return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = check_config(args.config, overrides, args.nnodes * args.nproc_per_node)
    except ConfigError as exc:
        print(f"dist_llama: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(cfg.train.run_dir)
    train_args = ([f"--config={args.config}"] if args.config else []) + list(overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run",
           *torchrun_args(args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.max_restarts,
                          str(run_dir / "logs"), train_args)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads or threads_per_rank(args.nproc_per_node)))
    env.setdefault(EXIT_FILE_ENV, str(run_dir / "logs" / "exit_status"))
    print(f"dist_llama: {' '.join(cmd)}  (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, run directory {run_dir})",
          file=sys.stderr, flush=True)
    code = run_torchrun(cmd, env, Path(env[EXIT_FILE_ENV]))
    note = disk_full_note(run_dir, Path(env[EXIT_FILE_ENV])) if code != 0 else None
    if note:
        print(note, file=sys.stderr, flush=True)
    return code


def disk_full_note(run_dir: Path, exit_file: Path) -> Optional[str]:
    """One line when a failed job ran out of disk: the trainer's reason names ENOSPC (a checkpoint
    that could not be written), or the run directory's filesystem has next to no room left (the
    trainer could not even write its logs)."""
    try:
        reason = exit_file.read_text()
    except OSError:
        reason = ""
    try:
        usage = shutil.disk_usage(run_dir)
    except OSError:
        return None
    if os.strerror(errno.ENOSPC) not in reason and usage.free >= min(FULL_BELOW_BYTES, usage.total // 100):
        return None
    return (f"dist_llama: the disk holding {run_dir} is full ({usage.free / 2**20:.1f} MiB free of "
            f"{usage.total / 2**20:.1f} MiB): free space, then launch again to resume from the last committed checkpoint")


def run_torchrun(cmd: list[str], env: dict, exit_file: Path) -> int:
    """torchrun as a child in a process group of its own, so a terminal's Ctrl-C reaches it once,
    through the forwarding here, as any signal sent to this launcher does; and one that ends with
    this launcher, which can forward nothing when SIGKILLed. Returns the trainer's code
    when it stopped for good (the exit file's), else torchrun's status (128 + N for signal N)."""
    exit_file.unlink(missing_ok=True)
    launcher = os.getpid()
    proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=lambda: die_with_parent(launcher))
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    rc = proc.wait()
    try:
        code, reason = exit_file.read_text().strip().split(" ", 1)
        code = int(code)
    except (OSError, ValueError):
        return rc if rc >= 0 else 128 - rc
    print(f"dist_llama: stopped for good, not restarted: {reason} (exit code {code})", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
