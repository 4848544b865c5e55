"""What makes a checkpoint directory trustworthy: files hashed as written, durable writes, each
rank's check of its own files, the digest lists with verdicts that rank 0 merges, the manifest,
and the check a directory must pass to be loaded.

A directory is a valid checkpoint iff its manifest.json exists and every file it lists exists with
the listed size (and, in the deep check, the listed sha256, and a DCP .metadata that the restricted
unpickler of dcp_metadata.py accepts). Files are opened through checkpoint_files.py: regular files
inside the directory only, reads bounded by the listed size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from dist_llama.checkpoint_format.files import (UnsafeFile, member_path, open_member, plain_relative,
                                               read_member, sha256_member)
from dist_llama.checkpoint_format.dcp_metadata import MetadataError, read_metadata

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DIGESTS_DIR = "digests"
DCP_METADATA = ".metadata"
MANIFEST_FORMAT = 1

Digests = dict[str, tuple[int, str]]
"""{path relative to the checkpoint directory: (size, sha256)}."""


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> Optional[int]:
    m = re.search(r"step-(\d{8})", Path(path).name)
    return int(m.group(1)) if m else None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> tuple[int, str]:
    """Write, flush to disk; returns (size, sha256) of what was written."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno and e.filename is None:  # a failed write names no file: say which
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return len(data), hashlib.sha256(data).hexdigest()


class HashingStream(io.IOBase):
    """Passes writes through to a file and keeps the sha256 and size of the bytes written."""

    def __init__(self, raw):
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0
        self.error: Optional[OSError] = None
        """The first write error: torch.save's zip writer replaces it with its own ("unexpected pos")."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b)
        try:
            n = self._raw.write(view)
            if n is not None and n != view.nbytes:
                raise OSError(f"short write ({n} of {view.nbytes} bytes)")
        except OSError as e:
            self.error = self.error or e
            raise
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


def write_rng_file(directory: Path, rank: int, rng: dict[str, torch.Tensor]) -> Digests:
    """This rank's RNG file; returns its digest entry."""
    buf = io.BytesIO()
    torch.save(rng, buf)
    (directory / "rng").mkdir(exist_ok=True)
    rel = f"rng/rank-{rank:05d}.pt"
    return {rel: write_durable(directory / rel, buf.getvalue())}


def verify_written(directory: Path, digests: Digests, deep: bool) -> Optional[str]:
    """Why the files this rank wrote are not what it wrote, or None: sizes, and with `deep` a
    re-read of every byte against the sha256 taken while writing. Each rank checks only its own
    files, so the check costs a rank the same at any world size."""
    for rel, (size, digest) in sorted(digests.items()):
        try:
            actual = (directory / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel}: {actual} bytes on disk, {size} written"
        if deep and sha256_file(directory / rel) != digest:
            return f"verification failed: {rel} differs from what was written"
    return None


def write_rank_digests(directory: Path, rank: int, digests: Digests, problem: Optional[str]) -> None:
    """This rank's verdict on its own files: every file it wrote with (size, sha256), and why they
    are not good (None if they are). Rank 0 combines every rank's into the manifest."""
    (directory / DIGESTS_DIR).mkdir(exist_ok=True)
    write_durable(directory / DIGESTS_DIR / f"rank-{rank:05d}.json",
                  json.dumps({"files": {k: list(v) for k, v in digests.items()}, "problem": problem}).encode())


def read_rank_digests(directory: Path, world_size: int) -> Digests:
    """Every rank's digest list, merged (rank 0, at commit); CheckpointError naming the first rank
    whose own check of its files failed."""
    expected: Digests = {}
    for r in range(world_size):
        sidecar = directory / DIGESTS_DIR / f"rank-{r:05d}.json"
        try:
            verdict = json.loads(sidecar.read_text())
            files, problem = verdict["files"], verdict["problem"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"rank {r}'s digest list is unreadable ({e})") from None
        if problem is not None:
            raise CheckpointError(f"rank {r}: {problem}")
        expected.update({k: tuple(v) for k, v in files.items()})
    return expected


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path` (a regular file of bounded size: checkpoint_files)."""
    manifest = json.loads(read_member(Path(path), MANIFEST))
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} holds {type(manifest).__name__}, not an object")
    return manifest


def read_listed(path: Path, rel: str, manifest: dict) -> bytes:
    """A file the manifest lists, read no further than its listed size (UnsafeFile, KeyError)."""
    return read_member(Path(path), rel, limit=int(manifest["files"][rel]["size"]))


def manifest_problem(path: Path) -> Optional[str]:
    """Why `path`'s manifest does not describe a complete checkpoint, or None. Reads one file, so
    it costs the same at any world size: what every rank may do at start, and rank 0 per save."""
    try:
        manifest = read_manifest(path)
        listed: dict = manifest["files"]
        step = int(manifest["step"])
        # Manifests written before "required" was recorded hold DCP or DeepSpeed state.
        required = manifest.get("required") or (
            [STATE_FILE, DCP_METADATA] if manifest.get("state", "dcp") == "dcp" else [STATE_FILE])
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({type(e).__name__}: {e})"
    if STEP_DIR.match(Path(path).name) and step != step_of(path):
        return f"manifest says step {step}, directory says {step_of(path)}"
    if not isinstance(listed, dict):
        return "manifest's files is not a map"
    for rel, info in listed.items():  # no file outside the directory, every size a count of bytes
        if not plain_relative(rel):
            return f"manifest lists {rel!r}, not a path inside the checkpoint"
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or info["size"] < 0:
            return f"manifest entry of {rel} has no byte size"
    for rel in required:
        if rel not in listed:
            return f"manifest does not list {rel}"
    return None


def check_checkpoint(path: Path, deep: bool = False, files: Optional[list[str]] = None) -> Optional[str]:
    """Why `path` is not a valid checkpoint, or None if it is: the manifest (`manifest_problem`),
    then every listed file exists with the listed size, and with `deep` every sha256 matches and
    DCP's .metadata is plain metadata (dcp_metadata's restricted unpickler). `files` restricts the
    per-file checks to those paths: at resume each rank checks its share (`latest`)."""
    path = Path(path)
    problem = manifest_problem(path)
    if problem is not None:
        return problem
    manifest = read_manifest(path)
    listed: dict = manifest["files"]
    for rel in (files if files is not None else listed):
        info = listed[rel]
        try:
            size = member_path(path, rel).stat().st_size
        except UnsafeFile as e:
            return f"unsafe file: {e}"
        except OSError:
            return f"missing file {rel}"
        if size != info["size"]:
            return f"{rel}: {size} bytes, manifest says {info['size']}"
        if not deep:
            continue
        try:
            digest = sha256_member(path, rel, size)
        except (OSError, UnsafeFile) as e:
            return f"{rel}: unreadable ({e})"
        if digest != info["sha256"]:
            return f"{rel}: sha256 differs from the manifest"
        if rel.endswith(".pt"):  # RNG states, DeepSpeed's files: pickles too
            problem = pickle_problem(path, rel)
            if problem is not None:
                return f"unsafe {rel} ({problem})"
        if rel == DCP_METADATA and manifest.get("state", "dcp") == "dcp":
            # A matching hash only says nobody changed it since the manifest was written; one
            # who can write both could make it run code when DCP unpickles it, so parse it
            # with the restricted unpickler here and refuse the checkpoint if it is not plain.
            try:
                read_metadata(path)
            except (MetadataError, UnsafeFile) as e:
                return f"unsafe {rel} ({e})"
    return None


DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"})
"""The classes DeepSpeed's checkpoint files hold besides tensors and containers (engines/zero.py
safe_load admits the same three)."""


def pickle_problem(path: Path, rel: str) -> Optional[str]:
    """Why the torch.save file `rel` of checkpoint `path` would not load with weights_only=True (it
    names what it asked for), or None. A hash that matches only says nobody changed the file since the
    manifest was written: one who can write both would otherwise crash the resume with a traceback
    (weights_only refuses at load), where a crafted .metadata makes it skip the checkpoint. Every
    global the pickle names is checked without unpickling; the small RNG files are loaded too."""
    try:
        with open_member(path, rel) as f:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - DEEPSPEED_GLOBALS
            if unsafe:
                return f"refused global {sorted(unsafe)[0]}"
            if rel.startswith("rng/"):
                f.seek(0)
                torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (any file that does not load is the same verdict)
        return f"{type(e).__name__}: {e}"[:500]
    return None
