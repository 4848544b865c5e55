"""Reading a DCP checkpoint's .metadata without running anything it says.

torch's FileSystemReader.read_metadata() is a plain `pickle.load`: whoever can write a checkpoint
directory (and rewrite manifest.json to match) can make every process that resumes from it, or
reads it as weights, run code. torch 2.13's DCP has no restricted path for metadata (its safe
`torch.load(weights_only=True)` covers only the tensor payloads), so `SafeReader` replaces that
one method with an unpickler that builds only the classes DCP's metadata is made of. Every reader
of DCP metadata in dist_llama (resume, the save-time check, init_from, export, generate) goes
through it.

The admitted globals are exactly those a `.metadata` written by torch 2.13's dcp.save refers to,
found by recording `find_class` while loading ones saved from plain, bf16 and FSDP state (see
ADMITTED). Anything else raises, naming the global it asked for.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PosixPath, WindowsPath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dist_llama.checkpoint_format.files import member_path, open_member

_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name): getattr(_md, name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
}
_ALLOWED.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _fs._StorageInfo,
    ("torch", "Size"): torch.Size,
    # torch.layout pickles as _get_layout("torch.strided"): a lookup among torch's own layouts.
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id is the path it was saved to; constructing a path touches nothing.
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "WindowsPath"): WindowsPath,
    ("pathlib", "Path"): Path,
})
ADMITTED = tuple(sorted(f"{m}.{n}" for m, n in _ALLOWED)) + ("torch.<dtype>",)
"""What the unpickler builds, for messages and docs; plus any torch dtype (pickled as torch.<name>)."""


class MetadataError(ValueError):
    """A .metadata that is not plain DCP metadata: the message names the file and what it asked for."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        cls = _ALLOWED.get((module, name))
        if cls is not None:
            return cls
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes pickle by name (torch.float32 ...)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not DCP checkpoint metadata)")


def load_metadata(data: bytes, where: str = ".metadata") -> Metadata:
    """DCP metadata from its pickled bytes; MetadataError naming `where` for anything else."""
    try:
        metadata = _Unpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 (any malformed pickle is the same verdict)
        raise MetadataError(f"{where}: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise MetadataError(f"{where}: holds {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose read_metadata() runs nothing the file says: the restricted unpickler
    above. Pass it as dcp.load(..., storage_reader=SafeReader(path)), never checkpoint_id=path
    (which makes DCP build a plain FileSystemReader)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # Same path (global .metadata, or a rank's own when DCP falls back to one) and the same
        # load_id bookkeeping as FileSystemReader.read_metadata, with the safe unpickler.
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        with open_member(path.parent, path.name) as f:  # a regular file, not a FIFO to block on
            metadata = load_metadata(f.read(), str(path))
        for info in (metadata.storage_data or {}).values():  # the shards DCP will open next
            rel = getattr(info, "relative_path", None)
            if not isinstance(rel, str) or "/" in rel:
                raise MetadataError(f"{path}: names shard file {rel!r}, not a file beside it")
            try:
                member_path(path.parent, rel)
            except (OSError, ValueError) as e:
                raise MetadataError(f"{path}: shard file {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(directory: Path) -> Metadata:
    """The metadata of the DCP checkpoint in `directory`, read safely (MetadataError if refused)."""
    return SafeReader(str(directory)).read_metadata()
