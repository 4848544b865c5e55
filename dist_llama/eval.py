"""dist-llama-eval: lm-evaluation-harness tasks on a dist_llama checkpoint, with no export step.

    dist-llama-eval --checkpoint runs/quickstart --tasks kjv_next --include-path tests/tasks
    torchrun --nproc_per_node 4 -m dist_llama.eval --checkpoint runs/8b --tasks hellaswag,arc_easy --json out.json

The checkpoint is anything the weight sources read: a run or step directory (DCP, any layout it was
saved under; or DeepSpeed), a Hugging Face or Meta directory. Tasks are lm-eval's (by name, or YAML
files under --include-path); the harness builds the requests and computes the metrics, dist_llama's
model answers them (dist_llama/lm_eval_model.py). Under torchrun each rank holds the whole model and
scores its share of every task's documents (lm-eval's rank / world size convention); rank 0 prints
lm-eval's table and writes --json. Nothing is downloaded here (HF_DATASETS_OFFLINE): tasks whose
data is not on disk fail with exit 2; with internet access, unset it to fetch standard tasks.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from dist_llama.config.errors import EXIT_CONFIG, ConfigError
from dist_llama.exit_codes import ArgumentParser

PROG = "dist-llama-eval"


def task_manager(include_path: Optional[str]):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError("--include-path", f"no such directory: {include_path}")
    return TaskManager(include_path=include_path)


def check_tasks(names: list[str], manager, key: str = "--tasks") -> None:
    """Every task name is one lm-eval knows (its own, or a YAML under the include path), and its
    local data files exist. ConfigError naming the first that is not."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise ConfigError(key, f"unknown task {name!r} (not one of lm-eval's {len(known)} tasks nor under "
                                   "--include-path)")
        entry = manager.task_index.get(name)
        config = (entry.cfg if entry is not None else None) or {}
        files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        for split, path in (files.items() if isinstance(files, dict) else [("data", files)]):
            for p in [path] if isinstance(path, str) else list(path):
                if not os.path.isfile(p):
                    raise ConfigError(key, f"task {name!r}: its {split} data file {p} does not exist")


def evaluate(lm, tasks: list[str], manager, limit: Optional[float] = None) -> dict:
    """lm-eval's results dict (rank 0; None elsewhere)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="run or step directory, HF or Meta directory")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", default=None, help="a directory of task YAML files")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--json", default=None, help="write lm-eval's results (and per-example samples) here")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the checkpoint's")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = ap.parse_args(argv)
    from dist_llama.lm_eval_model import offline

    offline()
    try:
        if args.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
        if args.limit is not None and not args.limit > 0:
            raise ConfigError("--limit", f"must be positive, got {args.limit}")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError("--tasks", "name at least one task")
        manager = task_manager(args.include_path)
        check_tasks(tasks, manager)
        from dist_llama.sample import device_and_dtype, init_ranks, load_policy

        device, dtype = device_and_dtype(args)
        model, tokenizer, _ = load_policy(args.checkpoint, args.tokenizer, device, dtype)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ranks = init_ranks()
    rank, world = ranks.rank, ranks.world
    from dist_llama.lm_eval_model import DistLlamaLM
    from dist_llama.model.batch_generation import generate_batch

    def generate(prompts, max_new, stops):
        return [c.ids[:-1] if c.finish == "end_of_turn" else c.ids
                for c in generate_batch(model, prompts, max_new, stop_ids=stops)]

    lm = DistLlamaLM(model, tokenizer, model.args.max_seq_len, device, args.batch_size, rank, world, generate)
    try:
        results = evaluate(lm, tasks, manager, args.limit)
    except (FileNotFoundError, ValueError) as exc:  # a task's data that cannot be read
        print(f"{PROG}: --tasks: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if rank == 0:
        from lm_eval.utils import make_table

        print(make_table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
