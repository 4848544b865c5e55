"""Preference pairs for DPO: one pair per row, so chosen and rejected never part.

A preference dataset (``dist-llama-prepare --format preference``) holds each pair as two adjacent
documents: ``2k`` = prompt + chosen, ``2k + 1`` = prompt + rejected. Row ``i`` of a batch is one
pair packed into ``seq_len + 1`` tokens: the chosen sequence, then the rejected one, then padding
(the end-of-text id); ``doc_ids`` are 0 (chosen), 1 (rejected) and 2 (padding), so the document
mask keeps the two from attending to each other, and positions restart at each. Labels are the
next tokens where the mask marks a response token (1, and 2 unless ``mask_special``), else -100;
so a counted label's ``doc_ids`` entry says which response it belongs to. Every pair must fit in
a row (checked at construction from the document offsets alone: a cut would drop responses). When
``reference`` holds the reference model's log-probs of every pair ([n_pairs, 2], chosen then
rejected), each row carries its pair's as ``ref_logps``.

Order, a pure function of (seed, position) as in PackedLoader: global sample ``k`` is pair
``perm(k mod n_pairs)`` of epoch ``k // n_pairs`` (a keyed permutation per epoch); step ``s`` takes
samples ``[s*B, (s+1)*B)`` and data-parallel rank ``r`` rows ``[r*B/dp, (r+1)*B/dp)`` of them. The
state is the sample count, so resuming is exact, also with another data-parallel degree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .chat import END, final_answer_only
from .permutation import EpochOrder, restored_consumed
from .preference import MARGINS, pair_labels, pair_origin

__all__ = ["PairLoader", "ScoredPairLoader", "CHOSEN", "REJECTED", "PAD"]

CHOSEN, REJECTED, PAD = 0, 1, 2
"""doc_ids of a row's chosen sequence, rejected sequence and padding."""


class PairLoader:
    room_extra = 1
    """A row holds seq_len + room_extra tokens of a pair (DPO: the last one is only a label)."""

    def __init__(self, data, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int = 0,
                 mask_special: bool = False, name: str = "data"):
        """data: a TokenDataset of kind 'preference'. mask_special: the end-of-turn token of each
        response is not counted (Llama 3's DPO)."""
        if getattr(data, "kind", "text") != "preference":
            raise ValueError(f"{data!r} is not preference data (prepare it with --format preference)")
        if data.n_docs % 2:
            raise ValueError(f"{data!r}: {data.n_docs} documents, not pairs of (chosen, rejected)")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        self.n_pairs = data.n_docs // 2
        if self.n_pairs < global_batch_size:
            raise ValueError(f"{self.n_pairs} preference pairs, fewer than global_batch_size {global_batch_size}")
        starts = np.append(np.asarray(data.doc_starts, dtype=np.int64), len(data))
        pair_len = starts[2::2] - starts[:-1:2]
        self.labels = pair_labels(data)
        room = seq_len + self.room_extra
        if pair_len.max() > room:
            k = int(np.flatnonzero(pair_len > room)[0])
            raise ValueError(f"{pair_origin(data, self.labels, k)}: the preference pair has {int(pair_len[k])} "
                             f"tokens (prompt twice, both responses), more than data.seq_len{'+1' * self.room_extra}"
                             f" = {room}: raise data.seq_len to at least {int(pair_len.max()) - self.room_extra}")
        self.data, self.name = data, name
        self.seq_len, self.global_batch_size = int(seq_len), int(global_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.mask_special = bool(mask_special)
        self.pad_id = int(data.meta.get("eos_id") or 0)
        self.consumed = 0
        self.new_epochs: list[tuple[str, int]] = []
        self._order = EpochOrder(self.n_pairs, self.seed, 0x9A1)
        self.reference: np.ndarray | None = None
        """float32 [n_pairs, 2]: the reference's log-probs of each pair (train.dpo.reference=precomputed)."""

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def tokens_by_source(self) -> dict[str, int]:
        return {self.name: self.consumed * self.seq_len}

    def _pair(self, k: int) -> int:
        return self._order(k)

    def _side(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        start = int(self.data.doc_starts[doc])
        stop = int(self.data.doc_starts[doc + 1]) if doc + 1 < self.data.n_docs else len(self.data)
        # final_answer_only again on read: data prepared before it was applied at prepare time
        return self.data.tokens(start, stop), final_answer_only(self.data.loss_mask(start, stop))

    def row(self, pair: int) -> dict[str, np.ndarray]:
        """The row of one pair: int64 arrays [seq_len] of tokens, labels, doc_ids, positions (and
        the pair's reference log-probs [2] when the loader has them)."""
        (c, cm), (r, rm) = self._side(2 * pair), self._side(2 * pair + 1)
        pad = self.seq_len + 1 - len(c) - len(r)
        tokens = np.concatenate([c, r, np.full(pad, self.pad_id, dtype=np.int64)])
        mask = np.concatenate([cm, rm, np.zeros(pad, dtype=np.uint8)])
        counted = (mask == 1) | ((mask == END) & (not self.mask_special))
        doc = np.repeat(np.array([CHOSEN, REJECTED, PAD], dtype=np.int64), [len(c), len(r), pad])
        positions = np.concatenate([np.arange(len(c)), np.arange(len(r)), np.arange(pad)]).astype(np.int64)
        row = {"tokens": tokens[:-1], "labels": np.where(counted[1:], tokens[1:], -100),
               "doc_ids": doc[:-1], "positions": positions[:-1]}
        if self.reference is not None:
            row["ref_logps"] = self.reference[pair]
        return row

    def next_batch(self) -> dict:
        """This rank's rows of the next global batch (see the module docstring)."""
        import torch

        B, first = self.global_batch_size, self.consumed
        lo = first + self.dp_rank * self.local_batch_size
        rows = [self.row(self._pair(k)) for k in range(lo, lo + self.local_batch_size)]
        self.new_epochs = [(self.name, e) for e in range(max(1, -(-first // self.n_pairs)),
                                                         (first + B - 1) // self.n_pairs + 1)]
        self.consumed += B
        return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "dataset": self.data.fingerprint,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "dp_size": self.dp_size,
                "mask_special": self.mask_special}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at the saved position; the dataset, seed, seq_len and mask_special must match
        (ValueError naming the key and both values)."""
        self.consumed = restored_consumed(sd, self.state_dict(), ("dataset", "seed", "seq_len", "mask_special"))


class ScoredPairLoader(PairLoader):
    """Pairs for a reward model: a row as PairLoader's, plus where each response ends (``ends``
    [2]: the positions of the chosen and the rejected sequence's last token, where the score is
    read), the pair's ``margin`` (Llama 2's m(r) from its rating: margin "small" or "large"; the
    record's own: "record"; 0: "none") and its ``rating`` index (-1: none). Both sequences sit in
    the seq_len input positions whole."""

    room_extra = 0

    def __init__(self, data, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int = 0,
                 margin: str = "none", name: str = "data"):
        super().__init__(data, seq_len, global_batch_size, dp_rank, dp_size, seed=seed, name=name)
        n = self.n_pairs
        labels = self.labels if self.labels is not None else np.tile([-1.0, 0.0, -1.0, np.nan], (n, 1))
        self.rating = labels[:, 2].astype(np.int64)
        if margin == "none":
            self.margin = np.zeros(n)
        elif margin == "record":
            self.margin = labels[:, 3]
            missing = np.flatnonzero(np.isnan(self.margin))
            if len(missing):
                raise ValueError(f"{pair_origin(data, self.labels, int(missing[0]))}: no numeric 'margin' "
                                 f"(train.reward.margin=record reads each record's margin; {len(missing)} of {n} "
                                 "pairs have none)")
        else:
            missing = np.flatnonzero(self.rating < 0)
            if len(missing):
                raise ValueError(f"{pair_origin(data, self.labels, int(missing[0]))}: no 'rating' (train.reward."
                                 f"margin={margin} takes Llama 2's margin from each pair's rating; {len(missing)} "
                                 f"of {n} pairs have none)")
            self.margin = np.asarray(MARGINS[margin])[self.rating]

    def row(self, pair: int) -> dict[str, np.ndarray]:
        row = super().row(pair)
        c_len = int((row["doc_ids"] == CHOSEN).sum())
        r_len = int((row["doc_ids"] == REJECTED).sum())
        row["ends"] = np.array([c_len - 1, c_len + r_len - 1], dtype=np.int64)
        row["margin"] = np.float32(self.margin[pair])
        row["rating"] = np.int64(self.rating[pair])
        return row
