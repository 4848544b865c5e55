"""Held-out data for validation: a token range of a source as a source of its own, the split of a
source into a training head and a held-out tail at a document start, and the fixed evaluation
windows.

Evaluation reads the first windows of each held-out source in order (window ``i`` covers tokens
``[i*seq_len, i*seq_len + seq_len + 1)``, as in training), never shuffled and never advancing any
state, so every evaluation of a run sees the same tokens and training sees the same batches whether
it evaluates or not. The windows are laid out as global batches of the training shape; rows past
the last window are padding whose labels are ignored, so the mean does not depend on the batch size
or the layout.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .loader import PackedLoader, Source, TokenSource, pack_windows

__all__ = ["DataSources", "SliceSource", "split_held_out", "eval_batches"]

IGNORE_INDEX = -100
"""The label the loss skips (dist_llama.train.step.IGNORE_INDEX; data does not import train)."""


class DataSources(list):
    """The training sources (a list of Source, what PackedLoader takes) with the held-out ones
    (`held_out`, a list of Source; empty when nothing is held out)."""

    def __init__(self, train, held_out=()):
        super().__init__(train)
        self.held_out: list[Source] = list(held_out)


class SliceSource:
    """Tokens ``[start, stop)`` of another source, renumbered from 0 (a TokenSource)."""

    def __init__(self, data: TokenSource, start: int, stop: int):
        if not 0 <= start <= stop <= len(data):
            raise ValueError(f"slice [{start}, {stop}) outside [0, {len(data)})")
        self.data, self.start, self.stop = data, int(start), int(stop)
        self.fingerprint = f"{data.fingerprint}[{self.start}:{self.stop}]"

    def __len__(self) -> int:
        return self.stop - self.start

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        self._check(start, stop)
        return self.data.tokens(self.start + start, self.start + stop)

    @property
    def kind(self) -> str:
        return getattr(self.data, "kind", "text")

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        self._check(start, stop)
        return self.data.loss_mask(self.start + start, self.start + stop)

    def doc_starts_in(self, start: int, stop: int) -> np.ndarray:
        self._check(start, stop)
        starts = np.asarray(self.data.doc_starts_in(self.start + start, self.start + stop), dtype=np.int64)
        # A document begun before the slice starts at the slice's first token, as far as it can tell.
        return np.maximum(starts - self.start, 0)

    def __repr__(self) -> str:
        return f"SliceSource({self.data!r}, {self.start}, {self.stop})"


def first_doc_start_at_or_after(data: TokenSource, offset: int) -> Optional[int]:
    """The first document start >= offset, or None. Probes growing ranges, so a source with
    millions of documents is never read whole."""
    n, width = len(data), 1024
    while offset < n:
        stop = min(n, offset + width)
        later = [int(s) for s in data.doc_starts_in(offset, stop) if s >= offset]
        if later:
            return later[0]
        offset, width = stop, 2 * width
    return None


def split_held_out(data: TokenSource, fraction: float) -> tuple[SliceSource, SliceSource]:
    """(head, tail): the tail holds the last `fraction` of the tokens, cut at the first document
    start at or after (1 - fraction) * len, so no document is in both. ValueError if no document
    starts there."""
    n = len(data)
    cut = first_doc_start_at_or_after(data, int(np.ceil((1.0 - fraction) * n)))
    if cut is None or cut == 0:
        raise ValueError(f"no document starts in the last {fraction:g} of its {n} tokens to cut the "
                         f"held-out part at (documents cannot be split between training and evaluation)")
    return SliceSource(data, 0, cut), SliceSource(data, cut, n)


def eval_windows(data: TokenSource, seq_len: int, tokens: int) -> int:
    """Windows an evaluation reads: enough for `tokens` input tokens, at most all the source has."""
    return min(-(-tokens // seq_len), PackedLoader.num_windows_for(data, seq_len))


def eval_batches(data: TokenSource, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 tokens: int, reset_positions: bool = True, loss_mask: bool = False) -> list[dict]:
    """This rank's rows of each global batch over the source's first windows (see the module
    docstring): int64 CPU tensors as PackedLoader.next_batch returns them."""
    import torch

    n = eval_windows(data, seq_len, tokens)
    local = global_batch_size // dp_size
    out = []
    for first in range(0, n, global_batch_size):
        rows = first + dp_rank * local + np.arange(local)
        batch = pack_windows([(data, int(w) * seq_len) for w in rows[rows < n]], seq_len, reset_positions, loss_mask)
        pad = int((rows >= n).sum())
        if pad:  # ignored labels: the padding adds nothing and does not count
            fill = {"tokens": 0, "labels": IGNORE_INDEX, "doc_ids": 0}
            batch = {k: torch.cat([v, torch.arange(seq_len).repeat(pad, 1) if k == "positions"
                                   else torch.full((pad, seq_len), fill[k], dtype=torch.int64)])
                     for k, v in batch.items()}
        out.append(batch)
    return out
