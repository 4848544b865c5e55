"""Inputs at the edges that are not refused but must be handled: weights whose sum overflows,
degenerate chat and preference records left out with --skip-bad, DeepSpeed in one process without
torchrun, and Ctrl-C on a single-process run (saved, exit 130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from rundir import read_jsonl
from trainrun import DEBUG, TINY



@pytest.mark.timeout(30)
def test_weights_whose_sum_overflows_are_shared_evenly():
    """1e308 and 1e308: finite weights whose sum is inf; each source gets half (the old division by
    the sum drew every sample from the last source)."""
    from dist_llama.data.loader import PackedLoader, Source, Stage, normalised
    from test_data_plan import ArraySource

    assert normalised([1e308, 1e308]).tolist() == [0.5, 0.5]
    assert normalised([1e308, 0.0, 1e308, 1e308]).tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    assert normalised([3.0, 1.0]).tolist() == [0.75, 0.25]  # a finite sum: divided by it, as before
    sources = [Source("a", ArraySource(100_000, 0)), Source("b", ArraySource(100_000, 1_000_000))]
    loader = PackedLoader(sources, seq_len=16, global_batch_size=200, dp_rank=0, dp_size=1, seed=0,
                          stages=[Stage(16, 200, {"a": 1e308, "b": 1e308})])
    drawn = loader._assign(0, 2000)
    share = (drawn == 0).mean()
    assert 0.45 < share < 0.55, share  # 2000 draws of a fair coin: 0.5 +- 0.011 (1 sigma)


def _prepare(tmp_path, fmt, records, *flags):
    from dist_llama.data.prepare import main

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return main(["--tokenizer", "byte", "--out", str(tmp_path / "out"), "--format", fmt, "--workers", "1",
                 "--quiet", *flags, str(path)])


@pytest.mark.timeout(60)
def test_skip_bad_leaves_degenerate_records_out_and_lists_them(tmp_path, capsys):
    prompt = [{"role": "user", "content": "Colour?"}]
    good = {"prompt": prompt, "chosen": "red", "rejected": "blue"}
    records = [good, {"prompt": prompt, "chosen": "red", "rejected": " red "}, {"prompt": prompt, "chosen": "",
               "rejected": "x"}, good, {"prompt": [{"role": "assistant", "content": "Hi"}, *prompt], "chosen": "a",
                                         "rejected": "b"}]
    with pytest.raises(SystemExit) as exc:  # refused by default: the first bad record's file and line
        _prepare(tmp_path, "preference", records)
    assert exc.value.code == 2 and "in.jsonl:2: 'chosen' and 'rejected' are the same" in capsys.readouterr().err
    assert _prepare(tmp_path, "preference", records, "--skip-bad") == 0
    skipped = read_jsonl(tmp_path / "out" / "skipped.jsonl")
    assert [s["line"] for s in skipped] == [2, 3, 5], skipped
    assert "same response" in skipped[0]["reason"] and "empty" in skipped[1]["reason"]
    assert "message 0 is 'assistant'" in skipped[2]["reason"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["n_docs"] == 4 and meta["skipped"] == 3  # two good pairs, two documents each
    assert "skipped 3 bad record(s)" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_deepspeed_in_one_process_without_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "dist_llama.train", "--config", DEBUG, *TINY, "train.steps=2",
                           "parallel.engine=deepspeed", "parallel.zero_stage=2", "checkpoint.enabled=false",
                           f"train.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=220, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.timeout(240)
def test_ctrl_c_on_one_process_saves_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dist_llama.train", "--config", DEBUG, *TINY, "train.steps=100000",
                             "checkpoint.interval=100000", f"train.run_dir={run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 200
        while not (run / "metrics.jsonl").is_file() or len(read_jsonl(run / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted (SIGINT) at step" in err, err[-3000:]
    last = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == [f"step-{last:08d}"], (saved, last)
