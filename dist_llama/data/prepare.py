"""Tokenize text into memory-mapped token shards: ``dist-llama-prepare``.

Output directory layout (format version 1)::

    tokens-00000.bin ...   raw little-endian uint16 (vocab_size <= 65536) or uint32 token ids;
                           the shards concatenated form one stream, documents may span shards
    docs.npy               int64 start offset of every document in that stream (allow_pickle=False)
    meta.json              format, version, tokenizer (name), vocab_size, dtype, n_tokens, n_docs,
                           bos, bos_id, eos_id, sha256 (of the stream), max_id (the largest token
                           id), shards [{file, n_tokens}]; chat and preference data also kind and
                           mask {sha256, shards}
    mask-00000.bin ...     (chat, preference) uint8 per token, aligned with the token shards: what
                           the token is in its conversation (data/chat.py: 0 prompt, 1 assistant
                           content, 2 end of an assistant turn)

Each document is ``[bos] + tokens + [eos]`` (no BOS with ``--no-bos``; EOS always separates
documents). Everything is written into a temporary directory next to the output and renamed into
place at the end, so a crash never leaves a half-written dataset.

    dist-llama-prepare --tokenizer SPEC --out DIR [--format text|chat|preference] [--text-key text]
                       [--shard-tokens N] [--no-bos] [--workers N] [--quiet] [--force] INPUT...

``--format chat`` reads ``{"messages": [...]}`` records and ``--format preference``
``{"prompt": [...], "chosen": str, "rejected": str}`` records (.jsonl / .jsonl.gz), rendered with
the chat template the tokenizer implies (data/chat.py); each conversation is one document (no EOS
added: the template ends it), a preference record two adjacent ones (prompt + chosen, then
prompt + rejected).

Inputs: ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line,
the document under ``--text-key``; blank lines are skipped) and ``.parquet`` (the document in the
string column ``--text-key``, read one row group at a time; see :mod:`.prepare_inputs`). Bad
input exits with code 2 and one line naming the file (and line or row).

Tokenisation runs in ``--workers`` processes (default: the usable cores; 1 runs in-process). This
process reads the inputs in order and cuts them into batches of up to 256 documents; the workers
decode and tokenise the batches, each with its own tokenizer built from ``--tokenizer``; the
results are written strictly in input order, with at most two batches per worker in flight, so
memory stays bounded and the output is byte-identical whatever the number of workers. A progress
bar on stderr (a terminal only, not with ``--quiet``) shows input bytes and tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np

from dist_llama.exit_codes import ArgumentParser as OneLineParser

from .bad_records import SKIPPED_FILE, encode_or_skip, write_skipped
from .preference import PAIRS_FILE, pair_table
from .chat import FORMATS
from .prepare_inputs import Batch, InputError, batch_documents, check_inputs, iter_batches, text_batches
from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["prepare", "main", "InputError", "FORMAT", "FORMAT_VERSION", "DEFAULT_SHARD_TOKENS"]

FORMAT = "dist_llama.tokens"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB uint16 / 1 GiB uint32 per shard
IN_FLIGHT_PER_WORKER = 2  # batches handed out ahead of the writer: workers never wait, memory stays bounded


def dtype_for_vocab(vocab_size: int) -> str:
    """Storage dtype name: ``"uint16"`` if every id fits (vocab_size <= 65536), else ``"uint32"``."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


class _ShardWriter:
    def __init__(self, out_dir: str, dtype: str, shard_tokens: int, prefix: str = "tokens"):
        self.out_dir, self.prefix = out_dir, prefix
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.n_tokens = 0
        self.max_id = -1
        """The largest token id written: recorded so that a reader can check it against a vocabulary."""
        self._f = None
        self._left = 0
        self.sha = hashlib.sha256()

    def write(self, arr: np.ndarray) -> None:
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))
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
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self._f = open(os.path.join(self.out_dir, name), "wb")
        self.shards.append({"file": name, "n_tokens": 0})
        self._left = self.shard_tokens

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def _encode(batch: Batch, tokenizer: Tokenizer, text_key: str, bos: bool, fmt: str = "text", skip_bad: bool = False):
    """Tokenise one batch: (its ids in the storage dtype, back to back; each document's length;
    the input bytes it accounts for; the mask of chat and preference data, else None; the records
    skipped, with skip_bad; each preference pair's (file, line, rating, margin))."""
    dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size)).newbyteorder("<")
    masks, skipped, pairs = None, [], []
    if fmt == "text":
        docs = batch_documents(batch, text_key)
        arrays = tokenizer.encode_arrays(docs, bos=bos, eos=True) if docs else []
    else:
        arrays, masks, pairs, skipped = encode_or_skip(batch.items, tokenizer, fmt, skip_bad)
    if not arrays:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64), batch.nbytes, \
            None if masks is None else np.empty(0, dtype=np.uint8), skipped, pairs
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays)
    if len(flat) and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})")
    # converted here, in the worker: half or a quarter of the int64 bytes go back to the writer
    return flat.astype(dtype), lens, batch.nbytes, None if masks is None else np.concatenate(masks), skipped, pairs


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(spec: str) -> Tokenizer:
    # built once per worker process (loading a tokenizer file takes up to seconds), kept for its batches
    return build_tokenizer(spec)


def _encode_in_worker(spec: str, name: str, text_key: str, bos: bool, fmt: str, skip_bad: bool, batch: Batch):
    tok = _worker_tokenizer(spec)
    if tok.name != name:  # the file was replaced after the parent read it: the ids would mix two tokenizers
        raise ValueError(f"{spec}: the tokenizer changed while preparing ({name} became {tok.name})")
    return _encode(batch, tok, text_key, bos, fmt, skip_bad)


def _init_worker() -> None:
    # The pool is the parallelism: Hugging Face tokenizers' own thread pool in every worker would
    # only oversubscribe the cores. Set before the worker first imports tokenizers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenize_in_order(batches: Iterable[Batch], tokenizer: Tokenizer, consume: Callable, *,
                       text_key: str, bos: bool, workers: int, spec: str | None, fmt: str = "text",
                       skip_bad: bool = False) -> None:
    """``consume(ids, lens, nbytes, mask, skipped, pairs)`` for every batch, strictly in input order; batches are
    tokenised in this process (``workers == 1``) or in ``workers`` processes."""
    if workers == 1:
        for batch in batches:
            consume(*_encode(batch, tokenizer, text_key, bos, fmt, skip_bad))
        return
    task = functools.partial(_encode_in_worker, spec, tokenizer.name, text_key, bos, fmt, skip_bad)
    # spawn, not fork: the parent may hold threads (tiktoken's and sentencepiece's batch encoders,
    # the tokenizers' rayon pool, torch's) whose locks a forked child would inherit mid-use.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    pending: deque = deque()
    try:
        reader = iter(batches)
        while True:
            try:
                batch = next(reader)
            except StopIteration:
                break
            except Exception:
                # A reading error is reported after the errors of the batches before it, as with one worker.
                while pending:
                    consume(*pending.popleft().result())
                raise
            pending.append(pool.submit(task, batch))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                consume(*pending.popleft().result())
        while pending:
            consume(*pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    return write_batches(text_batches(documents), tokenizer, out_dir, shard_tokens=shard_tokens, bos=bos,
                         sources=sources)


def write_batches(
    batches: Iterable[Batch],
    tokenizer: Tokenizer,
    out_dir: str,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    bos: bool = True,
    sources: Sequence[str] = (),
    text_key: str = "text",
    workers: int = 1,
    spec: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    fmt: str = "text",
    skip_bad: bool = False,
) -> dict:
    """:func:`write_dataset` of batches from :mod:`.prepare_inputs`, tokenised by ``workers``
    processes that build the tokenizer from ``spec``; ``on_batch(input bytes, tokens)`` after each
    batch is written. The output does not depend on ``workers``."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    if bos and tokenizer.bos_id is None and fmt == "text":
        raise InputError(f"tokenizer {tokenizer.name} has no BOS token: prepare without BOS (--no-bos)")
    if workers > 1 and spec is None:
        raise ValueError("workers > 1 needs the tokenizer spec ('byte' or a file) to rebuild it in each worker")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writer = _ShardWriter(out_dir, dtype, shard_tokens)
    masks = _ShardWriter(out_dir, "uint8", shard_tokens, prefix="mask") if fmt != "text" else None
    starts: list[np.ndarray] = []
    skipped: list[dict] = []
    pairs: list[tuple] = []
    pair_files: dict[str, int] = {}

    def consume(ids: np.ndarray, lens: np.ndarray, nbytes: int, mask: np.ndarray | None, bad: list,
                labels: list) -> None:
        skipped.extend(bad)
        pairs.extend((pair_files.setdefault(path, len(pair_files)), line, rating, margin)
                     for path, line, rating, margin in labels)
        if len(lens):
            starts.append(writer.n_tokens + np.concatenate(([0], np.cumsum(lens)[:-1])))
        writer.write(ids)
        if masks is not None:
            masks.write(mask)
        if on_batch is not None:
            on_batch(nbytes, len(ids))

    try:
        _tokenize_in_order(batches, tokenizer, consume, text_key=text_key, bos=bos, workers=workers, spec=spec,
                           fmt=fmt, skip_bad=skip_bad)
    finally:
        writer.close()
        if masks is not None:
            masks.close()
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
        "max_id": int(writer.max_id),
        "shards": writer.shards,
        "sources": [os.path.basename(s) for s in sources],
    }
    if masks is not None:
        meta.update(kind=fmt, bos=tokenizer.bos_id is not None,
                    mask={"sha256": masks.sha.hexdigest(), "shards": masks.shards}, skipped=len(skipped))
    if fmt == "preference":
        table = pair_table(pairs)
        np.save(os.path.join(out_dir, PAIRS_FILE), table, allow_pickle=False)
        meta.update(pairs={"file": PAIRS_FILE, "sha256": hashlib.sha256(table.tobytes()).hexdigest(),
                           "files": list(pair_files)})
    write_skipped(out_dir, skipped)
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


def _is_dataset(path: str) -> bool:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
    workers: int = 1,
    fmt: str = "text",
    skip_bad: bool = False,
) -> dict:
    """Tokenize ``inputs`` into a new dataset directory ``out_dir``; returns its meta dict.

    ``workers > 1`` tokenises in that many processes, each building the tokenizer from its spec
    (so ``tokenizer`` must then be the spec, ``"byte"`` or a file, not a Tokenizer object); the
    output is byte-identical for any number of workers. ``progress`` shows a bar on stderr when it
    is a terminal. Raises :class:`InputError` (a ValueError) for bad inputs, an existing non-empty
    ``out_dir`` without ``force``, or no documents. ``out_dir`` appears complete or not at all.
    """
    from tqdm import tqdm

    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    inputs = check_inputs(inputs)
    spec = None
    if isinstance(tokenizer, (str, os.PathLike)):
        spec = os.fspath(tokenizer)
        tokenizer = build_tokenizer(spec)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: exists and is not a directory")
    if _nonempty_dir(out_dir) and not force:
        raise InputError(f"{out_dir}: exists and is not empty (use --force to overwrite)")
    if _nonempty_dir(out_dir) and not _is_dataset(out_dir):  # --force on `.` or a home would delete it
        raise InputError(f"{out_dir}: --force replaces a dataset dist-llama-prepare wrote; this directory holds "
                         "no such meta.json, so it is left alone: give a new --out")

    total = sum(os.path.getsize(p) for p in inputs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    start, tokens = time.monotonic(), 0

    def on_batch(nbytes: int, ntokens: int) -> None:
        nonlocal tokens
        tokens += ntokens
        rate = tokens / max(time.monotonic() - start, 1e-6)
        bar.set_postfix_str(f"{tqdm.format_sizeof(rate)}tok/s", refresh=False)
        bar.update(nbytes)

    try:
        tmp = make_temp_dir(out_dir)
    except OSError as exc:  # a parent that is a file, or not writable: the argument, not the machine
        raise InputError(f"{out_dir}: cannot be created ({exc.strerror or exc})") from None
    try:
        meta = write_batches(iter_batches(inputs, text_key), tokenizer, tmp, shard_tokens=shard_tokens, bos=bos,
                             sources=inputs, text_key=text_key, workers=workers, spec=spec, on_batch=on_batch,
                             fmt=fmt, skip_bad=skip_bad)
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
    p = OneLineParser(
        prog="dist-llama-prepare",
        description="Tokenize .txt / .jsonl / .jsonl.gz / .parquet files into memory-mapped token shards.",
    )
    p.add_argument("--tokenizer", required=True,
                   help="'byte' or a tokenizer file, recognised by content: a Hugging Face tokenizer.json, "
                        "a tiktoken file (Llama 3 tokenizer.model) or a SentencePiece model (Llama 2's)")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--format", default="text", choices=FORMATS,
                   help="text: documents; chat: {messages: [...]} records; preference: {prompt: [...], "
                        "chosen, rejected} records, rendered with the tokenizer's chat template (default: text)")
    p.add_argument("--text-key", default="text",
                   help="JSON key or Parquet column of the document text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes; the output is the same for any number (default: the usable cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--skip-bad", action="store_true",
                   help=f"chat, preference: leave out records that cannot be trained on (listed in OUT/{SKIPPED_FILE}) "
                        "instead of stopping at the first")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl, .jsonl.gz or .parquet files")
    return p


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (taskset, Slurm, containers)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shard_tokens < 1:
        parser.error(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    workers = _usable_cores() if args.workers is None else args.workers
    if workers < 1:
        parser.error(f"--workers must be >= 1, got {workers}")
    try:
        meta = prepare(args.inputs, args.tokenizer, args.out, text_key=args.text_key, shard_tokens=args.shard_tokens,
                       bos=not args.no_bos, force=args.force, progress=not args.quiet, workers=workers,
                       fmt=args.format, skip_bad=args.skip_bad)
    except ValueError as e:  # InputError, tokenizer errors
        print(f"dist-llama-prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"dist-llama-prepare: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if meta.get("skipped"):
        print(f"dist-llama-prepare: skipped {meta['skipped']} bad record(s), listed in "
              f"{os.path.join(os.path.abspath(args.out), SKIPPED_FILE)}", file=sys.stderr)
    print(
        f"wrote {meta['n_tokens']:,} tokens, {meta['n_docs']:,} documents, {len(meta['shards'])} shard(s) "
        f"({meta['dtype']}, tokenizer {meta['tokenizer']}) to {os.path.abspath(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
