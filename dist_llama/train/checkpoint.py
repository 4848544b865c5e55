"""The checkpointer: asynchronous saves, atomic commit, retention, and resume from the newest valid
checkpoint, for any engine's state format.

Layout of <run_dir>/checkpoints/step-XXXXXXXX/:
  <engine state>          model + optimizer, written by the engine (its CheckpointState side): DCP
                          files (.metadata, __*.distcp; checkpoint_dcp.py) or an engine's own files
                          (train/engines/)
  trainer_state.json      step, tokens, LR schedule, data sampler position (global, so any dp degree
                          resumes exactly), health statistics, goodput, the layout it was saved under
  rng/rank-XXXXX.pt       each rank's RNG state (tensors only, loaded with weights_only=True)
  manifest.json           written last: step, state format, layout, the model's arguments (what
                          weight readers check the tensors against), every other file with its size
                          and sha256, total bytes, save time (checkpoint_integrity.py says what makes it valid)

How a save goes (`Checkpointer.save`):
  1. Wait for the previous save (at most one in flight), then a barrier on the checkpoint process
     group, so that every rank knows the previous commit is over.
  2. The engine writes this rank's files. DCP stages a copy into CPU memory with a persistent
     `DefaultStager` (pinned memory and a non-blocking device-to-host copy on CUDA, a memcpy into
     reused buffers on CPU) and writes in the background; an engine with its own format may write
     synchronously. The caller
     is blocked only until the state is copied, and may change the parameters once `save` returns.
     Each rank hashes its files while writing them, writes its RNG file, calls the fault-injection
     hook, checks its own files against those digests (with `verify`, by re-reading them; without,
     by size) and writes a digest list with its verdict.
     Writes run over a dedicated gloo process group, never the training communicator.
  3. Rank 0 (in the background thread with async_save, no collectives) then combines the ranks'
     verdicts (any failure fails the save), writes trainer_state.json, checks the files only it
     wrote (.metadata, trainer_state.json) the same way, writes manifest.json, fsyncs, renames the
     directory to step-XXXXXXXX, applies retention, emits `checkpoint_saved`. Rank 0 re-reads no
     other rank's files, so verification costs each rank the same at any world size.
     Any failure: a `checkpoint_failed` event, the temporary directory is removed, training goes on
     and the previous checkpoint stays the newest valid one.
A crash at any point leaves at most a .tmp-* directory, which the next run removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dist_llama.checkpoint_format.files import remove_unless_read
from dist_llama.checkpoint_format.integrity import (DIGESTS_DIR, MANIFEST, MANIFEST_FORMAT, STATE_FILE, STEP_DIR,
                                                   TMP_PREFIX, CheckpointError, Digests, check_checkpoint,
                                                   fsync_path, manifest_problem, read_listed, read_manifest, read_rank_digests,
                                                   step_dir_name, step_of, verify_written, write_durable,
                                                   write_rank_digests, write_rng_file)

log = logging.getLogger(__name__)


class CheckpointState(Protocol):
    """What an engine saves and loads (its model and optimizer state): DCPState, or its own format."""

    format: str
    """Recorded in the manifest; a checkpoint loads only into a state of the same format."""
    required: tuple[str, ...]
    """Files (besides trainer_state.json) a checkpoint of this format cannot be valid without."""

    def save(self, directory: Path, on_written: Callable[[Digests], None], group,
             stager: Optional[DefaultStager]) -> Future:
        """Write this rank's files into `directory` (collective over `group`), calling `on_written`
        with their digests once they are written; with a stager, return as soon as the state is
        copied. The future resolves (to digests of files only this rank knows of) when writing is
        done, or raises why it failed."""

    def load(self, directory: Path, manifest: dict) -> None:
        """Load from a checkpoint whose files were checked against the manifest. Raises
        CheckpointError if this state cannot take it (e.g. another world size)."""


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves (asynchronously by default) and loads checkpoints under <run_dir>/checkpoints.

    Every rank constructs it at the same point (it creates a process group) and calls save /
    latest / load collectively. `wait()` is local: on rank 0 it returns when the in-flight save is
    committed or failed; on the others when their part of the write is done (rank 0 commits alone;
    the next save and `latest()` synchronize with it). `close()` when training ends."""

    def __init__(self, run_dir: Path, keep_last: int, device: torch.device, async_save: bool = True,
                 verify: bool = True, logger: Any = None, faults: Any = None):
        self.root = Path(run_dir) / "checkpoints"
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
        self.last_error: Optional[str] = None
        self.failed_in_a_row = 0
        """Saves that failed since the last one committed (rank 0 knows; the others see write failures)."""
        """Why the latest save failed, or None (rank 0 knows every failure; others only the writer's)."""
        self.last_timings: dict[str, float] = {}
        """Breakdown of the latest save (seconds): wait, barrier, write_state (the caller's share of
        the state write: staging, or the whole write when synchronous), blocked; and, when it
        finishes, write (end of blocking to commit; rank 0) and total."""
        if self.rank == 0:
            self._remove_stale_tmp()

    def _event(self, kind: str, step: int, **fields) -> None:
        if self.logger is not None:
            try:
                self.logger.event(kind, step, **fields)
                return
            except Exception:  # an event must never break a save
                log.exception("could not log event %s", kind)
        log.info("%s step=%s %s", kind, step, fields)

    # --- save -----------------------------------------------------------------------------------
    def save(self, step: int, state: CheckpointState, trainer_state: dict) -> float:
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
        written = state.save(tmp, lambda digests: self._rank_written(step, tmp, rng, digests), self._pg,
                             self._stager)
        timings["write_state"] = time.perf_counter() - t
        self.last_timings = timings
        commit = (step, tmp, final, state_json, state.format, state.required, written, t0)
        if self.async_save:
            timings["blocked"] = blocked = time.perf_counter() - t0
            self._inflight = self._executor.submit(self._finish, *commit, time.perf_counter(), blocked)
            return blocked
        self._finish(*commit, time.perf_counter(), None)
        dist.barrier(group=self._pg)
        timings["blocked"] = blocked = time.perf_counter() - t0
        return blocked

    def _rank_written(self, step: int, tmp: Path, rng: dict, digests: Digests) -> None:
        """On every rank once its state files are written: its RNG file, the fault hook, then its
        own check of what it wrote (a re-read with `verify`, else sizes), recorded with its digests
        for rank 0 to combine. A failure here is a verdict, not an exception: rank 0 fails the save."""
        digests = {**digests, **write_rng_file(tmp, self.rank, rng)}
        try:
            if self.faults is not None:
                self.faults.on_checkpoint_written(step, tmp, files=sorted(digests))
            problem = verify_written(tmp, digests, deep=self.verify)
        except Exception as e:  # noqa: BLE001 (becomes checkpoint_failed through rank 0)
            problem = f"{type(e).__name__}: {e}"
        write_rank_digests(tmp, self.rank, digests, problem)

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

    def _finish(self, step: int, tmp: Path, final: Path, state_json: str, state_format: str,
                required: tuple[str, ...], written: Future, t0: float, t_blocked: float, blocked: Optional[float]) -> None:
        """After this rank's write: commit on rank 0. Never raises: failures become events."""
        try:
            extra = written.result()
            if self.rank == 0:
                nbytes = self._commit(step, tmp, final, state_json, state_format, required, extra or {})
                now = time.perf_counter()
                self.last_timings.update(write=now - t_blocked, total=now - t0)
                self.last_error = None
                self.failed_in_a_row = 0
                fields = {"path": str(final), "bytes": nbytes, "write_s": round(now - t_blocked, 4),
                          "total_s": round(now - t0, 4)}
                if blocked is not None:
                    fields["blocked_s"] = round(blocked, 4)
                self._event("checkpoint_saved", step, **fields)
                self._retention()
        except BaseException as e:  # noqa: BLE001 (a failed save must never end training)
            reason = failure_reason(e)
            self.last_error = reason
            self.failed_in_a_row += 1
            log.warning("checkpoint at step %d failed: %s", step, reason)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._event("checkpoint_failed", step, path=str(tmp), reason=reason)

    def committed_step(self) -> Optional[int]:
        """The step of the newest committed checkpoint (by its manifest), or None."""
        valid = [p for p in self._step_dirs() if manifest_problem(p) is None]
        return step_of(valid[-1]) if valid else None

    def _commit(self, step: int, tmp: Path, final: Path, state_json: str, state_format: str,
                required: tuple[str, ...], extra: Digests) -> int:
        """Rank 0, once every rank's files are written and checked by that rank: combine their
        verdicts, write and check the trainer state, manifest, rename. Rank 0 re-reads only the
        files it alone wrote (.metadata, trainer_state.json), whatever the world size."""
        expected = {**read_rank_digests(tmp, self.world_size), **extra}
        for rel in required:
            if rel not in expected:
                raise CheckpointError(f"{rel} was not written")
        own = {**extra, STATE_FILE: write_durable(tmp / STATE_FILE, state_json.encode())}
        expected.update(own)
        problem = verify_written(tmp, own, deep=self.verify)
        if problem is not None:
            raise CheckpointError(problem)
        shutil.rmtree(tmp / DIGESTS_DIR)
        total = sum(size for size, _ in expected.values())
        recorded = json.loads(state_json) if state_json else {}
        manifest = {"format": MANIFEST_FORMAT, "step": step, "state": state_format,
                    "required": [STATE_FILE, *required],
                    "layout": recorded.get("layout"),
                    # The architecture the tensors have: readers check them against it, not config.yaml.
                    "model": recorded.get("model"),
                    "world_size": self.world_size, "time": time.time(), "total_bytes": total,
                    "verified": self.verify,
                    "files": {rel: {"size": size, "sha256": digest} for rel, (size, digest) in sorted(expected.items())}}
        for rel in extra:  # written by the state's own writer, which need not have fsynced them
            fsync_path(tmp / rel)
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        for d in (*(p for p in tmp.rglob("*") if p.is_dir()), tmp):
            fsync_path(d)
        old = None
        if final.exists():  # saved at this step before (e.g. after a rollback): replace it
            old = self.root / f"{TMP_PREFIX}{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(self.root)
        if old is not None:
            remove_unless_read(old)  # else a .tmp-*, removed at the next start
        return total

    # --- directory upkeep -----------------------------------------------------------------------
    def _remove_stale_tmp(self) -> None:
        for p in remove_stale_tmp(self.root):
            self._event("checkpoint_tmp_removed", step_of(p) or 0, path=str(p),
                        reason="incomplete save from an earlier process")

    def has_checkpoints(self) -> bool:
        """Any step directory, valid or not."""
        return bool(self._step_dirs())

    def _step_dirs(self) -> list[Path]:
        """step-* directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                      key=lambda p: p.name)

    def _retention(self) -> None:
        """Keep the newest keep_last valid checkpoints (all if keep_last <= 0; never fewer than the
        newest one); delete invalid ones older than the newest valid. Newer invalid ones stay."""
        try:
            dirs = self._step_dirs()
            # Sizes too, not the manifest alone: a newer directory with a truncated file must not
            # count as the newest valid one and push good checkpoints out (rank 0, after a save).
            reasons = {p: check_checkpoint(p) for p in dirs}
            valid = [p for p in dirs if reasons[p] is None]
            if not valid:
                return
            newest = valid[-1]
            keep = set(valid if self.keep_last <= 0 else valid[-self.keep_last:]) | {newest}
            for p in dirs:
                if p in keep or p.name > newest.name:
                    continue
                if not remove_unless_read(p):  # an export or init_from is reading it: at a later save
                    self._event("checkpoint_removal_deferred", step_of(p) or 0, path=str(p),
                                reason="a reader (export, generate, init_from) holds it")
                    continue
                if reasons[p] is not None:
                    self._event("checkpoint_removed", step_of(p) or 0, path=str(p), reason=f"invalid: {reasons[p]}")
        except Exception as e:  # noqa: BLE001 (retention must not fail a committed save)
            self._event("checkpoint_retention_failed", 0, reason=f"{type(e).__name__}: {e}")

    # --- resume -----------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest valid checkpoint (every rank gets the same answer; collective). Rank 0 picks
        candidates by their manifests alone, newest first; the ranks then share the check of each
        candidate's files (sizes, sha256), a slice each, so a rank's cost does not grow with the
        world size. Each invalid newer one is skipped with a `checkpoint_skipped` event."""
        self.wait()
        candidates: list = [None]
        if self.rank == 0:
            found = []
            for p in reversed(self._step_dirs()):
                reason = manifest_problem(p)
                if reason is None:
                    found.append(str(p))
                else:
                    self._event("checkpoint_skipped", step_of(p) or 0, path=str(p), reason=reason)
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
                self._event("checkpoint_skipped", step_of(path) or 0, path=name, reason=bad[0])
        return None

    def load(self, path: Path, state: CheckpointState) -> tuple[dict, bool]:
        """Load into `state` (DCP reshards to the current layout). Returns (trainer state, whether
        this rank's RNG was restored). Raises CheckpointError for state this run cannot take."""
        manifest = check_format(path, state.format)
        state.load(Path(path), manifest)
        rng_file = f"rng/rank-{self.rank:05d}.pt"
        rng_restored = rng_file in manifest["files"]  # checked with the rest: a regular file, its hash
        if rng_restored:
            _set_rng_state(torch.load(Path(path) / rng_file, weights_only=True), self.device)
        return json.loads(read_listed(path, STATE_FILE, manifest)), rng_restored


def check_format(path: Path, state_format: str) -> dict:
    """The manifest of checkpoint `path`; CheckpointError unless it holds `state_format` state."""
    manifest = read_manifest(path)
    saved = manifest.get("state", "dcp")
    if saved != state_format:
        raise CheckpointError(f"{path} holds {saved} state, this run's engine needs {state_format}: "
                              f"resume with the parallel.engine it was saved with")
    return manifest


def remove_stale_tmp(root: Path) -> list[Path]:
    """Remove the .tmp-* directories an earlier process left in `root` (a checkpoints directory);
    returns them. Rank 0 calls it, holding the run lock, before writing anything else to the run
    directory: a save that filled the disk leaves its .tmp behind, and a restart that wrote first
    would fail on the full disk."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in sorted(root.iterdir()) if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def failure_reason(exc: BaseException) -> str:
    """One line for a failed save that names the cause: the operating system's error and its file
    when there is one (`No space left on device: /run/checkpoints/.tmp-...`), found through DCP's
    per-rank failures and exception chains; else the exception itself."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, tuple):  # DCP's per-rank failure: (exception, traceback summary)
            todo += [x for x in e if isinstance(x, BaseException)]
            continue
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}: {e.filename}" if e.filename else f"{type(e).__name__}: {e.strerror}"
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    reason = f"{type(exc).__name__}: {exc}"
    return reason if len(reason) <= 2000 else reason[:2000] + " ..."
