"""In-loop downstream evaluation (train.downstream_*): the shipped multiple-choice task scored on the
live model gives the log-likelihoods of a plain forward of the same weights through the one-process
lm-eval model (≤ 1e-5), the same scores and log-likelihoods on dp2 x tp2, pp2 and cp2 as on one rank
(≤ 1e-5), and training losses bit for bit the same with it on or off; bad settings exit 2 naming the
key; logging.tensorboard writes the logged records' numbers as TensorBoard scalars."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT
from trainrun import DEBUG, TINY
from dist_llama.config import ConfigError
from dist_llama.testing import run_ranks

TASKS = str(ROOT / "tests" / "tasks")
STEPS = 2
LIMIT = 5  # documents: 20 requests, two batches of the 12-row training shape
ON = ["train.downstream_eval_interval=1", "train.downstream_tasks=[kjv_next]", f"train.downstream_include_path={TASKS}",
      f"train.downstream_limit={LIMIT}", "checkpoint.enabled=false", f"train.steps={STEPS}"]
OFF = ["checkpoint.enabled=false", f"train.steps={STEPS}"]


def _run_rank(overrides, world_size, reference=False):
    import os

    import torch.distributed as dist

    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train import downstream
    from dist_llama.train.cli import resolve_config, train

    os.chdir(ROOT)  # the task file names its data file relative to the checkout
    seen: list[list[float]] = []
    scored = downstream.LiveModelLM._loglikelihood_tokens

    def record(self, requests, **kwargs):
        out = scored(self, requests, **kwargs)
        seen.append([lp for lp, _ in out])
        return out

    downstream.LiveModelLM._loglikelihood_tokens = record
    cfg, sources = resolve_config(DEBUG, [*TINY, *overrides], world_size)
    trainer = train(cfg, sources)
    out = {"losses": [h["loss"] for h in trainer.history], "loglik": seen,
           "scores": [{k: v for k, v in h.items() if k.startswith("downstream/")} for h in trainer.history]}
    params = gather_full_state_dict(trainer.engine.parts) if reference else None
    if reference and dist.get_rank() == 0:
        out["reference"] = _reference(cfg, params)
    dist.destroy_process_group()
    return out


def _reference(cfg, params) -> list[float]:
    """The last step's weights in a plain Transformer, scored by the one-process lm-eval model
    (full logits, log-softmax) on the same task and documents."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from dist_llama.data import build_tokenizer
    from dist_llama.lm_eval_model import DistLlamaLM
    from dist_llama.model import Transformer

    model = Transformer(cfg.model)
    model.load_state_dict(params)
    model.eval()
    lm = DistLlamaLM(model, build_tokenizer(cfg.data.tokenizer), cfg.data.seq_len, torch.device("cpu"), batch_size=7)
    seen = []
    scored = lm._loglikelihood_tokens

    def record(requests, **kwargs):
        out = scored(requests, **kwargs)
        seen.extend(lp for lp, _ in out)
        return out

    lm._loglikelihood_tokens = record
    evaluate(lm, get_task_dict(["kjv_next"], TaskManager(include_path=TASKS)), limit=LIMIT, bootstrap_iters=0,
             log_samples=False, verbosity="ERROR")
    return seen


def run(world_size: int, *overrides: str, reference: bool = False) -> dict:
    return run_ranks(_run_rank, world_size, list(overrides), world_size, reference, timeout=240)[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(1, f"train.run_dir={tmp_path_factory.mktemp('single')}", *ON, reference=True)


def _close(got: list[float], want: list[float], tol: float) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(got, want))


@pytest.mark.timeout(120)
def test_scores_are_lm_evals_on_a_plain_forward(single):
    assert len(single["loglik"]) == STEPS and all(len(x) == 4 * LIMIT for x in single["loglik"])
    assert _close(single["loglik"][-1], single["reference"], 1e-5), (single["loglik"][-1], single["reference"])
    for scores in single["scores"]:
        assert set(scores) == {"downstream/kjv_next/acc", "downstream/kjv_next/acc_norm"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    # acc from the log-likelihoods written out here: the gold choice has the highest sum
    docs = [json.loads(line) for line in open(ROOT / "tests" / "tasks" / "kjv_next.jsonl")][:LIMIT]
    ll = single["loglik"][-1]
    acc = sum(max(range(4), key=lambda c: ll[4 * i + c]) == d["gold"] for i, d in enumerate(docs)) / LIMIT
    assert single["scores"][-1]["downstream/kjv_next/acc"] == pytest.approx(acc)


@pytest.mark.timeout(120)
def test_downstream_changes_no_training_loss(single, tmp_path):
    off = run(1, f"train.run_dir={tmp_path}", *OFF)
    assert off["loglik"] == [] and off["scores"] == [{}] * STEPS
    assert off["losses"] == single["losses"]  # bit for bit


LAYOUTS = [
    ("dp2_tp2", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("pp2", 2, ["parallel.pp=2"]),
    ("cp2", 2, ["parallel.cp=2"]),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,world,overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_scores_match_single_process(single, tmp_path, name, world, overrides):
    on = run(world, f"train.run_dir={tmp_path}/on", *ON, *overrides)
    for got, want in zip(on["loglik"], single["loglik"], strict=True):
        assert _close(got, want, 1e-5), (name, got, want)
    for got, want in zip(on["scores"], single["scores"], strict=True):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-5 for k in want), (got, want)
    if name == "pp2":  # the schedule switches between eval and step: training unchanged
        off = run(world, f"train.run_dir={tmp_path}/off", *OFF, *overrides)
        assert off["losses"] == on["losses"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides,key,named", [
    (["train.downstream_tasks=[no_such_task]"], "train.downstream_tasks", "no_such_task"),
    (["train.downstream_tasks=[kjv_ppl]"], "train.downstream_tasks", "kjv_ppl"),  # not multiple choice
    (["train.downstream_tasks=[]"], "train.downstream_tasks", "at least one"),
    (["train.downstream_include_path=/nonexistent"], "train.downstream_include_path", "/nonexistent"),
    (["train.downstream_eval_interval=-1"], "train.downstream_eval_interval", "-1"),
    (["train.downstream_limit=0"], "train.downstream_limit", "0"),
])
def test_config_errors_name_the_key(overrides, key, named, capsys, monkeypatch, tmp_path):
    from dist_llama.train.cli import main, resolve_config

    monkeypatch.chdir(ROOT)
    args = [*TINY, *ON, f"train.run_dir={tmp_path}", *overrides]
    with pytest.raises(ConfigError) as exc:
        resolve_config(DEBUG, args, 1)
    assert exc.value.key == key
    assert main(["--config", DEBUG, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and named in err[0], err


@pytest.mark.timeout(30)
def test_a_reward_model_is_refused():
    from dist_llama import config as config_lib
    from dist_llama.config.data_plan import _validate_downstream

    cfg = config_lib.to_object(config_lib.load(DEBUG, [*TINY, *ON, "train.objective=reward"]))
    with pytest.raises(ConfigError) as exc:
        _validate_downstream(cfg)
    assert exc.value.key == "train.downstream_eval_interval" and "reward" in str(exc.value)


@pytest.mark.timeout(60)
def test_missing_data_file_is_named(tmp_path, capsys, monkeypatch):
    from dist_llama.train.cli import main

    monkeypatch.chdir(ROOT)
    text = (ROOT / "tests" / "tasks" / "kjv_next.yaml").read_text()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gone.yaml").write_text(text.replace("task: kjv_next", "task: gone").replace(
        "tests/tasks/kjv_next.jsonl", str(tmp_path / "gone.jsonl")))
    args = [*TINY, *ON, f"train.run_dir={tmp_path}/run", "train.downstream_tasks=[gone]",
            f"train.downstream_include_path={tmp_path}/tasks"]
    assert main(["--config", DEBUG, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.downstream_tasks" in err[0] and "gone.jsonl" in err[0], err


@pytest.mark.timeout(30)
def test_tensorboard_holds_the_logged_numbers(tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_llama.train.metrics import MetricsLogger

    cfg = SimpleNamespace(console=False, wandb_mode="disabled", wandb_project="x", tensorboard=True)
    logger = MetricsLogger(tmp_path, 0, 10, cfg, {})
    records = [{"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "stage": "main", "downstream/t/acc": 0.25},
               {"step": 2, "loss": 2.25, "lr": 2e-3, "grad_norm": 0.5, "val_loss": 2.0,
                "val_loss_by_source": {"a": 1.5, "b": 2.5}, "skipped": False}]
    for r in records:
        logger.log_step(r, eta_s=0.0)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    # every number of each record, per-source validation losses as val_loss/<source>, nothing else
    want = {("loss", 1): 2.5, ("lr", 1): 1e-3, ("grad_norm", 1): 1.0, ("downstream/t/acc", 1): 0.25,
            ("loss", 2): 2.25, ("lr", 2): 2e-3, ("grad_norm", 2): 0.5, ("val_loss", 2): 2.0,
            ("val_loss/a", 2): 1.5, ("val_loss/b", 2): 2.5}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())
