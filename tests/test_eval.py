"""Downstream evaluation through lm-evaluation-harness (dist-llama-eval; the shipped offline tasks in
tests/tasks).

- On a run exported to Hugging Face format, lm-eval's own `hf` backend and dist-llama-eval on the DCP
  checkpoint give the same accuracy and the same per-example log-likelihoods (≤ 1e-4) on both tasks.
- Two ranks give what one gives.
- An unknown task, a task whose data file is missing, a checkpoint that does not exist: one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chatdata import SPECIALS, _bytes_to_unicode
from conftest import ROOT
from trainrun import TINY, train

TASKS = str(ROOT / "tests" / "tasks")


def bos_tokenizer(path) -> str:
    """A byte-level tokenizer.json (ids 0..255 the bytes, then Llama 3's specials) whose Hugging Face
    encoding starts with <|begin_of_text|>, as Llama's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 256)])
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained 20 steps on the embedded corpus, and its Hugging Face export."""
    from dist_llama.weights.export import main as export

    d = tmp_path_factory.mktemp("eval")
    tok = bos_tokenizer(d / "tokenizer.json")
    train(1, *TINY, f"data.tokenizer={tok}", "model.vocab_size=-1", "train.steps=20", f"train.run_dir={d / 'run'}")
    assert export(["--checkpoint", str(d / "run"), "--out", str(d / "hf")]) == 0
    return d


def _samples(results: dict, task: str) -> list:
    return [[float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]]
            for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _ours(checkpoint, out_json, nproc: int = 1, limit: str = "24") -> dict:
    cmd = [sys.executable, "-m", "dist_llama.eval", "--checkpoint", str(checkpoint), "--tasks", "kjv_next,kjv_ppl",
           "--include-path", TASKS, "--limit", limit, "--json", str(out_json), "--batch-size", "8"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|kjv_next|" in proc.stdout and "acc" in proc.stdout
    return json.loads(out_json.read_text())


@pytest.mark.timeout(300)
def test_dcp_checkpoint_scores_as_lm_evals_hf_backend_on_the_export(run, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = _ours(run / "run", tmp_path / "ours.json")
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = HFLM(pretrained=str(run / "hf"), device="cpu", batch_size=8, dtype="float32")
    theirs = lm_eval.simple_evaluate(model=hf, tasks=["kjv_next", "kjv_ppl"], limit=24, log_samples=True,
                                     bootstrap_iters=0, task_manager=TaskManager(include_path=TASKS))
    for task in ("kjv_next", "kjv_ppl"):
        a, b = _samples(ours, task), _samples(theirs, task)
        assert len(a) == len(b) == 24
        assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= 1e-4, task
    assert ours["results"]["kjv_next"]["acc,none"] == theirs["results"]["kjv_next"]["acc,none"]
    assert ours["results"]["kjv_next"]["acc_norm,none"] == theirs["results"]["kjv_next"]["acc_norm,none"]
    assert ours["results"]["kjv_ppl"]["word_perplexity,none"] == pytest.approx(
        theirs["results"]["kjv_ppl"]["word_perplexity,none"], rel=1e-4)


@pytest.mark.timeout(300)
def test_two_ranks_score_what_one_does(run, tmp_path):
    one = _ours(run / "run", tmp_path / "one.json", limit="10")
    two = _ours(run / "run", tmp_path / "two.json", nproc=2, limit="10")
    for task in ("kjv_next", "kjv_ppl"):
        assert _samples(one, task) == _samples(two, task)
    assert one["results"]["kjv_next"]["acc,none"] == two["results"]["kjv_next"]["acc,none"]


@pytest.mark.timeout(120)
def test_bad_inputs_are_one_line_exit_2(run, tmp_path):
    (tmp_path / "gone.yaml").write_text((ROOT / "tests" / "tasks" / "kjv_next.yaml").read_text()
                                        .replace("task: kjv_next", "task: kjv_gone")
                                        .replace("tests/tasks/kjv_next.jsonl", str(tmp_path / "missing.jsonl")))
    cases = [(["--checkpoint", str(run / "run"), "--tasks", "no_such_task", "--include-path", TASKS],
              "unknown task 'no_such_task'"),
             (["--checkpoint", str(run / "run"), "--tasks", "kjv_gone", "--include-path", str(tmp_path)],
              "missing.jsonl does not exist"),
             (["--checkpoint", str(tmp_path / "nope"), "--tasks", "kjv_next", "--include-path", TASKS],
              "--checkpoint: no such file or directory")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "dist_llama.eval", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=100)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
