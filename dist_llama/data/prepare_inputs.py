"""Input files of ``dist-llama-prepare``, read in document order and cut into batches.

The reading process does only what must be sequential or is cheap in bulk: decompression, line
splitting, Parquet decoding (pyarrow, one row group at a time) and its column checks. Per-document
work (UTF-8 and JSON decoding, then tokenisation) happens in :func:`batch_documents`, which runs
in whichever process tokenises the batch, so parsing scales with the workers too. Every item keeps
its file and line (or row), so an error names them whichever process finds it.

Inputs: ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line,
the document under the text key; blank lines are skipped, lines counted from 1) and ``.parquet``
(the document in the column named by the text key, a string column without nulls; rows counted
from 0, as pyarrow and pandas count them).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Iterable, Iterator, NamedTuple, Sequence

__all__ = ["InputError", "SUFFIXES", "Batch", "check_inputs", "iter_batches", "batch_documents", "text_batches"]

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BATCH_DOCS = 256
BATCH_BYTES = 8 << 20

# Item kinds: what the payload is and how batch_documents turns it into a document.
TXT = "txt"  # the bytes of a whole .txt file
JSON = "json"  # the bytes of one JSON line
TEXT = "text"  # a document, already a str (checked by the reader)


class InputError(ValueError):
    """Bad input data or arguments; the message names the file (and line)."""


class Batch(NamedTuple):
    """Consecutive documents, possibly from several files; ``nbytes`` is the share of the input
    files' sizes it accounts for (progress), summing to the total size over all batches."""

    items: list[tuple[str, str, int, object]]  # (kind, path, line or row, payload)
    nbytes: int


def _suffix(path: str) -> str | None:
    for s in SUFFIXES:
        if path.endswith(s):
            return s
    return None


def check_inputs(inputs: Sequence[str] | str | os.PathLike) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise InputError("no input files given")
    for p in inputs:
        if _suffix(p) is None:
            raise InputError(f"{p}: unsupported input type (expected {', '.join(SUFFIXES)})")
        if not os.path.isfile(p):
            raise InputError(f"{p}: no such file")
    return inputs


def _txt_items(path: str) -> Iterator[tuple[tuple, int]]:
    with open(path, "rb") as f:
        data = f.read()
    yield (TXT, path, 0, data), len(data)


def _jsonl_items(path: str, gz: bool) -> Iterator[tuple[tuple, int]]:
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        last = lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                pos = raw.tell()  # compressed bytes for .gz: progress against the file sizes
                yield (JSON, path, lineno, line), pos - last
                last = pos
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{path}:{lineno + 1}: cannot read ({e})") from None
        end = raw.tell()
    if end != last:
        yield None, end - last  # trailing blank lines: progress only


def _parquet_items(path: str, text_key: str) -> Iterator[tuple[tuple, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = os.path.getsize(path)
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if text_key not in schema.names:
            raise InputError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names) or 'none'})")
        kind = schema.field(text_key).type
        value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
                or getattr(pa.types, "is_string_view", lambda t: False)(value_kind)):
            raise InputError(f"{path}: column {text_key!r} is {kind}, expected strings")
        total, row, done = pf.metadata.num_rows, 0, 0
        # iter_batches reads one row group at a time, so memory stays bounded on large files.
        for rb in pf.iter_batches(batch_size=BATCH_DOCS, columns=[text_key]):
            col = rb.column(0)
            if col.null_count:
                first = col.is_null().to_numpy(zero_copy_only=False).argmax()
                raise InputError(f"{path}: row {row + int(first)}: {text_key!r} is null, expected a string")
            texts = col.to_pylist()
            for i, text in enumerate(texts):
                share = size * (row + i + 1) // total - done
                done += share
                yield (TEXT, path, row + i, text), share
            row += len(texts)
    except (OSError, pa.ArrowException) as e:  # ArrowInvalid: not Parquet, corrupt pages
        raise InputError(f"{path}: cannot read as Parquet ({e})") from None
    if done != size:
        yield None, size - done  # no rows: progress only


def _file_items(path: str, text_key: str) -> Iterator[tuple[tuple | None, int]]:
    suffix = _suffix(path)
    if suffix == ".txt":
        return _txt_items(path)
    if suffix == ".parquet":
        return _parquet_items(path, text_key)
    return _jsonl_items(path, gz=suffix == ".jsonl.gz")


def iter_batches(inputs: Sequence[str], text_key: str) -> Iterator[Batch]:
    """The items of ``inputs`` in order, in batches of at most BATCH_DOCS documents and about
    BATCH_BYTES bytes of input."""
    items: list = []
    nbytes = size = 0
    try:
        for path in inputs:
            for item, n in _file_items(path, text_key):
                nbytes += n
                if item is None:
                    continue
                items.append(item)
                size += len(item[3])
                if len(items) >= BATCH_DOCS or size >= BATCH_BYTES:
                    yield Batch(items, nbytes)
                    items, nbytes, size = [], 0, 0
    except Exception:
        # The items read before the error go first: an error in one of them (bad JSON on an
        # earlier line) is the one to report, and is found only when the batch is decoded.
        if items:
            yield Batch(items, nbytes)
        raise
    if items or nbytes:
        yield Batch(items, nbytes)


def text_batches(documents: Iterable[str]) -> Iterator[Batch]:
    """Batches of documents that are already strings (the builtin corpus, the Python API)."""
    items: list = []
    size = 0
    for i, d in enumerate(documents):
        items.append((TEXT, "", i, d))
        size += len(d)
        if len(items) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield Batch(items, 0)
            items, size = [], 0
    if items:
        yield Batch(items, 0)


def batch_documents(batch: Batch, text_key: str) -> list[str]:
    """The documents of ``batch``: decoded and checked, InputError naming the file and line."""
    docs = []
    for kind, path, where, payload in batch.items:
        if kind == TEXT:
            docs.append(payload)
        elif kind == TXT:
            try:
                docs.append(payload.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
        else:
            docs.append(_json_document(payload, path, where, text_key))
    return docs


def _json_document(line: bytes, path: str, lineno: int, text_key: str) -> str:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise InputError(f"{path}:{lineno}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{lineno}: bad JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        raise InputError(f"{path}:{lineno}: no key {text_key!r} (keys: {', '.join(map(str, obj)) or 'none'})")
    text = obj[text_key]
    if not isinstance(text, str):
        raise InputError(f"{path}:{lineno}: {text_key!r} is {type(text).__name__}, expected a string")
    return text
