"""Read a prepared token dataset (see :mod:`dist_llama.data.prepare`) through read-only memmaps."""

from __future__ import annotations

import json
import os

import numpy as np

from .prepare import FORMAT, FORMAT_VERSION

__all__ = ["DataError", "TokenDataset"]

_REQUIRED = ("tokenizer", "vocab_size", "dtype", "n_tokens", "n_docs", "shards")


class DataError(ValueError):
    """The data read is not what dist-llama-prepare wrote (a shard changed afterwards): bad input that
    no restart can fix. The trainer exits 2 on it; the message names the shard file and position."""


class TokenDataset:
    """One stream of tokens (all shards concatenated) plus the start offset of every document.

    ``len(ds)`` is the number of tokens. Opened only through :meth:`open`.
    """

    def __init__(self, path: str, meta: dict, shards: list[np.ndarray], doc_starts: np.ndarray,
                 mask_shards: list[np.ndarray] | None = None):
        self.path = path
        self.meta = meta
        self._shards = shards
        self._mask_shards = mask_shards
        self._shard_starts = np.concatenate(([0], np.cumsum([len(s) for s in shards]))).astype(np.int64)
        self.doc_starts = doc_starts  # int64 [n_docs], doc_starts[0] == 0, strictly increasing

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenDataset":
        path = os.path.abspath(os.fspath(path))
        meta_path = os.path.join(path, "meta.json")

        def bad(what: str, file: str = meta_path) -> ValueError:
            return ValueError(f"{file}: {what} (not a dataset made by dist-llama-prepare, or damaged)")

        if not os.path.isfile(meta_path):
            raise bad("missing")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"cannot be read ({e})") from None
        if not isinstance(meta, dict):
            raise bad("is not a JSON object")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise bad(f"missing keys {missing}")
        if meta.get("format", FORMAT) != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
                      f"(this code reads {FORMAT!r} version {FORMAT_VERSION})")
        for key in ("vocab_size", "n_tokens", "n_docs"):  # a hand-edited meta.json: a number as text, a list
            if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < (key == "vocab_size"):
                raise bad(f"{key} must be a {'positive' if key == 'vocab_size' else 'non-negative'} integer, "
                          f"got {meta[key]!r}")
        if not isinstance(meta["shards"], list):
            raise bad(f"shards must be a list of {{file, n_tokens}}, got {type(meta['shards']).__name__}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise bad(f"unsupported dtype {meta['dtype']!r}")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards, total = cls._open_shards(path, meta["shards"], dtype, meta["dtype"], bad)
        mask_shards = None
        if "mask" in meta:  # chat / preference data: one uint8 per token, shards aligned with the tokens'
            mask = meta["mask"]
            if not isinstance(mask, dict) or not isinstance(mask.get("shards"), list):
                raise bad(f"bad mask entry {mask!r}")
            mask_shards, n_mask = cls._open_shards(path, mask["shards"], np.dtype("uint8"), "uint8", bad)
            if [len(m) for m in mask_shards] != [len(t) for t in shards] or n_mask != total:
                raise bad("the mask shards do not match the token shards")
        if total != meta["n_tokens"]:
            raise bad(f"shards hold {total} tokens but n_tokens is {meta['n_tokens']}")
        max_id = meta.get("max_id")
        if max_id is not None and not (isinstance(max_id, int) and max_id < meta["vocab_size"]):
            raise bad(f"token ids up to {max_id} do not fit the vocabulary of {meta['vocab_size']}")
        docs_path = os.path.join(path, "docs.npy")
        try:
            # Memory-mapped: billions of documents cost address space, not memory, on every rank.
            doc_starts = np.load(docs_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise bad(f"cannot be read ({e})", docs_path) from None
        if doc_starts.dtype != np.int64 or doc_starts.ndim != 1 or len(doc_starts) != meta["n_docs"]:
            raise bad(f"expected {meta['n_docs']} int64 offsets, got {doc_starts.dtype} {doc_starts.shape}",
                      docs_path)
        # The ends only: a full monotonicity check would read the whole index (prepare wrote it sorted).
        if len(doc_starts) == 0 or doc_starts[0] != 0 or doc_starts[-1] >= total:
            raise bad("document offsets must start at 0 and stay within the stream", docs_path)
        return cls(path, meta, shards, doc_starts, mask_shards)

    @staticmethod
    def _open_shards(path: str, entries, dtype: np.dtype, dtype_name: str, bad) -> tuple[list[np.ndarray], int]:
        """Memmaps of the shard files listed in ``entries`` ([{file, n_tokens}]) and their total length."""
        shards: list[np.ndarray] = []
        total = 0
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("n_tokens"), int) and entry["n_tokens"] >= 0):
                raise bad(f"bad shard entry {entry!r}")
            if os.path.basename(entry["file"]) != entry["file"] or entry["file"] in ("", ".", ".."):
                raise bad(f"shard file {entry['file']!r} is not a file name in the dataset directory")
            fpath = os.path.join(path, entry["file"])
            n = entry["n_tokens"]
            if not os.path.isfile(fpath):
                raise bad("shard file is missing", fpath)
            size = os.path.getsize(fpath)
            if size != n * dtype.itemsize:
                raise bad(f"size {size} bytes, meta.json says {n} {dtype_name} tokens", fpath)
            if n > 0:
                shards.append(np.memmap(fpath, dtype=dtype, mode="r", shape=(n,)))
            total += n
        return shards, total

    # --- properties -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def fingerprint(self) -> str:
        """Identifies the token stream: tokenizer name, n_tokens, n_docs (+ content hash prefix)."""
        fp = f"{self.meta['tokenizer']}|{self.meta['n_tokens']}|{self.meta['n_docs']}"
        if self.meta.get("sha256"):
            fp += f"|{self.meta['sha256'][:16]}"
        if "mask" in self.meta:
            fp += f"|{self.meta.get('kind')}:{str(self.meta['mask'].get('sha256'))[:16]}"
        return fp

    @property
    def kind(self) -> str:
        """'text' (dist-llama-prepare's default), 'chat' or 'preference' (--format)."""
        return self.meta.get("kind", "text") if self._mask_shards is not None else "text"

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, n_tokens={len(self)}, n_docs={self.n_docs}, "
                f"tokenizer={self.tokenizer_name!r})")

    # --- access -----------------------------------------------------------------------------
    def _check(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")
        return start, stop

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (across shard boundaries), as a new int64 array."""
        start, stop = self._check(start, stop)
        out = self._read(self._shards, start, stop, np.int64)
        # A shard changed after it was prepared: one clear error instead of an IndexError deep in the
        # embedding (or a device-side assert on CUDA).
        if len(out) and int(out.max()) >= self.vocab_size:
            bad = int(np.argmax(out >= self.vocab_size))
            shard, offset = self._locate(start + bad)
            raise DataError(f"{shard}: token id {int(out[bad])} at position {offset} is outside the vocabulary "
                            f"of {self.vocab_size} (a shard was changed after dist-llama-prepare)")
        return out

    def _locate(self, pos: int) -> tuple[str, int]:
        """The shard file holding stream position `pos`, and the position in it."""
        i = int(np.searchsorted(self._shard_starts, pos, side="right")) - 1
        return os.path.join(self.path, self.meta["shards"][i]["file"]), pos - int(self._shard_starts[i])

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """The mask of tokens ``[start, stop)`` (uint8, data/chat.py: 0 prompt, 1 assistant content,
        2 end of an assistant turn); ValueError for data prepared without one (--format text)."""
        start, stop = self._check(start, stop)
        if self._mask_shards is None:
            raise ValueError(f"{self.path}: no loss mask (prepared with --format text; use --format chat)")
        return self._read(self._mask_shards, start, stop, np.uint8)

    def _read(self, shards: list[np.ndarray], start: int, stop: int, dtype) -> np.ndarray:
        """Elements ``[start, stop)`` of the stream of ``shards`` (across shard boundaries), a new array."""
        out = np.empty(stop - start, dtype=dtype)
        i = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            s0 = int(self._shard_starts[i])
            s1 = int(self._shard_starts[i + 1])
            take = min(stop, s1) - pos
            out[pos - start : pos - start + take] = shards[i][pos - s0 : pos - s0 + take]
            pos += take
            i += 1
        return out

    def doc_starts_in(self, start: int, stop: int) -> np.ndarray:
        """Start offsets of the documents overlapping ``[start, stop)`` (the first one <= start)."""
        start, stop = self._check(start, stop)
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.doc_starts, stop, side="left"))
        return np.asarray(self.doc_starts[first:max(last, first + 1)], dtype=np.int64)

    def doc_ids(self, start: int, stop: int) -> np.ndarray:
        """Global document index (int64) of each token in ``[start, stop)``."""
        start, stop = self._check(start, stop)
        return np.searchsorted(self.doc_starts, np.arange(start, stop, dtype=np.int64), side="right") - 1
