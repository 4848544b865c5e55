"""Checkpoints with DCP: sharded model + optimizer, plus the small trainer state and per-rank RNG;
asynchronous saves, atomic commit, a manifest with checksums, validation and retention.

Layout of <run_dir>/checkpoints/step-XXXXXXXX/:
  .metadata, __*.distcp   DCP files: model and optimizer keyed by parameter name, resharded to any
                          layout (data, tensor, context, pipeline parallel) on load
  trainer_state.json      step, tokens, LR schedule, data sampler position (global, so any dp degree
                          resumes exactly), wandb id, the layout it was saved under
  rng/rank-XXXXX.pt       each rank's RNG state (tensors only, loaded with weights_only=True)
  manifest.json           written last: step, layout, every other file with its size and sha256,
                          total bytes, save time. A directory is a valid checkpoint iff its manifest
                          exists and every listed file has the listed size (and, deep, the sha256).

How a save goes (`Checkpointer.save`):
  1. Wait for the previous save (at most one in flight), then a barrier on the checkpoint process
     group, so that every rank knows the previous commit is over.
  2. Stage: `dcp.async_save` copies this rank's state into CPU memory with a persistent
     `DefaultStager` (its buffers are allocated on the first save and reused; pinned memory and a
     non-blocking device-to-host copy on CUDA, a plain memcpy on CPU). The caller is blocked only
     until here, and may change the parameters as soon as `save` returns.
  3. In the background, DCP writes the shards into <root>/.tmp-step-XXXXXXXX/, over a dedicated
     gloo process group (never the communicator the training collectives use). Each rank hashes
     its files while writing them (sha256 of the bytes as written), writes its RNG file and a
     digest list; DCP's final collective gathers every rank's result before rank 0 writes .metadata.
  4. Rank 0 (in its background thread, no collectives) then calls the fault-injection hook, writes
     trainer_state.json, checks every file against the digests taken at write time (with `verify`,
     by re-reading it and recomputing the sha256; without, by size), writes manifest.json, fsyncs,
     renames the directory to step-XXXXXXXX, applies retention and emits `checkpoint_saved`.
     Any failure: a `checkpoint_failed` event, the temporary directory is removed, training goes on
     and the previous checkpoint stays the newest valid one.
Synchronous mode does the same inline. A crash at any point leaves at most a .tmp-* directory,
which the next run removes.

With parallel.engine=deepspeed, DeepSpeed's save_checkpoint writes the model and optimizer state
instead of DCP (deepspeed/*.pt, plus its zero_to_fp32.py scripts), synchronously, each rank hashing
its files as written (dist_llama.parallel.zero); everything else above is the same. The manifest's
`state` says which ("dcp" or "deepspeed"); DeepSpeed's ZeRO shards load on the same number of ranks only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
METADATA = ".metadata"
DIGESTS_DIR = "digests"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    m = re.search(r"step-(\d{8})", path.name)
    return int(m.group(1)) if m else None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _state_dict(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Model and optimizer state keyed by parameter names (FQNs), merged over this rank's pipeline
    stages: the same keys whatever the layout, which is what lets DCP reshard across layouts."""
    model_sd, optim_sd = {}, {}
    for part, optimizer in zip(parts, optimizers):
        m, o = get_state_dict(part, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd}


# --- files, checksums, validation ---------------------------------------------------------------

def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> tuple[int, str]:
    """Write, flush to disk; returns (size, sha256) of what was written."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def check_checkpoint(path: Path, deep: bool = False, files: Optional[list[str]] = None) -> Optional[str]:
    """Why `path` is not a valid checkpoint, or None if it is. Cheap: manifest.json exists and
    every file it lists exists with the listed size. Deep: also every sha256 matches (restricted to
    `files` when given: ranks share that work)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
        listed: dict = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({type(e).__name__}: {e})"
    if STEP_DIR.match(path.name) and step != _step_of(path):
        return f"manifest says step {step}, directory says {_step_of(path)}"
    for required in (STATE_FILE, METADATA) if manifest.get("state", "dcp") == "dcp" else (STATE_FILE,):
        if required not in listed:
            return f"manifest does not list {required}"
    for rel, info in listed.items():
        try:
            size = (path / rel).stat().st_size
        except OSError:
            return f"missing file {rel}"
        if size != info["size"]:
            return f"{rel}: {size} bytes, manifest says {info['size']}"
    if deep:
        for rel in (files if files is not None else listed):
            if sha256_file(path / rel) != listed[rel]["sha256"]:
                return f"{rel}: sha256 differs from the manifest"
    return None


# --- a DCP writer that hashes what it writes ----------------------------------------------------

class HashingStream(io.IOBase):
    """Passes writes through to a file and keeps the sha256 and size of the bytes written."""

    def __init__(self, raw):
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b)
        n = self._raw.write(view)
        if n is not None and n != view.nbytes:
            raise OSError(f"short write ({n} of {view.nbytes} bytes)")
        self._sha.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()
            finally:
                self._raw.close()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, recording (size, sha256) of every file written, keyed by its path
    relative to the checkpoint directory (following DCP's rename of .metadata.tmp)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.digests: dict[str, tuple[int, str]] = {}

    def _rel(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode and "a" not in mode:
                yield stream
                return
            hashing = HashingStream(stream)
            yield hashing
            hashing.close()
            self.digests[self._rel(path)] = (hashing.size, hashing.hexdigest())

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        digest = self.digests.pop(self._rel(path), None)
        if digest is not None:
            self.digests[self._rel(new_path)] = digest


def _write_rank_files(directory: Path, rank: int, rng: dict[str, torch.Tensor],
                     digests: dict[str, tuple[int, str]]) -> None:
    """This rank's RNG file, then the list of every file it wrote with (size, sha256), which rank 0
    checks and merges into the manifest."""
    buf = io.BytesIO()
    torch.save(rng, buf)
    (directory / "rng").mkdir(exist_ok=True)
    rel = f"rng/rank-{rank:05d}.pt"
    digests = {**digests, rel: _write_durable(directory / rel, buf.getvalue())}
    (directory / DIGESTS_DIR).mkdir(exist_ok=True)
    _write_durable(directory / DIGESTS_DIR / f"rank-{rank:05d}.json",
                   json.dumps({k: list(v) for k, v in digests.items()}).encode())


class _Writer(FileSystemWriter):
    """FileSystemWriter (one fsynced file per rank) that, after this rank's shards are written,
    writes the rank's files (_write_rank_files). Inside DCP's write step, so a failure on any rank
    reaches every rank through DCP's result gathering."""

    def __init__(self, path: Path, rank: int, rng: dict[str, torch.Tensor]):
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self.fs = _HashingFileSystem(Path(path))
        self.dir = Path(path)
        self._rank = rank
        self._rng = rng

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        fut.wait()
        _write_rank_files(self.dir, self._rank, self._rng, self.fs.digests)
        return fut


class CheckpointError(RuntimeError):
    pass


# --- the checkpointer ---------------------------------------------------------------------------

class Checkpointer:
    """Saves (asynchronously by default) and loads checkpoints under <run_dir>/checkpoints.

    Every rank constructs it at the same point (it creates a process group) and calls save /
    latest / load collectively. `wait()` is local: on rank 0 it returns when the in-flight save is
    committed or failed; on the others when their part of the write is done (rank 0 commits alone;
    the next save and `latest()` synchronize with it)."""

    def __init__(self, run_dir: Path, keep_last: int, device: torch.device, async_save: bool = True,
                 verify: bool = True, logger: Any = None, faults: Any = None, zero: Any = None):
        self.root = Path(run_dir) / "checkpoints"
        self.zero = zero
        """A ZeroEngine (parallel.engine=deepspeed): DeepSpeed saves and loads the model and optimizer
        state instead of DCP; the parts and optimizers passed to save / load are then not used."""
        self.state_format = "deepspeed" if zero is not None else "dcp"
        self.keep_last = keep_last
        self.device = torch.device(device)
        self.async_save = async_save
        self.verify = verify
        self.logger = logger
        self.faults = faults
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Checkpoint collectives (DCP planning and result gathering, the save barrier) run here,
        # from the background thread too: never on a communicator that training uses.
        self._pg = dist.new_group(backend="gloo")
        self._stager: Optional[DefaultStager] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        if async_save:
            cuda = self.device.type == "cuda"
            # Blocking staging into cached buffers: pinned memory + non-blocking D2H copies on the
            # default stream, then one device synchronize (CUDA); a memcpy into reused buffers (CPU).
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self._inflight: Optional[Future] = None
        self.last_committed: Optional[Path] = None
        """The newest checkpoint this process committed (rank 0 only)."""
        self.last_error: Optional[str] = None
        """Why the latest save failed, or None (rank 0 knows every failure; others only DCP's)."""
        self.last_timings: dict[str, float] = {}
        """Breakdown of the latest save (seconds): wait, barrier, state_dict, stage, blocked; and,
        when it finishes, write (end of staging to commit; rank 0) and total."""
        if self.rank == 0:
            self._remove_stale_tmp()

    # --- events ---------------------------------------------------------------------------------
    def _event(self, kind: str, step: int, **fields) -> None:
        if self.logger is not None:
            try:
                self.logger.event(kind, step, **fields)
                return
            except Exception:  # an event must never break a save
                log.exception("could not log event %s", kind)
        log.info("%s step=%s %s", kind, step, fields)

    # --- save -----------------------------------------------------------------------------------
    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict) -> float:
        """Save this step; returns the seconds the caller was blocked. Collective."""
        t0 = time.perf_counter()
        timings = {"wait": self.wait()}
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by an earlier attempt at this step
                shutil.rmtree(tmp)
        t = time.perf_counter()
        dist.barrier(group=self._pg)
        timings["barrier"] = time.perf_counter() - t
        state_json = json.dumps(trainer_state, indent=1)  # the state as of this call
        rng = _rng_state(self.device)
        t = time.perf_counter()
        if self.zero is not None:
            return self._save_zero(step, tmp, final, state_json, rng, t0, timings)
        state = _state_dict(parts, optimizers)
        timings["state_dict"] = time.perf_counter() - t
        writer = _Writer(tmp, self.rank, rng)
        t = time.perf_counter()
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self._pg,
                                    async_stager=self._stager)
            del state  # the live tensors; DCP holds the staged copy
            timings["stage"] = time.perf_counter() - t
            timings["blocked"] = blocked = time.perf_counter() - t0
            self.last_timings = timings
            self._inflight = self._executor.submit(self._finish, step, tmp, final, state_json, writer, future,
                                                   t0, time.perf_counter(), blocked)
            return blocked
        done: Future = Future()
        try:
            dcp.save(state, storage_writer=writer, process_group=self._pg)
            done.set_result(None)
        except Exception as e:
            done.set_exception(e)
        del state
        timings["write_dcp"] = time.perf_counter() - t
        self.last_timings = timings
        self._finish(step, tmp, final, state_json, writer, done, t0, t, None)
        dist.barrier(group=self._pg)
        timings["blocked"] = blocked = time.perf_counter() - t0
        return blocked

    def _save_zero(self, step: int, tmp: Path, final: Path, state_json: str, rng: dict, t0: float,
                   timings: dict) -> float:
        """DeepSpeed writes its own files, synchronously; the commit is the one DCP saves get (in the
        background with async_save)."""
        t = time.perf_counter()
        written: Future = Future()
        try:
            _write_rank_files(tmp, self.rank, rng, self.zero.save(tmp))
            written.set_result(None)
        except Exception as e:  # noqa: BLE001 (becomes checkpoint_failed, like a failed DCP write)
            written.set_exception(e)
        dist.barrier(group=self._pg)  # every rank's files and digest list are complete: rank 0 may commit
        timings["write_deepspeed"] = time.perf_counter() - t
        self.last_timings = timings
        if self.async_save:
            timings["blocked"] = blocked = time.perf_counter() - t0
            self._inflight = self._executor.submit(self._finish, step, tmp, final, state_json, None, written,
                                                   t0, time.perf_counter(), blocked)
            return blocked
        self._finish(step, tmp, final, state_json, None, written, t0, t, None)
        dist.barrier(group=self._pg)
        timings["blocked"] = blocked = time.perf_counter() - t0
        return blocked

    def wait(self) -> float:
        """Block until the in-flight save is committed or failed; returns the seconds waited."""
        future, self._inflight = self._inflight, None
        if future is None:
            return 0.0
        t = time.perf_counter()
        future.result()  # _finish never raises
        return time.perf_counter() - t

    def close(self) -> None:
        """Wait for the in-flight save and release the staging buffers and the thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _finish(self, step: int, tmp: Path, final: Path, state_json: str, writer: Optional[_Writer], future: Future,
                t0: float, t_staged: float, blocked: Optional[float]) -> None:
        """After DCP's write: commit on rank 0. Never raises: failures become events."""
        try:
            future.result()
            if self.rank == 0:
                nbytes = self._commit(step, tmp, final, state_json, writer)
                now = time.perf_counter()
                self.last_timings.update(write=now - t_staged, total=now - t0)
                self.last_committed, self.last_error = final, None
                fields = {"path": str(final), "bytes": nbytes, "write_s": round(now - t_staged, 4),
                          "total_s": round(now - t0, 4)}
                if blocked is not None:
                    fields["blocked_s"] = round(blocked, 4)
                self._event("checkpoint_saved", step, **fields)
                self._retention()
        except BaseException as e:  # noqa: BLE001 (a failed save must never end training)
            reason = f"{type(e).__name__}: {e}"
            if len(reason) > 2000:
                reason = reason[:2000] + " ..."
            self.last_error = reason
            log.warning("checkpoint at step %d failed: %s", step, reason)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._event("checkpoint_failed", step, path=str(tmp), reason=reason)

    def _commit(self, step: int, tmp: Path, final: Path, state_json: str, writer: Optional[_Writer]) -> int:
        """Rank 0, once every rank's files are written: hook, trainer state, check, manifest, rename.
        `writer` is DCP's (None for DeepSpeed), whose .metadata rank 0 wrote after the digest lists."""
        if self.faults is not None:
            self.faults.on_checkpoint_written(step, tmp)
        expected: dict[str, tuple[int, str]] = {}
        for r in range(self.world_size):
            sidecar = tmp / DIGESTS_DIR / f"rank-{r:05d}.json"
            try:
                expected.update({k: tuple(v) for k, v in json.loads(sidecar.read_text()).items()})
            except (OSError, ValueError) as e:
                raise CheckpointError(f"rank {r}'s digest list is unreadable ({e})") from None
        if writer is not None:
            if METADATA not in writer.fs.digests:
                raise CheckpointError("DCP wrote no .metadata")
            expected[METADATA] = writer.fs.digests[METADATA]
            metadata = FileSystemReader(str(tmp)).read_metadata()
            for info in metadata.storage_data.values():
                if info.relative_path not in expected:
                    raise CheckpointError(f"{info.relative_path} is in .metadata but no rank reported writing it")
        expected[STATE_FILE] = _write_durable(tmp / STATE_FILE, state_json.encode())
        for rel, (size, digest) in sorted(expected.items()):
            try:
                actual = (tmp / rel).stat().st_size
            except OSError:
                raise CheckpointError(f"{rel} is missing") from None
            if actual != size:
                raise CheckpointError(f"{rel}: {actual} bytes on disk, {size} written")
            if self.verify and sha256_file(tmp / rel) != digest:
                raise CheckpointError(f"verification failed: {rel} differs from what was written")
        shutil.rmtree(tmp / DIGESTS_DIR)
        total = sum(size for size, _ in expected.values())
        manifest = {"format": MANIFEST_FORMAT, "step": step, "state": self.state_format,
                    "layout": json.loads(state_json).get("layout") if state_json else None,
                    "world_size": self.world_size, "time": time.time(), "total_bytes": total,
                    "verified": self.verify,
                    "files": {rel: {"size": size, "sha256": digest} for rel, (size, digest) in sorted(expected.items())}}
        if writer is not None:
            _fsync_path(tmp / METADATA)  # DCP fsyncs it before flushing its buffer
        _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        for d in (*(p for p in tmp.rglob("*") if p.is_dir()), tmp):
            _fsync_path(d)
        old = None
        if final.exists():  # saved at this step before (e.g. after a rollback): replace it
            old = self.root / f"{TMP_PREFIX}{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return total

    # --- directory upkeep -----------------------------------------------------------------------
    def _remove_stale_tmp(self) -> None:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                self._event("checkpoint_tmp_removed", _step_of(p) or 0, path=str(p),
                            reason="incomplete save from an earlier process")

    def _step_dirs(self) -> list[Path]:
        """step-* directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                      key=lambda p: p.name)

    def list_valid(self) -> list[Path]:
        """Checkpoints passing the cheap check, oldest first."""
        return [p for p in self._step_dirs() if check_checkpoint(p) is None]


    def _retention(self) -> None:
        """Keep the newest keep_last valid checkpoints (all if keep_last <= 0; never fewer than the
        newest one); delete invalid ones older than the newest valid. Newer invalid ones stay."""
        try:
            dirs = self._step_dirs()
            reasons = {p: check_checkpoint(p) for p in dirs}
            valid = [p for p in dirs if reasons[p] is None]
            if not valid:
                return
            newest = valid[-1]
            keep = set(valid if self.keep_last <= 0 else valid[-self.keep_last:]) | {newest}
            for p in dirs:
                if p in keep or p.name > newest.name:
                    continue
                shutil.rmtree(p, ignore_errors=True)
                if reasons[p] is not None:
                    self._event("checkpoint_removed", _step_of(p) or 0, path=str(p), reason=f"invalid: {reasons[p]}")
        except Exception as e:  # noqa: BLE001 (retention must not fail a committed save)
            self._event("checkpoint_retention_failed", 0, reason=f"{type(e).__name__}: {e}")

    # --- resume -----------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest valid checkpoint (every rank gets the same answer; collective). Rank 0 picks
        candidates by the cheap check, newest first; the ranks then share the deep check (sha256)
        of the candidate. Each invalid newer one is skipped with a `checkpoint_skipped` event."""
        self.wait()
        candidates: list = [None]
        if self.rank == 0:
            found = []
            for p in reversed(self._step_dirs()):
                reason = check_checkpoint(p)
                if reason is None:
                    found.append(str(p))
                else:
                    self._event("checkpoint_skipped", _step_of(p) or 0, path=str(p), reason=reason)
            candidates[0] = found
        # On the checkpoint group: every rank waited above, so no background save uses it now.
        dist.broadcast_object_list(candidates, src=0, group=self._pg)
        for name in candidates[0]:
            path = Path(name)
            try:
                files = sorted(read_manifest(path)["files"])
                reason = check_checkpoint(path, deep=True, files=files[self.rank::self.world_size])
            except Exception as e:  # noqa: BLE001 (each rank must still take part in the gather)
                reason = f"{type(e).__name__}: {e}"
            reasons: list = [None] * self.world_size
            dist.all_gather_object(reasons, reason, group=self._pg)
            bad = [r for r in reasons if r is not None]
            if not bad:
                return path
            if self.rank == 0:
                self._event("checkpoint_skipped", _step_of(path) or 0, path=name, reason=bad[0])
        return None

    def load(self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[dict, bool]:
        """Load into the current layout (DCP reshards; DeepSpeed needs the layout it saved under).
        Returns (trainer state, whether RNG was restored)."""
        manifest = read_manifest(path)
        saved = manifest.get("state", "dcp")
        if saved != self.state_format:
            raise CheckpointError(f"{path} holds {saved} state, this run's engine needs {self.state_format}: "
                                  f"resume with the parallel.engine it was saved with")
        if self.zero is not None:
            if manifest["world_size"] != self.world_size:
                raise CheckpointError(f"{path} was saved by DeepSpeed on {manifest['world_size']} ranks; its ZeRO "
                                      f"shards load on as many ranks only (this run has {self.world_size})")
            self.zero.load(Path(path))
        else:
            state = _state_dict(parts, optimizers)
            dcp.load(state, checkpoint_id=str(path))
            for part, optimizer in zip(parts, optimizers):
                # Each part takes its own keys from the merged dicts (hence strict=False).
                set_state_dict(part, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))
        rng_file = Path(path) / "rng" / f"rank-{self.rank:05d}.pt"
        rng_restored = rng_file.is_file()
        if rng_restored:
            _set_rng_state(torch.load(rng_file, weights_only=True), self.device)
        return json.loads((Path(path) / STATE_FILE).read_text()), rng_restored


def gather_full_state_dict(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on every rank, gathered over every parallel
    dimension (for export and for comparing layouts). Costs a full copy per rank: small models only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    local = {}
    for part in parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        local.update({k: v.detach().cpu() for k, v in sd.items()})
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for sd in gathered for k, v in sd.items()}
