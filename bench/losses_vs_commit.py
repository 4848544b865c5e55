"""Training losses of this tree against another commit's, bit for bit, side by side from one run:
pretraining, SFT and DPO on the debug model, on 1 rank, FSDP-2, tp2 and pp2 (DPO: no pp), a few
steps each. For refactors that must not change behaviour (the objective / engine interfaces).

  python bench/losses_vs_commit.py --commit 8d4a9d0          # every objective x layout
  python bench/losses_vs_commit.py --commit 8d4a9d0 --quick  # one rank, 2 steps per objective

The other commit is exported with `git archive` into a temporary directory and run from there (its
own code, this machine's venv). Both runs use the same chat / preference data, prepared once here
with the byte tokenizer; DPO's settings are given under their pre-rename keys (train.dpo_beta, ...),
which both trees read. Exit status 1 when any loss differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("1 rank", 1, []), ("fsdp2", 2, []), ("tp2", 2, ["parallel.tp=2", "parallel.dp_shard=1"]),
           ("pp2", 2, ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=2"])]
COMMON = ["model.n_layers=4", "data.seq_len=64", "train.global_batch_size=8", "checkpoint.enabled=false",
          "logging.console=false", "logging.wandb_mode=disabled", "train.peak_flops=1e12", "health.preflight=false"]


def _data(tmp: Path) -> dict[str, list[str]]:
    """Overrides of each objective: pretraining on the embedded corpus, SFT and DPO on data made here."""
    sys.path.insert(0, str(ROOT))
    from dist_llama.data import build_tokenizer
    from dist_llama.data.prepare import prepare

    tok = build_tokenizer("byte")
    words = ["red", "blue", "green", "gold", "pink", "gray", "teal", "jade"]
    with open(tmp / "chat.jsonl", "w") as f:
        for i in range(64):
            w = words[i % len(words)]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": w}]}) + "\n")
    with open(tmp / "prefs.jsonl", "w") as f:
        for i in range(64):
            w = words[i % len(words)]
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {w}"}], "chosen": w,
                                "rejected": w[::-1]}) + "\n")
    prepare([str(tmp / "chat.jsonl")], tok, str(tmp / "chat"), fmt="chat", progress=False)
    prepare([str(tmp / "prefs.jsonl")], tok, str(tmp / "prefs"), fmt="preference", progress=False)
    return {"pretrain": [],
            "sft": ["train.objective=sft", f"data.path={tmp / 'chat'}", "data.eval_fraction=0"],
            "dpo": ["train.objective=dpo", f"data.path={tmp / 'prefs'}", "data.eval_fraction=0", "data.seq_len=80",
                    "train.dpo_beta=0.5", "train.dpo_nll_coef=0.2", "train.dpo_mask_special=true"]}


def _losses(tree: Path, world: int, overrides: list[str], run_dir: Path) -> list[float]:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
           if world > 1 else [sys.executable])
    cmd += ["-m", "dist_llama.train", "--config", str(tree / "configs" / "debug.yaml"), *COMMON, *overrides,
            f"train.run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"{tree}: {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commit", default="8d4a9d0", help="the commit to compare with (default: before the refactor)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one rank, 2 steps per objective")
    args = ap.parse_args()
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    steps = 2 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.commit], capture_output=True, check=True)
        (tmp / "old.tar").write_bytes(archive.stdout)
        with tarfile.open(tmp / "old.tar") as tar:
            tar.extractall(old, filter="data")
        data = _data(tmp)
        print(f"{'objective':9} {'layout':7} {'steps':>5}  {'this tree (last loss)':>22}  {args.commit + ' (last loss)':>22}  same")
        differ = 0
        for objective, overrides in data.items():
            for name, world, layout in layouts:
                if objective == "dpo" and name == "pp2":
                    continue  # DPO runs without a pipeline (exit 2 naming parallel.pp)
                extra = [*overrides, *layout, f"train.steps={steps}"]
                ours = _losses(ROOT, world, extra, tmp / f"new-{objective}-{world}-{name}")
                theirs = _losses(old, world, extra, tmp / f"old-{objective}-{world}-{name}")
                same = ours == theirs
                differ += not same
                print(f"{objective:9} {name:7} {len(ours):5}  {ours[-1]:22.17f}  {theirs[-1]:22.17f}  "
                      f"{'bitwise' if same else 'DIFFERENT'}", flush=True)
    print("all losses bitwise equal" if not differ else f"{differ} runs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
