"""One safetensors file, its header validated before a byte of tensor data is read.

The header is believed only as far as the file backs it: a JSON object of at most MAX_HEADER_BYTES
(and no larger than the file), each entry an allowed dtype, a shape of non-negative integers and
data_offsets of exactly shape x itemsize bytes, the entries tiling the data section in order with no
gap, overlap or byte past the end (as the safetensors library requires). Anything else is a
WeightsError naming the file and the tensor: a crafted header cannot make a reader return another
tensor's bytes, the header's own bytes or memory it never filled, nor make an export write more than
the source holds.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch

from dist_llama.weights.validate import WeightsError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit."""
MAX_DIMS = 8


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"{dup} appears twice")  # json would keep the last silently
    return dict(pairs)


def _entry(path: Path, name: str, info, data_bytes: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked."""
    def bad(what: str) -> WeightsError:
        return WeightsError(f"{path}: tensor {name}: {what}")

    if not isinstance(info, dict):
        raise bad(f"header entry must be an object, got {info!r}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
        raise bad(f"shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
        raise bad(f"data_offsets must be two integers [begin, end], got {offsets!r}")
    begin, end = offsets
    size = math.prod(shape) * ITEMSIZE[dtype]
    if not 0 <= begin <= end <= data_bytes:
        raise bad(f"data_offsets {offsets} are outside the file's {data_bytes} bytes of data")
    if end - begin != size:
        raise bad(f"data_offsets {offsets} hold {end - begin} bytes, shape {shape} of {dtype} needs {size}")
    return DTYPES[dtype], tuple(shape), begin, end


def read_header(path: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """(data start, {name: (dtype, shape, begin, end)}) of a safetensors file, every entry checked
    against the file's real size before anything is believed."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WeightsError(f"{path}: not readable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{path}: not a regular file")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if not 0 < header_len <= min(size - 8, MAX_HEADER_BYTES):
                raise WeightsError(f"{path}: not a safetensors file (header length {header_len}, file of {size} "
                                   f"bytes; at most {MAX_HEADER_BYTES})")
            raw = f.read(header_len)
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except OSError as exc:
        raise WeightsError(f"{path}: not readable ({exc})") from None
    except ValueError as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{path}: not a safetensors file (its JSON header: {exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header must be a JSON object, got {type(header).__name__})")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise WeightsError(f"{path}: __metadata__ must be an object")
    data_bytes = size - 8 - header_len
    entries = {name: _entry(path, name, info, data_bytes) for name, info in header.items() if name != "__metadata__"}
    covered = 0  # the entries in file order must tile the data section exactly
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves bytes {covered}..{begin} unused"
            raise WeightsError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] {what}")
        covered = end
    if covered != data_bytes:
        raise WeightsError(f"{path}: the tensors hold {covered} bytes, the file {data_bytes} after its header "
                           "(truncated, or bytes no tensor claims)")
    return 8 + header_len, entries


def _read_fully(f, view: memoryview) -> int:
    """Bytes read into `view`: one read returns at most ~2 GiB on Linux, so loop until full or EOF."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class SafetensorsFile:
    """A safetensors file read with plain positioned reads (no mmap: mapped pages would stay in this
    process's memory for as long as the file is open, so memory would grow with the model)."""

    def __init__(self, path: Path):
        self.path = path
        start, entries = read_header(path)
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {
            name: (dtype, shape, start + begin) for name, (dtype, shape, begin, _) in entries.items()}
        """name -> (dtype, shape, offset of its first byte in the file)."""

    def read(self, name: str, box: list[tuple[int, int]]) -> torch.Tensor:
        """The box [(start, stop) per dimension] of tensor `name`, reading only its bytes (whole
        rows when the box spans every column, else one read per row)."""
        dtype, shape, offset = self.tensors[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        row = itemsize * math.prod(shape[1:])
        (r0, r1), *rest = box
        out = torch.empty([r1 - r0, *(b - a for a, b in rest)], dtype=dtype)
        buf = out.view(torch.uint8).numpy().reshape(-1)
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            if all((a, b) == (0, n) for (a, b), n in zip(rest, shape[1:])):
                f.seek(offset + r0 * row)
                got = _read_fully(f, memoryview(buf))
            else:  # a column range of a matrix
                (c0, c1), = rest
                width = (c1 - c0) * itemsize
                for i in range(r1 - r0):
                    f.seek(offset + (r0 + i) * row + c0 * itemsize)
                    got += _read_fully(f, memoryview(buf[i * width:(i + 1) * width]))
        if got != buf.size:  # the file shrank after its header was checked
            raise WeightsError(f"{self.path}: tensor {name}: read {got} of {buf.size} bytes (the file was truncated)")
        return out
