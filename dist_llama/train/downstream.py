"""In-loop downstream evaluation: lm-evaluation-harness multiple-choice tasks scored on the live,
sharded model every `train.downstream_eval_interval` steps (and at the last step).

lm-eval builds the requests and computes acc / acc_norm from its task definitions (the tasks are
loaded once, at start); the log-likelihoods come from the step strategy's forward-only pass
(`StepStrategy.evaluate_rows`, the path validation takes), so every layout — FSDP, TP, CP, PP —
scores the same rows the same way, and nothing touches the loader, the RNG or the gradients: a run
trains bit for bit the same with downstream evaluation on or off. Every rank builds every request
(the LM reports rank 0 of 1 to lm-eval) and runs every batch: the model is sharded over all of them.
The first `train.downstream_limit` documents of each task are scored, the same ones every time.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from dist_llama.config.errors import ConfigError
from dist_llama.lm_eval_model import DistLlamaLM, offline
from dist_llama.train.callbacks import Callback
from dist_llama.train.objectives.base import IGNORE_INDEX

KEY = "train.downstream_tasks"


def check_downstream(train) -> None:
    """Before any process group: the include path exists, every task is one lm-eval knows with its
    local data files on disk, and is multiple choice. ConfigError naming the key."""
    from dist_llama.eval import check_tasks

    offline()
    path = train.downstream_include_path
    if path is not None and not os.path.isdir(path):
        raise ConfigError("train.downstream_include_path", f"no such directory: {path}")
    manager = task_manager(path, train.downstream_tasks)
    check_tasks(list(train.downstream_tasks), manager, key=KEY)
    for name in train.downstream_tasks:
        entry = manager.task_index.get(name)
        kind = ((entry.cfg if entry is not None else None) or {}).get("output_type")
        if kind is not None and kind != "multiple_choice":
            raise ConfigError(KEY, f"task {name!r} is {kind}; only multiple_choice tasks are scored in the loop "
                                   "(use dist-llama-eval on a checkpoint for the others)")


def task_manager(path, names):
    """lm-eval's TaskManager over the include path alone when it holds every task named (indexing
    lm-eval's thousands of own task files takes many seconds), else over both."""
    from lm_eval.tasks import TaskManager

    if path is not None:
        local = TaskManager(include_path=path, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=path)


def request_batch(pairs: list[tuple[list[int], list[int]]], seq_len: int, rows: int, device: torch.device) -> dict:
    """One batch of `rows` rows of `seq_len` tokens, one (context, continuation) request per row
    (as DistLlamaLM: cut from the left to seq_len + 1 tokens); only the continuation's tokens are
    labelled, so each row's summed loss is minus its log-likelihood. Unused rows label nothing."""
    tokens = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ctx, cont) in enumerate(pairs):
        whole = (ctx + cont)[-(seq_len + 1):]
        n = len(whole) - 1
        tokens[i, :n] = torch.tensor(whole[:-1])
        labels[i, n - len(cont) : n] = torch.tensor(cont)
    positions = torch.arange(seq_len).expand(rows, seq_len).contiguous()
    batch = {"tokens": tokens, "labels": labels, "doc_ids": torch.zeros_like(tokens), "positions": positions}
    return {k: v.to(device) for k, v in batch.items()}


class LiveModelLM(DistLlamaLM):
    """DistLlamaLM whose log-likelihoods come from the step strategy's forward-only pass over
    batches of the training shape. is_greedy is not computed: multiple-choice metrics do not read it."""

    def __init__(self, step, tokenizer, seq_len: int, rows: int, device: torch.device):
        super().__init__(None, tokenizer, seq_len, device, batch_size=rows)
        self.step = step

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            losses = self.step.evaluate_rows(request_batch(chunk, self.max_length, self.batch_size, self._device))
            out += [(-float(loss), False) for loss in losses[: len(chunk)].tolist()]
        return out


class Downstream(Callback):
    """downstream/<task>/acc and acc_norm (and downstream_time_s) in the record at due steps, after
    validation and before RecordLog logs it."""

    def __init__(self, train, step, tokenizer, device: torch.device, watchdog):
        from lm_eval.tasks import get_task_dict

        offline()
        self.interval, self.total_steps, self.limit = train.downstream_eval_interval, train.steps, train.downstream_limit
        self.step, self.tokenizer, self.device, self.watchdog = step, tokenizer, device, watchdog
        self.tasks = get_task_dict(list(train.downstream_tasks), task_manager(train.downstream_include_path, train.downstream_tasks))

    def due(self, step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == self.total_steps)

    def on_record(self, record: dict, result) -> None:
        if not self.due(record["step"]):
            return
        from lm_eval.evaluator import evaluate

        self.watchdog.beat(record["step"], "evaluate")
        t0 = time.perf_counter()
        lm = LiveModelLM(self.step, self.tokenizer, result.fetched.seq_len, result.rows, self.device)
        quiet = logging.getLogger("lm_eval")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            results = evaluate(lm, self.tasks, limit=self.limit, bootstrap_iters=0, log_samples=False,
                               verbosity="ERROR")["results"]
        finally:
            quiet.setLevel(level)
        for task, metrics in sorted(results.items()):
            for name in ("acc", "acc_norm"):
                if f"{name},none" in metrics:
                    record[f"downstream/{task}/{name}"] = float(metrics[f"{name},none"])
        record["downstream_time_s"] = time.perf_counter() - t0
