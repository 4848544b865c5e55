"""torch.compile vs eager: the same training run of the trainer (python -m dist_llama.train) with
train.compile=false and =true, side by side from one invocation. Runs alternate (eager, compiled,
eager, compiled, ...) for --rounds rounds so that machine noise hits both; each run's first
--warmup steps (compilation included) are left out of its median step time. The first step's time
is shown apart: it is what compiling costs. Losses are printed too: compiled training must follow
the eager one.

  python bench/compile_speed.py                               # CPU, debug model (Inductor's C++ backend)
  python bench/compile_speed.py --steps 40 --rounds 3
  python bench/compile_speed.py --config configs/llama3_8b.yaml model.n_layers=4 \
      data.seq_len=8192 train.global_batch_size=1             # one GPU (Triton)
  python bench/compile_speed.py --quick                       # a 1-layer model, 3 steps, 1 round (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(config: str, overrides: list[str], compile: bool, steps: int, run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "dist_llama.train", "--config", config, f"train.steps={steps}",
           f"train.compile={str(compile).lower()}", f"train.run_dir={run_dir}", "checkpoint.enabled=false",
           "logging.console=false", "logging.wandb_mode=disabled", "train.log_interval=1", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "debug.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps of each run left out of its median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 1-layer model, 3 steps, 1 round (a smoke test)")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
        overrides = ["model.n_layers=1", "model.dim=64", "data.seq_len=32", "train.global_batch_size=2", *overrides]
    assert args.steps > args.warmup, "--steps must exceed --warmup"

    step_ms = {False: [], True: []}
    first_s = {False: [], True: []}
    tokens = {False: [], True: []}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for compile in (False, True):
                records = run(args.config, overrides, compile, args.steps, Path(tmp) / f"{r}-{compile}")
                steady = records[args.warmup:]
                step_ms[compile].append(1000 * statistics.median(x["step_time_s"] for x in steady))
                tokens[compile].append(statistics.median(x["tokens_per_sec"] for x in steady))
                first_s[compile].append(records[0]["step_time_s"])
                losses[compile] = [x["loss"] for x in records]

    def row(name, values, fmt):
        e, c = statistics.median(values[False]), statistics.median(values[True])
        print(f"{name:<26}{fmt.format(e):>14}{fmt.format(c):>14}{c / e:>18.2f}")

    print(f"\n{args.config} {' '.join(overrides)}: {args.steps} steps x {args.rounds} rounds each "
          f"(medians; first {args.warmup} steps of each run left out)")
    print(f"{'':<26}{'eager':>14}{'compiled':>14}{'compiled / eager':>18}")
    row("step time (ms)", step_ms, "{:.1f}")
    row("tokens/s", tokens, "{:,.0f}")
    row("first step (s)", first_s, "{:.2f}")
    print(f"{'step time of each run (ms)':<26} eager {', '.join(f'{x:.1f}' for x in step_ms[False])}; "
          f"compiled {', '.join(f'{x:.1f}' for x in step_ms[True])}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
    print(f"losses: eager {losses[False][0]:.4f} -> {losses[False][-1]:.4f}, compiled {losses[True][0]:.4f} -> "
          f"{losses[True][-1]:.4f}; largest relative difference over {len(losses[True])} steps: {worst:.1e}")


if __name__ == "__main__":
    main()
