"""Model and optimizer state in DCP format: keyed by parameter name, so DCP reshards it to any
layout (data, tensor, context, pipeline parallel) on load. The state format of the FSDP, HSDP, DDP
and single-process engines.

Files: .metadata (rank 0) and one __<rank>_0.distcp per rank, each hashed as written. .metadata is
read only through dcp_metadata.SafeReader (a restricted unpickler).
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.staging import DefaultStager
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dist_llama.checkpoint_format.integrity import CheckpointError, Digests, HashingStream, read_rank_digests
from dist_llama.checkpoint_format.dcp_metadata import SafeReader, read_metadata

METADATA = ".metadata"


def dcp_state_dict(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Model and optimizer state keyed by parameter names (FQNs), merged over this rank's pipeline
    stages: the same keys whatever the layout, which is what lets DCP reshard across layouts."""
    model_sd, optim_sd = {}, {}
    for part, optimizer in zip(parts, optimizers):
        m, o = get_state_dict(part, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd}


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, recording (size, sha256) of every file written, keyed by its path
    relative to the checkpoint directory (following DCP's rename of .metadata.tmp)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.digests: Digests = {}

    def _rel(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @contextmanager
    def create_stream(self, path, mode: str):
        try:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode and "a" not in mode:
                    yield stream
                    return
                hashing = HashingStream(stream)
                try:
                    yield hashing
                except BaseException as e:
                    if hashing.error is not None and hashing.error is not e:
                        raise hashing.error from e  # the cause (a full disk), not torch.save's symptom
                    raise
                hashing.close()
                self.digests[self._rel(path)] = (hashing.size, hashing.hexdigest())
        except OSError as e:
            if e.errno and e.filename is None:  # name the file: checkpoint_failed says where
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        digest = self.digests.pop(self._rel(path), None)
        if digest is not None:
            self.digests[self._rel(new_path)] = digest


class _Writer(FileSystemWriter):
    """FileSystemWriter (one fsynced file per rank) that, after this rank's shards are written, hands
    their digests to `on_written`. Inside DCP's write step, so a failure on any rank reaches every
    rank through DCP's result gathering."""

    def __init__(self, path: Path, on_written: Callable[[Digests], None]):
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self.fs = _HashingFileSystem(Path(path))
        self._on_written = on_written

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        fut.wait()
        self._on_written(dict(self.fs.digests))
        return fut


class DCPState:
    """The checkpoint state of model parts and their optimizers, in DCP format (the Checkpointer's
    state interface: format, required, save, load)."""

    format = "dcp"
    required = (METADATA,)
    """Files a checkpoint of this format cannot be valid without."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts = parts
        self.optimizers = optimizers

    def save(self, directory: Path, on_written: Callable[[Digests], None], group,
             stager: Optional[DefaultStager]) -> Future:
        """Write this rank's shards into `directory` over `group`: staged and written in the
        background when a stager is given (returns once the state is copied), else inline.

        The future resolves to the digests of files only rank 0 knows of (.metadata, written after
        every rank's shards); before that rank 0 checks that every file .metadata names was reported."""
        writer = _Writer(directory, on_written)
        state = dcp_state_dict(self.parts, self.optimizers)
        if stager is not None:
            written = dcp.async_save(state, storage_writer=writer, process_group=group, async_stager=stager)
        else:
            written = Future()
            try:
                dcp.save(state, storage_writer=writer, process_group=group)
                written.set_result(None)
            except Exception as e:  # noqa: BLE001 (becomes checkpoint_failed)
                written.set_exception(e)
        del state  # the live tensors; DCP holds the staged copy
        done: Future = Future()

        def finish(f: Future) -> None:
            try:
                f.result()
                done.set_result(_metadata_digest(directory, writer, group))
            except BaseException as e:  # noqa: BLE001
                done.set_exception(e)

        written.add_done_callback(finish)
        return done

    def load(self, directory: Path, manifest: dict) -> None:
        state = dcp_state_dict(self.parts, self.optimizers)
        # Never checkpoint_id=: DCP would read .metadata with a plain pickle.load.
        dcp.load(state, storage_reader=SafeReader(str(directory)))
        for part, optimizer in zip(self.parts, self.optimizers):
            # Each part takes its own keys from the merged dicts (hence strict=False).
            set_state_dict(part, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))


def _metadata_digest(directory: Path, writer: _Writer, group) -> Digests:
    """On the rank that wrote .metadata: its digest, after checking that every shard file it names
    was reported by some rank. Elsewhere: nothing."""
    if METADATA not in writer.fs.digests:
        return {}
    reported = read_rank_digests(directory, dist.get_world_size(group))
    for info in read_metadata(directory).storage_data.values():
        if info.relative_path not in reported:
            raise CheckpointError(f"{info.relative_path} is in .metadata but no rank reported writing it")
    return {METADATA: writer.fs.digests[METADATA]}
