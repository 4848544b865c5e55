"""Opening the files a checkpoint's manifest (or a weights index) names, so that a crafted entry can
neither lead out of the directory nor block the reader: `/dev/zero` or a FIFO named in a manifest
hung resume, export and init_from forever, holding the run lock.

A member is a relative path without `..` or empty parts; in a checkpoint no part of it may be a
symbolic link (dist_llama never writes one); it must be a regular file (no device, FIFO, socket or
directory); and a read never goes past the size the manifest gives. Files are opened with
O_NONBLOCK and checked with fstat before any byte is read, so a FIFO swapped in after the check
fails instead of blocking in open().

Weights indexes (a Hugging Face model.safetensors.index.json) are checked with `follow_symlinks`:
the Hugging Face cache links every snapshot file to a blob outside the snapshot directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAX_JSON_BYTES = 64 * 2**20
"""The largest manifest or other JSON file of a checkpoint read before its size is known."""


class UnsafeFile(ValueError):
    """A name that is not a regular file inside the directory: the message names it and why."""


def plain_relative(rel: str) -> bool:
    """Whether `rel` is a relative path with no empty, '.' or '..' part (checked without any I/O)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in rel.split("/"))


def member_path(directory: Path, rel: str, follow_symlinks: bool = False) -> Path:
    """`directory / rel`, once it is known to name a regular file inside `directory` (UnsafeFile
    naming `rel` otherwise; FileNotFoundError when it does not exist)."""
    if not plain_relative(rel):
        raise UnsafeFile(f"{rel!r}: not a plain relative path inside {directory}")
    path = Path(directory)
    for part in rel.split("/"):
        path = path / part
        if not follow_symlinks and stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafeFile(f"{rel}: a symbolic link (a checkpoint holds regular files only)")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UnsafeFile(f"{rel}: not a regular file (a device, FIFO or directory)")
    return path


def open_member(directory: Path, rel: str, follow_symlinks: bool = False) -> BinaryIO:
    """`rel` opened for reading, checked as `member_path` and again on the open descriptor."""
    path = member_path(directory, rel, follow_symlinks)
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeFile(f"{rel}: not a regular file (a device, FIFO or directory)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_member(directory: Path, rel: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of `rel`; UnsafeFile when it holds more than `limit`."""
    with open_member(directory, rel) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(f"{rel}: larger than {limit} bytes")
    return data


def sha256_member(directory: Path, rel: str, size: int) -> str:
    """sha256 of the first `size` bytes of `rel` (the caller has checked that it has `size` bytes):
    the read is bounded by the manifest's size whatever the file turns into meanwhile."""
    digest = hashlib.sha256()
    with open_member(directory, rel) as f:
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# --- readers and retention ------------------------------------------------------------------------
class ReadHold:
    """A shared flock on a checkpoint directory, held while a reader (export, generate, init_from)
    reads it: retention (`remove_unless_read`) leaves a directory alone while any reader holds it,
    and deletes it at a later save instead. Taking the hold waits for a deletion under way; a
    directory deleted or replaced meanwhile raises FileNotFoundError (the reader picks again).
    Released by `close()` or with the object; a reader that is killed releases it with its end.
    Where the filesystem cannot lock a directory there is no hold (`_NO_LOCKS`)."""

    def __init__(self, step_dir: Path):
        self.path = Path(step_dir)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _flock(self._fd, fcntl.LOCK_SH)
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                raise FileNotFoundError(f"{self.path} was removed while being opened")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter teardown)
            pass


def remove_unless_read(step_dir: Path) -> bool:
    """Delete a checkpoint directory unless a reader holds it (ReadHold); returns whether it was
    deleted. The exclusive lock is held while deleting, so a reader arriving meanwhile waits and
    then finds the directory gone."""
    try:
        fd = os.open(step_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(step_dir, ignore_errors=True)
        return True
    finally:
        os.close(fd)


_NO_LOCKS = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""What flock on a directory raises where the filesystem does not lock directories (NFS emulating
flock with byte-range locks refuses an exclusive lock on a read-only descriptor; Lustre without the
flock mount option): there, readers hold nothing and retention deletes as it always did."""


def _flock(fd: int, operation: int) -> None:
    try:
        fcntl.flock(fd, operation)
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
