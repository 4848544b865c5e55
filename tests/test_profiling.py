"""train.profile_steps writes a torch.profiler Chrome trace per rank for the chosen steps, with the
paths in events.jsonl; on CUDA, train.memory_snapshot_step and train.memory_snapshot_on_oom dump the
allocator's memory history (the `gpu` tests)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from trainrun import DEBUG, train
from dist_llama.config import ConfigError, load, to_object, validate


@pytest.mark.timeout(120)
def test_profile_steps_write_a_chrome_trace_per_rank(tmp_path):
    train(2, f"train.run_dir={tmp_path}", "checkpoint.enabled=false", "train.steps=3", "train.profile_steps=[2]")
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    traces = {e["rank"]: e["path"] for e in events if e["event"] == "profile_trace"}
    assert traces == {r: str(tmp_path / "profile" / "step-2" / f"rank-{r}.json") for r in (0, 1)}
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["step-2"]  # the chosen step only
    for path in traces.values():
        trace = json.loads(open(path).read())
        ops = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("name", "").startswith("aten::")]
        names = {e["name"] for e in ops}
        assert {"aten::mm", "aten::all_reduce"} & names and len(ops) > 100, sorted(names)[:20]
        assert any(e["name"] == "[memory]" for e in trace["traceEvents"])  # profile_memory


@pytest.mark.timeout(30)
@pytest.mark.parametrize("override,key", [
    ("train.profile_steps=[0]", "train.profile_steps"),
    ("train.profile_steps=[99]", "train.profile_steps"),
    ("train.memory_snapshot_step=99", "train.memory_snapshot_step"),
    ("train.memory_snapshot_on_oom=true", "train.memory_snapshot_step"),
    ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
])
def test_bad_profile_and_loss_keys_name_the_key(tmp_path, override, key):
    cfg = to_object(load(DEBUG, [f"train.run_dir={tmp_path}", "train.steps=5", "train.device=cpu", override]))
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert err.value.key == key


@pytest.mark.timeout(30)
def test_chunked_loss_refused_under_zero3(tmp_path):
    cfg = to_object(load(DEBUG, [f"train.run_dir={tmp_path}", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                                 "train.loss_chunk_tokens=1024"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert err.value.key == "train.loss_chunk_tokens" and "zero_stage=3" in err.value.message


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_memory_snapshot_at_a_step_and_on_oom_cuda(tmp_path):
    from dist_llama.train.metrics import MetricsLogger
    from dist_llama.train.profiling import StepProfiler

    train(1, f"train.run_dir={tmp_path}", "checkpoint.enabled=false", "train.steps=3", "train.device=cuda",
          "train.memory_snapshot_step=2", "train.profile_steps=[2]")
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    (snap,) = [e for e in events if e["event"] == "memory_snapshot"]
    assert snap["step"] == 2 and snap["path"] == str(tmp_path / "memory" / "step-2-rank-0.pickle")
    with open(snap["path"], "rb") as f:
        data = pickle.load(f)
    assert data["segments"] and any(data["device_traces"])
    trace = json.loads((tmp_path / "profile" / "step-2" / "rank-0.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])  # CUDA kernels in the trace

    oom_dir = tmp_path / "oom"
    logger = MetricsLogger(oom_dir, 0, 1, to_object(load(DEBUG, [])).logging)
    profiler = StepProfiler(logger, oom_dir, 0, torch.device("cuda"), memory_snapshot_on_oom=True)
    profiler.on_train_start()
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
    except torch.OutOfMemoryError as exc:
        profiler.on_exception(7, exc)
    path = oom_dir / "memory" / "oom-step-7-rank-0.pickle"
    with open(path, "rb") as f:
        assert "segments" in pickle.load(f)
    assert any(json.loads(line)["event"] == "memory_snapshot_oom" for line in (oom_dir / "events.jsonl").open())
