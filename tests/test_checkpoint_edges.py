"""Checkpoints at the edges (issue 25): a real full disk, manifests and indexes that name devices,
FIFOs or files outside the checkpoint, pickles in RNG / DeepSpeed files, a checkpoint that lies about
its model, a truncated DPO reference table, an export that fails half-way, and an export that reads a
checkpoint while the run's retention wants it gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dist_llama.testing import run_ranks
from trainrun import DEBUG, TINY

COMMON = [*TINY, "checkpoint.interval=2", "logging.wandb_mode=disabled"]
CHECKPOINT_BYTES = 3.7e6
"""What one checkpoint of the TINY model takes on disk (3.6 MB of DCP shards, 0.17 MB of metadata)."""


def _train(run_dir, overrides):
    from dist_llama.train.cli import main

    return main(["--config", DEBUG, *COMMON, f"train.run_dir={run_dir}", *overrides])


def _events(run_dir: Path, kind: str) -> list[dict]:
    from rundir import events

    return events(run_dir, kind)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of the TINY model and the logs, not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> None:
    """Write into `directory` until the filesystem has no room left."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "__0_0.distcp", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC


# --- 1: a full disk --------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_a_full_disk_under_the_launcher_fails_saves_naming_enospc_and_stops_74_saying_so(small_disk):
    """The probe's case on a real full filesystem: the first checkpoint commits, the next ones cannot
    be written. Each failure is a checkpoint_failed event naming ENOSPC and the .tmp path (not an
    AttributeError on DCP's (exception, traceback) pairs), the .tmp is removed, max_failed_saves in a
    row stop the run with 74 (for good: no restart would find more room), the launcher's last line
    says the disk is full, and the committed checkpoint is intact."""
    from dist_llama.checkpoint_format.integrity import check_checkpoint

    run_dir = small_disk / "run"
    env = {k: v for k, v in os.environ.items() if k != "DIST_LLAMA_EXIT_FILE"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "launch/train.sh", "-n", "1", "--max-restarts", "2", "--config", DEBUG, *COMMON,
                           "train.steps=10", "checkpoint.max_failed_saves=2", f"train.run_dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=130)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "disk holding" in lines[-1] and "is full" in lines[-1] and str(run_dir) in lines[-1], lines[-3:]
    failed = _events(run_dir, "checkpoint_failed")
    # 2 or 3: with async saves the limit is checked before a save, and the previous one may still be in flight
    assert len(failed) >= 2, failed
    (stop,) = _events(run_dir, "checkpoints_failing")
    assert stop["last_committed"] == 2 and stop["reason"].startswith("No space left on device: "), stop
    for event in failed:
        assert event["reason"].startswith("No space left on device: ") and ".tmp-step-" in event["reason"], event
        assert ".tmp-step-" in event["path"]
    assert len(_events(run_dir, "process_start")) == 1  # not restarted
    assert check_checkpoint(run_dir / "checkpoints" / "step-00000002", deep=True) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.timeout(120)
def test_a_restart_on_a_disk_filled_by_a_stale_tmp_removes_it_before_writing_anything(small_disk):
    """A save killed half-way on a full disk leaves its .tmp-step-*: the restart must remove it before
    it writes config.yaml (which failed with ENOSPC), then resume from the committed checkpoint."""
    from dist_llama.checkpoint_format.integrity import check_checkpoint

    run_dir = small_disk / "run"
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=2"], timeout=100) == [0]
    stale = run_dir / "checkpoints" / ".tmp-step-00000004"
    _fill(stale)
    assert shutil.disk_usage(small_disk).free < 64 * 1024
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=2"], timeout=100) == [0]
    assert not stale.exists()
    (removed,) = _events(run_dir, "checkpoint_tmp_removed")
    assert removed["path"] == str(stale)
    assert [e["step"] for e in _events(run_dir, "checkpoint_loaded")] == [2]
    assert check_checkpoint(run_dir / "checkpoints" / "step-00000002", deep=True) is None


# --- a trained run the tests below copy and damage ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 layers (TINY), checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("edges") / "run"
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=4", "checkpoint.async_save=false"], timeout=120) == [0]
    return run_dir


def _copy(trained, tmp_path, name="run") -> Path:
    run_dir = tmp_path / name
    shutil.copytree(trained, run_dir)
    return run_dir


def _rewrite_manifest(step_dir: Path, change) -> None:
    """Edit manifest.json as one who can write the directory would (sizes and hashes made to agree)."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    change(manifest)
    (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _relist(step_dir: Path, manifest: dict, rel: str) -> None:
    import hashlib

    data = (step_dir / rel).read_bytes() if (step_dir / rel).is_file() else b""
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --- 18: a refused start writes nothing ----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_start_refused_at_the_deep_check_leaves_config_yaml_alone(trained, tmp_path, capsys, monkeypatch):
    """Both checkpoints pass the cheap check (sizes) but not the deep one (a flipped byte): the start
    is refused with exit 2, and config.yaml still describes the run that wrote them (it was rewritten
    with the refused start's config before)."""
    from dist_llama.train.cli import main

    run_dir = _copy(trained, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        shard = run_dir / "checkpoints" / step / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[1000] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = (run_dir / "config.yaml").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["--config", DEBUG, *COMMON, "train.steps=6", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "none is valid" in err, err
    assert (run_dir / "config.yaml").read_bytes() == before


# --- 3: the checkpoint carries its model --------------------------------------------------------------
def _export_layers(out: Path) -> tuple[int, set[int]]:
    """(num_hidden_layers in config.json, the layer indices model.safetensors holds)."""
    from safetensors import safe_open

    config = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    return config["num_hidden_layers"], layers


@pytest.mark.timeout(180)
def test_a_run_with_another_model_and_checkpoints_off_cannot_rewrite_the_config_and_export_keeps_4_layers(
        trained, tmp_path, capsys, monkeypatch):
    """The probe's repro: a 4-layer run with checkpoints, then a start with model.n_layers=2 and
    checkpoint.enabled=false. That start now exits 2 naming the key, config.yaml untouched; and even
    with config.yaml rewritten to 2 layers (as the old code did), export writes the 4 layers the
    checkpoint records in its manifest."""
    import yaml

    from dist_llama.checkpoint_format.integrity import read_manifest
    from dist_llama.train.cli import main
    from dist_llama.weights.export import main as export_main

    run_dir = _copy(trained, tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["--config", DEBUG, *COMMON, "train.steps=2", "model.n_layers=2", "checkpoint.enabled=false",
                 f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.n_layers: checkpoint step-00000004 has 4, config has 2" in err, err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert read_manifest(run_dir / "checkpoints" / "step-00000004")["model"]["n_layers"] == 4

    config = yaml.safe_load(before)
    config["model"]["n_layers"] = 2  # what the old code left behind
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert _export_layers(tmp_path / "hf") == (4, {0, 1, 2, 3})


@pytest.mark.timeout(180)
def test_an_older_checkpoint_without_recorded_model_is_checked_against_its_tensors(trained, tmp_path, capsys,
                                                                                  monkeypatch):
    """A checkpoint from before the manifest (or trainer state) recorded the model falls back to
    config.yaml, but every tensor is checked against it: with config.yaml saying 2 layers, export,
    generate and init_from exit 2 naming a tensor of layer 2, instead of writing a 2-layer model."""
    import yaml

    from dist_llama.generate import main as generate_main
    from dist_llama.train.cli import main as train_main
    from dist_llama.weights.export import main as export_main

    run_dir = _copy(trained, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        step_dir = run_dir / "checkpoints" / step
        state = json.loads((step_dir / "trainer_state.json").read_text())
        del state["model"]
        (step_dir / "trainer_state.json").write_text(json.dumps(state))

        def older(manifest, step_dir=step_dir):
            manifest.pop("model", None)
            _relist(step_dir, manifest, "trainer_state.json")
        _rewrite_manifest(step_dir, older)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Unchanged, it still reads: the fallback works for checkpoints whose config.yaml is theirs.
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "ok")]) == 0
    assert _export_layers(tmp_path / "ok") == (4, {0, 1, 2, 3})
    config["model"]["n_layers"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    readers = {
        "export": lambda: export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "x")]),
        "generate": lambda: generate_main(["--checkpoint", str(run_dir), "--prompt", "hi", "--max-new-tokens", "1",
                                           "--device", "cpu"]),
        "init_from": lambda: train_main(["--config", DEBUG, *COMMON, f"train.run_dir={tmp_path / 'fresh'}",
                                         f"checkpoint.init_from={run_dir}"]),
    }
    monkeypatch.setenv("WORLD_SIZE", "1")
    for who, reader in readers.items():
        code = reader()
        err = capsys.readouterr().err
        assert code == 2 and "tensor layers.2." in err and "config.yaml" in err and "Traceback" not in err, (who, err)
    assert not (tmp_path / "x").exists()


# --- 4: manifests and indexes that name devices, FIFOs, files outside ---------------------------------
_READERS = r"""
import json, os, sys
run_dir, out, config, common, resume = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5] == "1"
from dist_llama.weights.export import main as export_main
from dist_llama.train.cli import main as train_main
os.environ["WORLD_SIZE"] = "1"
codes = {"export": export_main(["--checkpoint", run_dir, "--out", out + "/x"])}
print(json.dumps(codes), flush=True)
codes["init_from"] = train_main(["--config", config, *common, f"train.run_dir={out}/fresh", f"checkpoint.init_from={run_dir}"])
print(json.dumps(codes), flush=True)
if resume:
    codes["resume"] = train_main(["--config", config, *common, "train.steps=6", f"train.run_dir={run_dir}"])
print(json.dumps(codes), flush=True)
"""


def _run_readers(source: Path, out: Path, resume: bool) -> tuple[dict, str]:
    """Export, init_from and (for a run directory) resume of `source` in a fresh process, which a
    hang cannot outlive: (exit code of each, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    out.mkdir()
    try:
        proc = subprocess.run([sys.executable, "-c", _READERS, str(source), str(out), DEBUG, json.dumps(COMMON),
                               "1" if resume else "0"], cwd=out, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung: {exc.stdout!r}")
    lines = proc.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {"rc": proc.returncode}), proc.stderr


def _dev_zero_entry(step_dir: Path) -> None:
    _rewrite_manifest(step_dir, lambda m: m["files"].update(
        {"/dev/zero": {"size": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}}))


def _fifo_metadata(step_dir: Path) -> None:
    (step_dir / ".metadata").unlink()
    os.mkfifo(step_dir / ".metadata")
    _rewrite_manifest(step_dir, lambda m: _relist(step_dir, m, ".metadata"))


def _rng_links_to_dev_zero(step_dir: Path) -> None:
    (step_dir / "rng" / "rank-00000.pt").unlink()
    os.symlink("/dev/zero", step_dir / "rng" / "rank-00000.pt")
    _rewrite_manifest(step_dir, lambda m: _relist(step_dir, m, "rng/rank-00000.pt"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("craft", [_dev_zero_entry, _fifo_metadata, _rng_links_to_dev_zero],
                         ids=["dev-zero-entry", "fifo-metadata", "rng-symlink-to-dev-zero"])
def test_a_manifest_naming_a_device_or_fifo_is_refused_not_read(trained, tmp_path, craft):
    """Every checkpoint's manifest names /dev/zero, a FIFO (size 0, its hash agrees), or a symlink to
    /dev/zero: export, init_from and resume each exit 2 (resume after skipping both checkpoints) in
    bounded time, where they hung forever holding the run lock."""
    run_dir = _copy(trained, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        craft(run_dir / "checkpoints" / step)
    codes, err = _run_readers(run_dir, tmp_path / "out", resume=True)
    assert codes == {"export": 2, "init_from": 2, "resume": 2}, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (run_dir / "checkpoints" / "step-00000004").is_dir()


@pytest.mark.timeout(300)
def test_a_hugging_face_index_naming_a_fifo_is_refused_not_read(trained, tmp_path):
    from dist_llama.weights.export import main as export_main

    hf = tmp_path / "hf"
    assert export_main(["--checkpoint", str(trained), "--out", str(hf), "--max-shard-gb", "0.0003"]) == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (hf / shard).unlink()
    os.mkfifo(hf / shard)
    codes, err = _run_readers(hf, tmp_path / "out", resume=False)
    assert codes == {"export": 2, "init_from": 2}, err[-3000:]
    assert shard in err and "not a regular file" in err and "Traceback" not in err, err[-3000:]


# --- 11: pickles in RNG and DeepSpeed files -------------------------------------------------------------
class _Payload:
    """Unpickling this calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant_payload(step_dir: Path, rel: str, marker: Path) -> None:
    """Replace `rel` by a torch.save file holding the payload; the manifest made to agree with it."""
    import torch

    (step_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "x": _Payload(f"touch {marker}")}, step_dir / rel)
    _rewrite_manifest(step_dir, lambda m: _relist(step_dir, m, rel))


@pytest.mark.timeout(180)
def test_a_hash_matched_pickle_in_an_rng_file_skips_that_checkpoint(trained, tmp_path):
    """Resume skips step 4 (a checkpoint_skipped event naming the file and the global it asked for)
    and resumes step 2, as for a crafted .metadata; it crashed with an UnpicklingError traceback."""
    run_dir, marker = _copy(trained, tmp_path), tmp_path / "pwned"
    _plant_payload(run_dir / "checkpoints" / "step-00000004", "rng/rank-00000.pt", marker)
    assert run_ranks(_train, 1, str(run_dir), ["train.steps=6", "checkpoint.async_save=false"], timeout=120) == [0]
    (skipped,) = _events(run_dir, "checkpoint_skipped")
    assert skipped["step"] == 4 and "unsafe rng/rank-00000.pt" in skipped["reason"], skipped
    assert "posix.system" in skipped["reason"]
    assert [e["step"] for e in _events(run_dir, "checkpoint_loaded")] == [2]
    assert not marker.exists()


def test_a_hash_matched_pickle_in_a_deepspeed_file_fails_the_deep_check(trained, tmp_path):
    """The same check covers DeepSpeed's files (the three DeepSpeed classes they hold are admitted by
    name, as engines/zero.py safe_load admits them): without building anything, no DeepSpeed import."""
    from dist_llama.checkpoint_format.integrity import check_checkpoint

    step_dir, marker = tmp_path / "step-00000004", tmp_path / "pwned"
    shutil.copytree(trained / "checkpoints" / "step-00000004", step_dir)
    _plant_payload(step_dir, "deepspeed/mp_rank_00_model_states.pt", marker)
    reason = check_checkpoint(step_dir, deep=True)
    assert reason is not None and "unsafe deepspeed/mp_rank_00_model_states.pt" in reason and "posix.system" in reason
    assert not marker.exists()


# --- 10: a truncated DPO reference table ----------------------------------------------------------------
@pytest.mark.parametrize("cut", [1, 60, 200])
def test_a_truncated_dpo_reference_table_is_computed_again_not_a_traceback(tmp_path, cut):
    """The file's reader returns nothing for a table it cannot use (so the pass runs again), as the
    module promises; truncating the file raised safetensors' own SafetensorError through it."""
    import numpy as np

    from dist_llama.train.dpo_reference import FILE, _read, _write

    ident = {"dataset": "x", "n_pairs": 100}
    path = tmp_path / FILE
    table = np.arange(200, dtype=np.float32).reshape(100, 2)
    _write(path, table, ident)
    assert np.array_equal(_read(path, ident), table)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])
    assert _read(path, ident) is None


# --- 13: export is atomic -------------------------------------------------------------------------------
def test_an_export_whose_tokenizer_cannot_be_copied_leaves_nothing_at_out(trained, tmp_path, capsys):
    """The run's tokenizer file is not a tokenizer (as a tokenizer changed or damaged since training):
    the weights and config.json were written before the copy failed, leaving a complete-looking HF
    directory without tokenizer files (and a traceback). Now: exit 2 naming the file, nothing at
    --out, no temporary directory left beside it."""
    import yaml

    from dist_llama.weights.export import main as export_main

    run_dir = _copy(trained, tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not a tokenizer")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["tokenizer"] = str(bad)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "exports" / "hf"
    code = export_main(["--checkpoint", str(run_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []
    out.mkdir()  # an empty --out is allowed, and stays empty
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert list(out.iterdir()) == [] and [p.name for p in (tmp_path / "exports").iterdir()] == ["hf"]


# --- 14: export while the run's retention wants the checkpoint gone --------------------------------------
def test_a_checkpoint_being_read_is_not_deleted_by_retention_until_the_reader_is_done(trained, tmp_path):
    """An export of a run still training opened its newest checkpoint, then the run saved twice more
    and retention (keep_last=2) deleted it mid-read (4 of 4 attempts failed). A reader now holds the
    checkpoint: retention defers its deletion (an event says so) and deletes it at the first save
    after the reader closed; the reader reads every tensor meanwhile."""
    import torch
    import torch.distributed as dist

    from dist_llama.train.checkpoint import Checkpointer
    from dist_llama.weights import open_weights
    from dist_llama.weights.export import export_hf

    run_dir = _copy(trained, tmp_path)
    root = run_dir / "checkpoints"
    source = open_weights(run_dir)
    assert source.path == root / "step-00000004"
    events = []

    class Log:
        def event(self, kind, step, **fields):
            events.append({"event": kind, "step": step, **fields})

    # The run's retention after two more saves (6 and 8), keep_last=2: steps 2 and 4 are to go.
    for step in (6, 8):
        shutil.copytree(root / "step-00000004", root / f"step-{step:08d}")
        _rewrite_manifest(root / f"step-{step:08d}", lambda m, step=step: m.update(step=step))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ck = Checkpointer(run_dir, keep_last=2, device=torch.device("cpu"), async_save=False, logger=Log())
        ck._retention()
        assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006", "step-00000008"]
        (deferred,) = [e for e in events if e["event"] == "checkpoint_removal_deferred"]
        assert deferred["step"] == 4
        (tmp_path / "hf").mkdir()
        export_hf(source, tmp_path / "hf", torch.float32, 2**30)  # reads every tensor of step 4
        source.hold.close()
        ck._retention()
        assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000008"]
        ck.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fmt,config_file,key", [("hf", "config.json", "num_hidden_layers"),
                                                  ("meta", "params.json", "n_layers")])
def test_a_hf_or_meta_config_that_says_fewer_layers_than_its_tensors_is_refused(trained, tmp_path, capsys, fmt,
                                                                                config_file, key):
    """config.json / params.json saying 2 layers beside 4 layers of tensors: exported as 2 layers
    with exit 0 before; now exit 2 naming the first tensor the stated model does not have."""
    from dist_llama.weights.export import main as export_main

    src = tmp_path / "src"
    assert export_main(["--checkpoint", str(trained), "--out", str(src), "--format", fmt]) == 0
    config = json.loads((src / config_file).read_text())
    config[key] = 2
    (src / config_file).write_text(json.dumps(config))
    capsys.readouterr()
    assert export_main(["--checkpoint", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tensor layers.2." in err and config_file in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
