"""The command lines users type: torchrun training with resume, prepare + train on own data, wandb."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from rundir import losses, read_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu", "step_time_s"}


def _run(cmd, **kw):
    env = {**os.environ, "WANDB_MODE": kw.pop("wandb_mode", "disabled")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_torchrun_trains_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    base = [*TORCHRUN, "-m", "dist_llama.train", "--config", "configs/debug.yaml", f"train.run_dir={run_dir}"]
    _run([*base, "train.steps=20"])
    assert (run_dir / "config.yaml").is_file()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(REQUIRED <= m.keys() for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, "the debug model should learn within 20 steps"
    assert metrics[-1]["tokens"] == 20 * 8 * 128
    assert (run_dir / "checkpoints" / "step-00000020" / "trainer_state.json").is_file()

    proc = _run([*base, "--train.steps=30"])
    events = read_jsonl(run_dir / "events.jsonl")
    loaded = [e for e in events if e["event"] == "checkpoint_loaded"]
    assert len(loaded) == 1 and loaded[0]["step"] == 20, events
    assert "checkpoint_loaded step=20" in proc.stderr
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 31))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step-00000020", "step-00000030"], kept  # keep_last=2 in the debug preset


@pytest.mark.timeout(300)
def test_prepare_then_train_on_own_data(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i}: " + "the quick brown fox " * (20 + i)}) + "\n"
                            for i in range(60)))
    shards = tmp_path / "shards"
    prepare = os.path.join(os.path.dirname(sys.executable), "dist-llama-prepare")
    _run([prepare, "--tokenizer", "byte", "--out", str(shards), str(docs)])
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["n_docs"] == 60
    run_dir = tmp_path / "run"
    _run([sys.executable, "-m", "dist_llama.train", "--config", "configs/debug.yaml", f"data.path={shards}",
          "data.seq_len=64", "train.steps=3", f"train.run_dir={run_dir}", "checkpoint.enabled=false"])
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 3


@pytest.mark.timeout(300)
def test_wandb_offline_run_keeps_its_id_across_resume(tmp_path):
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "dist_llama.train", "--config", "configs/debug.yaml", f"train.run_dir={run_dir}",
            "model.n_layers=1", "data.seq_len=32"]
    _run([*base, "train.steps=2"], wandb_mode="offline")
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs, list((run_dir / "wandb").iterdir())
    _run([*base, "train.steps=4"], wandb_mode="offline")
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["wandb_id"] == run_id


@pytest.mark.timeout(400)
def test_torchrun_8_ranks_dp_tp_pp_matches_one_rank(tmp_path):
    """The 3-D layout from the command line: dp_shard=2 x tp=2 x pp=2 on 8 gloo ranks reproduces the
    single-process losses of the debug model."""
    base = ["-m", "dist_llama.train", "--config", "configs/debug.yaml", "train.steps=10", "logging.console=false"]
    _run([*TORCHRUN[:-1], "8", *base, f"train.run_dir={tmp_path / 'l8'}",
          "parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"])
    _run([sys.executable, *base, f"train.run_dir={tmp_path / 'l1'}"])
    l8 = losses(tmp_path / "l8")
    l1 = [m["loss"] for m in read_jsonl(tmp_path / "l1" / "metrics.jsonl")]
    assert len(l8) == len(l1) == 10
    for a, b in zip(l8, l1):
        assert abs(a - b) <= 1e-5 * b, (l8, l1)
    layout = json.loads((tmp_path / "l8" / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())["layout"]
    assert layout == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}


def test_trainer_sets_expandable_segments_unless_the_user_did(monkeypatch, tmp_path):
    """The planner allows 5% for fragmentation with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,
    so the trainer sets it before anything touches CUDA; a value the user set is left alone."""
    from dist_llama.train.cli import main

    missing = str(tmp_path / "missing.yaml")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert main(["--config", missing]) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert main(["--config", missing]) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
