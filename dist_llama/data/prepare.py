"""Tokenize text into memory-mapped token shards: ``dist-llama-prepare``.

Output directory layout (format version 1)::

    tokens-00000.bin ...   raw little-endian uint16 (vocab_size <= 65536) or uint32 token ids;
                           the shards concatenated form one stream, documents may span shards
    docs.npy               int64 start offset of every document in that stream (allow_pickle=False)
    meta.json              format, version, tokenizer (name), vocab_size, dtype, n_tokens, n_docs,
                           bos, bos_id, eos_id, sha256 (of the stream), shards [{file, n_tokens}]

Each document is ``[bos] + tokens + [eos]`` (no BOS with ``--no-bos``; EOS always separates
documents). Everything is written into a temporary directory next to the output and renamed into
place at the end, so a crash never leaves a half-written dataset.

    dist-llama-prepare --tokenizer SPEC --out DIR [--text-key text] [--shard-tokens N] [--no-bos]
                       [--force] INPUT...

Inputs: ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line,
the document under ``--text-key``; blank lines are skipped). Bad input exits with code 2 and one
line naming the file (and line).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
import zlib
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["prepare", "main", "InputError", "FORMAT", "FORMAT_VERSION", "DEFAULT_SHARD_TOKENS"]

FORMAT = "dist_llama.tokens"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB uint16 / 1 GiB uint32 per shard
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
_BATCH_DOCS = 256
_BATCH_CHARS = 8 << 20


class InputError(ValueError):
    """Bad input data or arguments; the message names the file (and line)."""


def _suffix(path: str) -> str | None:
    for s in SUFFIXES:
        if path.endswith(s):
            return s
    return None


def _check_inputs(inputs: Sequence[str]) -> list[str]:
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


def _iter_documents(path: str, text_key: str, progress: Callable[[int], None]) -> Iterator[str]:
    """Yield the documents of one input file; ``progress(n)`` is told of bytes read from disk."""
    suffix = _suffix(path)
    if suffix == ".txt":
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
        progress(len(data))
        yield text
        return
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if suffix == ".jsonl.gz" else raw
        last = 0
        lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
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
                pos = raw.tell()
                if pos != last:
                    progress(pos - last)
                    last = pos
                yield text
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{path}:{lineno + 1}: cannot read ({e})") from None
        progress(raw.tell() - last)


def _iter_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def dtype_for_vocab(vocab_size: int) -> str:
    """Storage dtype name: ``"uint16"`` if every id fits (vocab_size <= 65536), else ``"uint32"``."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


class _ShardWriter:
    def __init__(self, out_dir: str, dtype: str, shard_tokens: int):
        self.out_dir = out_dir
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.n_tokens = 0
        self._f = None
        self._left = 0
        self.sha = hashlib.sha256()

    def write(self, arr: np.ndarray) -> None:
        data = arr.astype(self.np_dtype, copy=False)
        while len(data):
            if self._left == 0:
                self._open_next()
            take = data[: self._left]
            b = take.tobytes()
            self._f.write(b)
            self.sha.update(b)
            self.shards[-1]["n_tokens"] += len(take)
            self._left -= len(take)
            self.n_tokens += len(take)
            data = data[len(take) :]

    def _open_next(self) -> None:
        self.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self._f = open(os.path.join(self.out_dir, name), "wb")
        self.shards.append({"file": name, "n_tokens": 0})
        self._left = self.shard_tokens

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def write_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    bos: bool = True,
    sources: Sequence[str] = (),
) -> dict:
    """Tokenize ``documents`` into the existing, empty directory ``out_dir`` (no atomicity here:
    see :func:`prepare`). Returns the meta dict (also written to ``meta.json``, last)."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if bos and tokenizer.bos_id is None:
        raise InputError(f"tokenizer {tokenizer.name} has no BOS token: prepare without BOS (--no-bos)")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writer = _ShardWriter(out_dir, dtype, shard_tokens)
    starts: list[np.ndarray] = []
    try:
        for batch in _iter_batches(documents):
            arrays = tokenizer.encode_arrays(batch, bos=bos, eos=True)
            lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
            starts.append(writer.n_tokens + np.concatenate(([0], np.cumsum(lens)[:-1])))
            flat = np.concatenate(arrays)
            if len(flat) and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
                raise ValueError(
                    f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})"
                )
            writer.write(flat)
    finally:
        writer.close()
    if writer.n_tokens == 0:
        raise InputError(f"no documents in {', '.join(sources) or 'the input'}")
    doc_starts = np.concatenate(starts).astype(np.int64)
    np.save(os.path.join(out_dir, "docs.npy"), doc_starts, allow_pickle=False)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer.name,
        "vocab_size": int(tokenizer.vocab_size),
        "dtype": dtype,
        "n_tokens": int(writer.n_tokens),
        "n_docs": int(len(doc_starts)),
        "bos": bool(bos),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sha256": writer.sha.hexdigest(),
        "shards": writer.shards,
        "sources": [os.path.basename(s) for s in sources],
    }
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(out_dir, "meta.json"))
    return meta


def make_temp_dir(out_dir: str) -> str:
    """A fresh temporary directory next to ``out_dir`` (same filesystem, so rename is atomic)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    while True:  # not tempfile.mkdtemp: that makes the final directory private (0700)
        path = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path)  # mode 0777 & ~umask, like any directory the user creates
            return path
        except FileExistsError:
            continue


def _nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def prepare(
    inputs: Sequence[str],
    tokenizer: Tokenizer | str,
    out_dir: str,
    *,
    text_key: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    bos: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into a new dataset directory ``out_dir``; returns its meta dict.

    Raises :class:`InputError` (a ValueError) for bad inputs, an existing non-empty ``out_dir``
    without ``force``, or no documents. ``out_dir`` appears complete or not at all.
    """
    from tqdm import tqdm

    inputs = _check_inputs(inputs)
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: exists and is not a directory")
    if _nonempty_dir(out_dir) and not force:
        raise InputError(f"{out_dir}: exists and is not empty (use --force to overwrite)")

    total = sum(os.path.getsize(p) for p in inputs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)

    def documents():
        for p in inputs:
            yield from _iter_documents(p, text_key, bar.update)

    tmp = make_temp_dir(out_dir)
    try:
        meta = write_dataset(documents(), tokenizer, tmp, shard_tokens=shard_tokens, bos=bos, sources=inputs)
        bar.close()
        commit_dir(tmp, out_dir, replace=force)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def commit_dir(tmp: str, out_dir: str, *, replace: bool) -> bool:
    """Rename the finished ``tmp`` to ``out_dir``. Returns False (and leaves ``tmp``) if
    ``out_dir`` is a non-empty directory and not ``replace``."""
    try:
        os.rename(tmp, out_dir)  # atomic; also succeeds over an empty directory
        return True
    except OSError:
        if not _nonempty_dir(out_dir):
            raise
        if not replace:
            return False
    # Replace: move the old one aside first, so out_dir is always either old or new, never half.
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(trash, "old"))
    os.rename(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-llama-prepare",
        description="Tokenize .txt / .jsonl / .jsonl.gz files into memory-mapped token shards.",
    )
    p.add_argument("--tokenizer", required=True,
                   help="'byte' or a tokenizer file, recognised by content: a Hugging Face tokenizer.json, "
                        "a tiktoken file (Llama 3 tokenizer.model) or a SentencePiece model (Llama 2's)")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--text-key", default="text", help="JSON key of the document text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .jsonl.gz files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shard_tokens < 1:
        parser.error(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    try:
        tok = build_tokenizer(args.tokenizer)
        meta = prepare(args.inputs, tok, args.out, text_key=args.text_key, shard_tokens=args.shard_tokens,
                       bos=not args.no_bos, force=args.force, progress=not args.quiet)
    except ValueError as e:  # InputError, tokenizer errors
        print(f"dist-llama-prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"dist-llama-prepare: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"wrote {meta['n_tokens']:,} tokens, {meta['n_docs']:,} documents, {len(meta['shards'])} shard(s) "
        f"({meta['dtype']}, tokenizer {meta['tokenizer']}) to {os.path.abspath(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
