"""Packed sequences and the stateful, data-parallel sampler.

The token stream is cut into fixed windows: window ``i`` covers tokens
``[i*seq_len, i*seq_len + seq_len + 1)``; inputs are its first ``seq_len`` tokens, labels its last
``seq_len`` (neighbouring windows share one token). Windows ignore document boundaries: a window
usually starts mid-document and may span several documents; ``doc_ids`` (and ``positions`` when
``reset_positions``) let the model mask attention to the document and restart RoPE positions.
Labels are not masked at document boundaries (the EOS input token predicts the next document's
first token, as in Meta's and torchtitan's pretraining).

Order: epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_windows)``; the global
order is epoch 0, then epoch 1, ... Global step ``s`` takes global samples
``[s*global_batch_size, (s+1)*global_batch_size)`` of that order (steps cross epochs seamlessly),
and data-parallel rank ``r`` takes the contiguous slice ``[r*local, (r+1)*local)`` of them.

State is only the number of global samples consumed. Hence resuming is exact, and *reshards
exactly*: a checkpoint saved with dp_size 4 resumed with dp_size 2 or 8 (same global batch) sees
exactly the same global samples in the same order, only split differently across ranks. Changing
``global_batch_size`` on resume is also allowed: the consumed-sample position is kept exactly
(the next step starts at the next unseen global sample; only step boundaries move).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PackedLoader"]

_MUST_MATCH = ("dataset", "seq_len", "seed")


class PackedLoader:
    def __init__(self, ds, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int = 0, reset_positions: bool = True):
        for name, v, lo in (("seq_len", seq_len, 1), ("global_batch_size", global_batch_size, 1),
                            ("dp_size", dp_size, 1), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        n = self.num_windows_for(len(ds), seq_len)
        if n < global_batch_size:
            raise ValueError(
                f"seq_len {seq_len} is too long for this dataset: {len(ds)} tokens make {n} windows of "
                f"seq_len+1 tokens, fewer than global_batch_size {global_batch_size} "
                f"(largest seq_len allowed: {self.max_seq_len_for(len(ds), global_batch_size)})"
            )
        self.ds = ds
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.local_batch_size = self.global_batch_size // self.dp_size
        self.seed = int(seed)
        self.reset_positions = bool(reset_positions)
        self.num_windows = n
        self.consumed = 0  # global samples consumed (all ranks together)
        self._perms: dict[int, np.ndarray] = {}

    # --- helpers for config validation (no loader needed) ------------------------------------
    @staticmethod
    def num_windows_for(n_tokens, seq_len: int) -> int:
        """Number of windows of ``seq_len + 1`` tokens (stride ``seq_len``) in ``n_tokens`` tokens
        (or in a dataset: anything with ``len()``)."""
        n_tokens = n_tokens if isinstance(n_tokens, (int, np.integer)) else len(n_tokens)
        return max(0, (int(n_tokens) - 1) // int(seq_len))

    @staticmethod
    def max_seq_len_for(n_tokens, global_batch_size: int) -> int:
        """Largest seq_len giving at least ``global_batch_size`` windows (0 if none does)."""
        n_tokens = n_tokens if isinstance(n_tokens, (int, np.integer)) else len(n_tokens)
        return max(0, (int(n_tokens) - 1) // int(global_batch_size))

    # --- order --------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read."""
        return self.consumed // self.num_windows

    @property
    def step(self) -> int:
        """Steps taken (exact when global_batch_size never changed)."""
        return self.consumed // self.global_batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            p = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perms[epoch] = p
        return p

    def window_indices(self, start: int, stop: int) -> np.ndarray:
        """Window indices of global samples ``[start, stop)`` of the global order."""
        out = np.empty(stop - start, dtype=np.int64)
        g = start
        while g < stop:
            e, off = divmod(g, self.num_windows)
            take = min(stop - g, self.num_windows - off)
            out[g - start : g - start + take] = self._perm(e)[off : off + take]
            g += take
        return out

    # --- batches -----------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """This rank's slice of the next global batch: int64 tensors ``[local, seq_len]`` of
        ``tokens``, ``labels``, ``doc_ids`` (global document index of each input token) and
        ``positions`` (index within the part of its document inside this window, restarting at 0 at the
        window start and at each document start; 0..seq_len-1 without reset_positions)."""
        import torch

        first = self.consumed + self.dp_rank * self.local_batch_size
        windows = self.window_indices(first, first + self.local_batch_size)
        L = self.seq_len
        tokens = np.empty((len(windows), L + 1), dtype=np.int64)
        doc_ids = np.empty((len(windows), L), dtype=np.int64)
        positions = np.empty((len(windows), L), dtype=np.int64)
        ar = np.arange(L, dtype=np.int64)
        for row, w in enumerate(windows):
            s = int(w) * L
            tokens[row] = self.ds.tokens(s, s + L + 1)
            ids = np.searchsorted(self.ds.doc_starts, s + ar, side="right") - 1
            doc_ids[row] = ids
            # Positions count from the window start or the document start, whichever is later, so
            # they stay below seq_len (a long document's tail is a fresh sequence to the model).
            positions[row] = (s + ar - np.maximum(self.ds.doc_starts[ids], s)) if self.reset_positions else ar
        self.consumed += self.global_batch_size
        return {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])),
            "doc_ids": torch.from_numpy(doc_ids),
            "positions": torch.from_numpy(positions),
        }

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": int(self.consumed),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "dataset": self.ds.fingerprint,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at ``sd["consumed"]``. dataset, seq_len and seed must match (ValueError naming
        the key and both values); dp_size and global_batch_size may differ (see module doc)."""
        mine = self.state_dict()
        for key in _MUST_MATCH:
            if key not in sd:
                raise ValueError(f"data loader state has no {key!r}")
            if sd[key] != mine[key]:
                raise ValueError(
                    f"data loader state mismatch on {key!r}: checkpoint has {sd[key]!r}, "
                    f"current run has {mine[key]!r}"
                )
        consumed = sd.get("consumed")
        if not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise ValueError(f"data loader state has a bad 'consumed' value: {consumed!r}")
        self.consumed = int(consumed)
