"""Checkpointer: async saves equal sync saves and capture the state at call time; commits are
atomic (a killed writer leaves only a .tmp-* directory); corrupt checkpoints are skipped; failed
saves leave the previous checkpoint valid; retention; stale temporary directories are removed.

Everything runs in fork-started gloo ranks (each initializes and destroys its own process group)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_llama.testing import free_port, run_ranks
from dist_llama.train.checkpoint_dcp import DCPState

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


class Events:
    def __init__(self):
        self.records: list[dict] = []

    def event(self, kind, step, **fields):
        self.records.append({"event": kind, "step": step, **fields})

    def of(self, kind):
        return [r for r in self.records if r["event"] == kind]


def _build(fsdp: bool, seed: int = 0, steps: int = 2):
    from dist_llama.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        torch.manual_seed(100 * seed + i)
        tokens = torch.randint(0, ARGS["vocab_size"], (2, 8))
        model(tokens).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(model, opt) -> dict:
    """This rank's model + optimizer state (local shards), copied."""
    from torch.distributed.tensor import DTensor

    from dist_llama.train.checkpoint_dcp import dcp_state_dict

    def copy(v):
        if isinstance(v, DTensor):
            v = v.to_local()
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    sd = dcp_state_dict([model], [opt])
    return {f"{group}/{k}": copy(v) for group in sd for k, v in sd[group].items()}


def _differences(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"]
    out = []
    for k in a:
        x, y = a[k], b[k]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            out.append(k)
    return out


def _init():
    dist.init_process_group("gloo")


def _done(result):
    dist.destroy_process_group()
    return result


# --- async vs sync, on 2 FSDP ranks ---------------------------------------------------------------

def _async_vs_sync(root: str):
    from dist_llama.train.checkpoint import Checkpointer

    _init()
    root = Path(root)
    model, opt = _build(fsdp=True)
    expected = _snapshot(model, opt)
    state = {"step": 2, "layout": {"dp_shard": 2}}

    sync_events, async_events = Events(), Events()
    sync_ck = Checkpointer(root / "sync", 2, torch.device("cpu"), async_save=False, logger=sync_events)
    sync_ck.save(2, DCPState([model], [opt]), state)

    async_ck = Checkpointer(root / "async", 2, torch.device("cpu"), async_save=True, logger=async_events)
    blocked = async_ck.save(2, DCPState([model], [opt]), state)
    # Change everything right away, while the background write is (likely) still going on.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1000.0)
        for s in opt.state.values():
            for v in s.values():
                v.add_(7.0)
    state["step"] = 999
    mutated = _snapshot(model, opt)
    waited = async_ck.wait()

    loaded = {}
    for name, ck in (("sync", sync_ck), ("async", async_ck)):
        path = ck.latest()
        other, other_opt = _build(fsdp=True, seed=1, steps=1)
        trainer_state, rng = ck.load(path, DCPState([other], [other_opt]))
        loaded[name] = (path.name, trainer_state, rng, _snapshot(other, other_opt))
    uses_own_group = async_ck._pg is not None and async_ck._pg != dist.group.WORLD
    for ck in (sync_ck, async_ck):
        ck.close()
    return _done({
        "blocked": blocked, "waited": waited, "uses_own_group": uses_own_group,
        "mutated_differs": set(_differences(expected, mutated)) == {k for k, v in expected.items()
                                                                    if isinstance(v, torch.Tensor)},
        "diff": {name: _differences(expected, v[3]) for name, v in loaded.items()},
        "sync_vs_async": _differences(loaded["sync"][3], loaded["async"][3]),
        "loaded": {name: v[:3] for name, v in loaded.items()},
        "events": {"sync": sync_events.records, "async": async_events.records},
    })


@pytest.fixture(scope="module")
def async_vs_sync(tmp_path_factory):
    return run_ranks(_async_vs_sync, 2, str(tmp_path_factory.mktemp("ck")), timeout=90)


@pytest.mark.timeout(120)
def test_async_save_loads_the_same_tensors_as_a_sync_save(async_vs_sync):
    for rank, r in enumerate(async_vs_sync):
        assert r["uses_own_group"]
        assert r["sync_vs_async"] == [], (rank, r["sync_vs_async"])
        assert r["diff"]["sync"] == [], (rank, r["diff"]["sync"])
        for name in ("sync", "async"):
            step_dir, trainer_state, rng_restored = r["loaded"][name]
            assert step_dir == "step-00000002" and rng_restored
            assert trainer_state == {"step": 2, "layout": {"dp_shard": 2}}
    saved = [e for e in async_vs_sync[0]["events"]["async"] if e["event"] == "checkpoint_saved"]
    assert len(saved) == 1 and saved[0]["bytes"] > 0 and saved[0]["write_s"] > 0


@pytest.mark.timeout(120)
def test_async_save_captures_the_state_at_the_time_of_the_call(async_vs_sync):
    for rank, r in enumerate(async_vs_sync):
        assert r["mutated_differs"]  # every tensor was changed right after save() returned ...
        assert r["diff"]["async"] == [], (rank, r["diff"]["async"])  # ... and none of it was saved


# --- single-rank helpers -------------------------------------------------------------------------

def _save_steps(root: Path, steps, async_save=True, keep_last=10, **kw):
    """Save model states after steps 1.., one checkpoint per entry of `steps`; returns snapshots."""
    from dist_llama.train.checkpoint import Checkpointer

    events = Events()
    ck = Checkpointer(root, keep_last, torch.device("cpu"), async_save=async_save, logger=events, **kw)
    snaps = {}
    for step in steps:
        model, opt = _build(fsdp=False, seed=0, steps=step)
        ck.save(step, DCPState([model], [opt]), {"step": step})
        snaps[step] = _snapshot(model, opt)
    ck.wait()
    return ck, events, snaps


def _load_latest(root: Path):
    from dist_llama.train.checkpoint import Checkpointer

    events = Events()
    ck = Checkpointer(root, 10, torch.device("cpu"), logger=events)
    path = ck.latest()
    snap = None
    if path is not None:
        model, opt = _build(fsdp=False, seed=5, steps=1)
        ck.load(path, DCPState([model], [opt]))
        snap = _snapshot(model, opt)
    ck.close()
    return path, events, snap


def _step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir())


# --- atomicity: SIGKILL during the write ---------------------------------------------------------

class _SleepInHook:
    """Fault hook: signal the parent that the shards are written, then hang (until killed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def on_checkpoint_written(self, step: int, tmp_dir: Path, files=None) -> None:
        self.marker.write_text(str(tmp_dir))
        time.sleep(120)


def _save_then_hang(root: str, port: int):
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _init()
    root = Path(root)
    ck, _, snaps = _save_steps(root, [1])
    torch.save(snaps[1], root / "expected.pt")
    ck.faults = _SleepInHook(root / "in_hook")
    model, opt = _build(fsdp=False, steps=2)
    ck.save(2, DCPState([model], [opt]), {"step": 2})
    ck.wait()  # never returns: the parent kills this process
    os._exit(1)


def _resume_after_crash(root: str):
    _init()
    return _done(_load_latest(Path(root)))


@pytest.mark.timeout(90)
def test_killed_save_leaves_only_a_tmp_dir_and_the_previous_checkpoint_loads(tmp_path):
    child = mp.get_context("fork").Process(target=_save_then_hang, args=(str(tmp_path), free_port()), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "in_hook").exists():
            assert child.is_alive() and time.monotonic() < deadline, "the child never reached the hook"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    assert _step_dirs(tmp_path) == [".tmp-step-00000002", "step-00000001"]
    assert any(p.suffix == ".distcp" for p in (tmp_path / "checkpoints" / ".tmp-step-00000002").iterdir())

    path, events, snap = run_ranks(_resume_after_crash, 1, str(tmp_path), timeout=60)[0]
    assert path.name == "step-00000001"
    assert _differences(torch.load(tmp_path / "expected.pt", weights_only=True), snap) == []
    removed = events.of("checkpoint_tmp_removed")
    assert len(removed) == 1 and removed[0]["step"] == 2
    assert _step_dirs(tmp_path) == ["step-00000001"]  # stale tmp dir cleaned at startup


# --- corrupt checkpoints are skipped ---------------------------------------------------------------

def _corrupt_and_resume(root: str, how: str):
    _init()
    root = Path(root)
    ck, _, snaps = _save_steps(root, [1, 2])
    ck.close()
    step2 = root / "checkpoints" / "step-00000002"
    shard = step2 / "__0_0.distcp"
    if how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    elif how == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "no_manifest":
        (step2 / "manifest.json").unlink()
    elif how == "missing_rng":
        (step2 / "rng" / "rank-00000.pt").unlink()
    path, events, snap = _load_latest(root)
    return _done((path, events, _differences(snaps[1], snap)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,reason", [("truncate", "bytes"), ("flip_byte", "sha256"),
                                        ("no_manifest", "manifest"), ("missing_rng", "missing")])
def test_corrupt_checkpoint_is_skipped_and_the_previous_one_chosen(tmp_path, how, reason):
    path, events, diff = run_ranks(_corrupt_and_resume, 1, str(tmp_path), how, timeout=60)[0]
    assert path.name == "step-00000001" and diff == []
    skipped = events.of("checkpoint_skipped")
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and reason in skipped[0]["reason"], skipped


def _shared_resume_check(root: str):
    """4 FSDP ranks save steps 1 and 2; a file of step 2 is truncated; every rank counts the
    files it opens or stats while picking the checkpoint to resume."""
    from dist_llama.checkpoint_format import integrity as checkpoint_integrity
    from dist_llama.train.checkpoint import Checkpointer
    from dist_llama.checkpoint_format.integrity import read_manifest

    _init()
    root = Path(root)
    ck = Checkpointer(root, 10, torch.device("cpu"), async_save=False, logger=Events())
    for step in (1, 2):
        model, opt = _build(fsdp=True, steps=step)
        ck.save(step, DCPState([model], [opt]), {"step": step})
    ck.close()
    dist.barrier()
    step2 = root / "checkpoints" / "step-00000002"
    listed = sorted(read_manifest(step2)["files"])
    victim = listed[3]  # in rank 3's share (every world_size-th file from its rank)
    if dist.get_rank() == 0:
        with open(step2 / victim, "r+b") as f:
            f.truncate(1)
    dist.barrier()

    touched = []  # (what, file) in order: every stat and every hash of a checkpoint file
    real_sha, real_stat = checkpoint_integrity.sha256_member, Path.stat

    def sha(directory, rel, size):
        touched.append(("sha", str((Path(directory) / rel).relative_to(root))))
        return real_sha(directory, rel, size)

    def stat(path, **kw):
        if path.is_relative_to(root / "checkpoints") and len(path.relative_to(root).parts) > 2:
            touched.append(("stat", str(path.relative_to(root))))
        return real_stat(path, **kw)

    checkpoint_integrity.sha256_member, Path.stat = sha, stat
    events = Events()
    ck = Checkpointer(root, 10, torch.device("cpu"), logger=events)
    chosen = ck.latest()
    Path.stat = real_stat
    ck.close()
    listed = {s: [f"checkpoints/step-0000000{s}/{rel}" for rel in sorted(read_manifest(
        root / "checkpoints" / f"step-0000000{s}")["files"])] for s in (1, 2)}
    return _done({"chosen": chosen.name, "touched": touched, "listed": listed, "victim": victim,
                  "skipped": events.of("checkpoint_skipped")})


@pytest.mark.timeout(120)
def test_ranks_share_the_check_of_the_checkpoint_they_resume(tmp_path):
    """Picking the checkpoint to resume costs each rank its share of the files, at any world size:
    rank 0 no longer reads every file; a file only rank 3 checks still makes all four skip step 2."""
    out = run_ranks(_shared_resume_check, 4, str(tmp_path), timeout=110)
    assert {o["chosen"] for o in out} == {"step-00000001"}
    skipped = out[0]["skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and out[0]["victim"] in skipped[0]["reason"], skipped
    listed = out[0]["listed"]
    assert len(listed[2]) >= 10  # 4 ranks' DCP files and RNG states, .metadata, trainer state
    for rank, o in enumerate(out):
        # Step 2: its share, except rank 3, whose first file is the truncated one (size check
        # first, nothing hashed); then step 1: exactly its share.
        share2 = listed[2][rank::4] if rank != 3 else []
        expected = [(what, f) for f in [*share2, *listed[1][rank::4]] for what in ("stat", "sha")]
        if rank == 3:
            expected.insert(0, ("stat", listed[2][3]))
        assert o["touched"] == expected, (rank, o["touched"])


# --- failed saves ------------------------------------------------------------------------------------

class _RaiseInHook:
    def on_checkpoint_written(self, step, tmp_dir, files=None):
        raise OSError("injected write failure")


class _FlipByteInHook:
    def on_checkpoint_written(self, step, tmp_dir, files=None):
        shard = Path(tmp_dir) / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[100] ^= 0x01
        shard.write_bytes(bytes(data))


def _failing_saves(root: str, async_save: bool):
    _init()
    root = Path(root)
    ck, events, _ = _save_steps(root, [1], async_save=async_save)
    out = {}
    # A hook that raises: the save fails, the tmp dir goes, training goes on, the next save works.
    ck.faults = _RaiseInHook()
    model, opt = _build(fsdp=False, steps=2)
    ck.save(2, DCPState([model], [opt]), {"step": 2})
    ck.wait()
    out["after_raise"] = (_step_dirs(root), ck.last_error)
    ck.faults = None
    model, opt = _build(fsdp=False, steps=3)
    ck.save(3, DCPState([model], [opt]), {"step": 3})
    out["latest_after_next_save"] = ck.latest().name
    # A hook that corrupts a shard: verification catches it, nothing is committed.
    ck.faults = _FlipByteInHook()
    ck.save(4, DCPState([model], [opt]), {"step": 4})
    ck.wait()
    out["after_flip_verified"] = _step_dirs(root)
    # Without verification the corrupt checkpoint is committed, but latest()'s deep check skips it.
    ck.verify = False
    ck.save(5, DCPState([model], [opt]), {"step": 5})
    ck.wait()
    out["after_flip_unverified"] = _step_dirs(root)
    out["latest_unverified"] = ck.latest().name
    ck.close()
    out["events"] = events.records
    return _done(out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, async_save):
    out = run_ranks(_failing_saves, 1, str(tmp_path), async_save, timeout=60)[0]
    dirs, error = out["after_raise"]
    assert dirs == ["step-00000001"] and "injected write failure" in error
    assert out["latest_after_next_save"] == "step-00000003"
    assert out["after_flip_verified"] == ["step-00000001", "step-00000003"]
    assert out["after_flip_unverified"] == ["step-00000001", "step-00000003", "step-00000005"]
    assert out["latest_unverified"] == "step-00000003"
    events = out["events"]
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [2, 4]
    assert "injected write failure" in failed[0]["reason"] and "verification failed" in failed[1]["reason"]
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"] == [1, 3, 5]
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert [e["step"] for e in skipped] == [5] and "sha256" in skipped[0]["reason"]


# --- retention -----------------------------------------------------------------------------------------

def _retention(root: str):
    _init()
    root = Path(root)
    ck, events, _ = _save_steps(root, [1, 2, 3, 4], async_save=False, keep_last=2)
    out = {"after_4": _step_dirs(root)}
    cks = root / "checkpoints"
    # An invalid checkpoint older than the newest valid one, and an invalid newer one.
    shutil.copytree(cks / "step-00000004", cks / "step-00000002")
    (cks / "step-00000002" / "manifest.json").unlink()
    shutil.copytree(cks / "step-00000004", cks / "step-00000009")
    with open(cks / "step-00000009" / "__0_0.distcp", "r+b") as f:
        f.truncate(10)
    model, opt = _build(fsdp=False, steps=1)
    ck.save(5, DCPState([model], [opt]), {"step": 5})
    out["after_5"] = _step_dirs(root)
    # keep_last=1: the newest valid one stays, even though a newer (invalid) directory exists.
    ck.keep_last = 1
    ck.save(6, DCPState([model], [opt]), {"step": 6})
    out["after_6"] = _step_dirs(root)
    out["latest"] = ck.latest().name
    # keep_last <= 0 keeps every valid checkpoint.
    ck.keep_last = 0
    ck.save(7, DCPState([model], [opt]), {"step": 7})
    ck.save(8, DCPState([model], [opt]), {"step": 8})
    out["after_8"] = _step_dirs(root)
    out["removed"] = events.of("checkpoint_removed")
    ck.close()
    return _done(out)


@pytest.mark.timeout(60)
def test_retention_keeps_the_newest_valid_checkpoints(tmp_path):
    out = run_ranks(_retention, 1, str(tmp_path), timeout=60)[0]
    assert out["after_4"] == ["step-00000003", "step-00000004"]
    assert out["after_5"] == ["step-00000004", "step-00000005", "step-00000009"]
    assert [e["step"] for e in out["removed"]] == [2]
    assert out["after_6"] == ["step-00000006", "step-00000009"]
    assert out["latest"] == "step-00000006"
    assert out["after_8"] == ["step-00000006", "step-00000007", "step-00000008", "step-00000009"]


# --- the manifest -----------------------------------------------------------------------------------------

def _manifest(root: str):
    _init()
    root = Path(root)
    ck, _, _ = _save_steps(root, [3])
    ck.close()
    return _done(json.loads((root / "checkpoints" / "step-00000003" / "manifest.json").read_text()))


@pytest.mark.timeout(60)
def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    from dist_llama.checkpoint_format.integrity import sha256_file

    manifest = run_ranks(_manifest, 1, str(tmp_path), timeout=60)[0]
    ck = tmp_path / "checkpoints" / "step-00000003"
    on_disk = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", "trainer_state.json", "rng/rank-00000.pt", "__0_0.distcp"} <= set(on_disk)
    for rel, info in manifest["files"].items():
        assert (ck / rel).stat().st_size == info["size"] and sha256_file(ck / rel) == info["sha256"]
    assert manifest["step"] == 3 and manifest["total_bytes"] == sum(i["size"] for i in manifest["files"].values())
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
