"""Packed sequences from a weighted mixture of token sources, in curriculum stages, and the
stateful data-parallel sampler.

A source's token stream is cut into fixed windows: window ``i`` covers tokens
``[i*seq_len, i*seq_len + seq_len + 1)``; inputs are its first ``seq_len`` tokens, labels its last
``seq_len``. Windows ignore document boundaries; ``doc_ids`` (and ``positions`` when
``reset_positions``) let the model mask attention to the document and restart RoPE positions.

Order, a pure function of (seed, position):
- Stages: stage ``t`` (seq_len, global batch, source weights) is in effect from the step that starts
  at or after the previous stage's ``until_tokens`` (counted in input tokens) to its own.
- Global sample ``j`` of a stage comes from the source picked by a uniform draw of (seed, stage, j)
  against the stage's weights. Its index ``k`` within that source is the number of earlier samples
  of the stage from the same source; window ``perm(k mod n_windows)`` of epoch ``k // n_windows``,
  where perm is a keyed pseudo-random permutation of (seed, source, stage, epoch) computed per index
  (permutation.py), never materialised. A source that runs out starts a new epoch of itself.
- Global step ``s`` of a stage takes its samples ``[s*B, (s+1)*B)``; data-parallel rank ``r`` takes
  rows ``[r*B/dp, (r+1)*B/dp)`` of them.

State: position in samples and tokens, the current stage, per-source counts. Every rank computes
the whole global batch's source assignment (B draws), so resuming is exact and reshards exactly:
a checkpoint saved with one data-parallel degree resumes with another (same stages) on the same
samples. Memory and start-up time do not depend on the corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from .permutation import KeyedPermutation, mix_key, uniform

__all__ = ["BatchLoader", "PackedLoader", "Source", "Stage", "TokenSource", "pack_windows"]


class BatchLoader(Protocol):
    """What the training loop draws batches from (PackedLoader: packed windows; PairLoader: one
    preference pair per row; an objective's own). Its state is its position: a resume, under any
    data-parallel degree, continues from it exactly."""

    seq_len: int
    """The sequence length of the next batch (a curriculum stage may change it)."""
    global_batch_size: int
    """Rows of the next global batch."""
    tokens_by_source: dict[str, int]
    """Input tokens drawn from each source so far."""
    new_epochs: list[tuple[str, int]]
    """(source, epoch) of the epochs the last batch started."""

    def next_batch(self) -> dict:
        """This rank's rows of the next global batch: int64 tensors [rows, seq_len] of tokens,
        labels (-100: not counted), doc_ids and positions (and what the objective adds)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at the saved position; ValueError when the saved state is another data's."""


class TokenSource(Protocol):
    """What the loader reads from (a prepared TokenDataset, or your own storage)."""

    fingerprint: str
    """Identifies the content: a resume checks it."""
    kind: str
    """What dist-llama-prepare --format made it: text, chat (with a loss mask) or preference
    (chat documents in (chosen, rejected) pairs); sources without the attribute are text."""

    def __len__(self) -> int:
        """Tokens in the stream."""

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as an int64 array."""

    def doc_starts_in(self, start: int, stop: int) -> np.ndarray:
        """Sorted int64 start offsets of the documents overlapping [start, stop) (the first one <= start)."""

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """Chat and preference data only (what PackedLoader(loss_mask=True) and PairLoader read):
        uint8 per token of [start, stop), data.chat's PROMPT (0: not trained), RESPONSE or END."""


@dataclass
class Source:
    name: str
    data: TokenSource
    weight: float = 1.0


@dataclass
class Stage:
    seq_len: int
    global_batch_size: int
    weights: dict[str, float]
    until_tokens: Optional[int] = None
    """Input tokens (all stages so far) at which the next stage takes over; None: to the end."""


@dataclass
class _Position:
    samples: int = 0
    """Global samples consumed, all stages."""
    tokens: int = 0
    """Input tokens consumed, all stages."""
    stage: int = 0
    stage_samples: int = 0
    """Global samples consumed in the current stage."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Samples drawn from each source in the current stage."""
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    """Input tokens from each source, all stages."""


def normalised(weights) -> np.ndarray:
    """Weights as shares summing to 1. Finite weights can still overflow their sum (1e308 + 1e308
    is inf, and every share 0 would draw only the last source): then they are scaled by the largest first."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(over="ignore"):
        total = w.sum()
    if not np.isfinite(total):
        w = w / w.max()
        total = w.sum()
    return w / total


class PackedLoader:
    def __init__(self, sources, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int = 0, reset_positions: bool = True, stages: Optional[Sequence[Stage]] = None,
                 loss_mask: bool = False):
        """sources: a list of Source, or one TokenSource (a single source named "data").
        stages: the curriculum; None: one stage of (seq_len, global_batch_size, the sources' weights).
        loss_mask: labels of tokens the sources' loss mask marks 0 (prompts) become -100 (SFT)."""
        if not isinstance(sources, (list, tuple)):
            sources = [Source("data", sources)]
        self.sources = list(sources)
        self.by_name = {s.name: s for s in self.sources}
        if len(self.by_name) != len(self.sources):
            raise ValueError(f"source names must be unique, got {[s.name for s in self.sources]}")
        self.stages = list(stages) if stages else [
            Stage(seq_len, global_batch_size, {s.name: s.weight for s in self.sources})]
        for name, v, lo in (("dp_size", dp_size, 1), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        for i, stage in enumerate(self.stages):
            self._check_stage(i, stage, dp_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.reset_positions = bool(reset_positions)
        self.loss_mask = bool(loss_mask)
        self.pos = _Position(per_source={s.name: 0 for s in self.sources},
                             tokens_by_source={s.name: 0 for s in self.sources})
        self.new_epochs: list[tuple[str, int]] = []
        """(source, epoch) of every epoch the last batch started, for the caller to report."""
        self._perms: dict[tuple, KeyedPermutation] = {}

    def _check_stage(self, i: int, stage: Stage, dp_size: int) -> None:
        where = f"stage {i}" if len(self.stages) > 1 else "this loader"
        for name in ("seq_len", "global_batch_size"):
            v = getattr(stage, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {name} must be an integer >= 1, got {v!r}")
        if stage.global_batch_size % dp_size:
            raise ValueError(f"{where}: global_batch_size {stage.global_batch_size} is not divisible by "
                             f"dp_size {dp_size}")
        unknown = set(stage.weights) - set(self.by_name)
        if unknown or not stage.weights or any(w < 0 for w in stage.weights.values()) \
                or sum(stage.weights.values()) <= 0:
            raise ValueError(f"{where}: weights must be non-negative, sum above 0 and name sources "
                             f"({', '.join(self.by_name)}); got {stage.weights}")
        for name, w in stage.weights.items():
            if w > 0 and self.num_windows_for(self.by_name[name].data, stage.seq_len) < 1:
                raise ValueError(f"{where}: source {name!r} ({len(self.by_name[name].data)} tokens) has no "
                                 f"window of seq_len+1 = {stage.seq_len + 1} tokens")
        if len(self.sources) == 1 and len(self.stages) == 1:
            n = self.num_windows_for(self.sources[0].data, stage.seq_len)
            if n < stage.global_batch_size:  # one source: every step would repeat samples
                raise ValueError(
                    f"seq_len {stage.seq_len} is too long for this dataset: {len(self.sources[0].data)} tokens "
                    f"make {n} windows of seq_len+1 tokens, fewer than global_batch_size "
                    f"{stage.global_batch_size} (largest seq_len allowed: "
                    f"{self.max_seq_len_for(self.sources[0].data, stage.global_batch_size)})")

    # --- helpers for config validation (no loader needed) ------------------------------------
    @staticmethod
    def num_windows_for(n_tokens, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) in ``n_tokens`` tokens (or a source)."""
        n_tokens = n_tokens if isinstance(n_tokens, (int, np.integer)) else len(n_tokens)
        return max(0, (int(n_tokens) - 1) // int(seq_len))

    @staticmethod
    def max_seq_len_for(n_tokens, global_batch_size: int) -> int:
        """Largest seq_len giving at least ``global_batch_size`` windows (0 if none does)."""
        n_tokens = n_tokens if isinstance(n_tokens, (int, np.integer)) else len(n_tokens)
        return max(0, (int(n_tokens) - 1) // int(global_batch_size))

    # --- where we are ------------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        """The stage of the next step."""
        return self.stages[self.pos.stage]

    @property
    def seq_len(self) -> int:
        return self.stage.seq_len

    @property
    def global_batch_size(self) -> int:
        return self.stage.global_batch_size

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def consumed(self) -> int:
        return self.pos.samples

    @property
    def tokens_by_source(self) -> dict[str, int]:
        return dict(self.pos.tokens_by_source)

    def _advance_stage(self) -> None:
        """Move to the stage in effect for a step starting at the current token count."""
        while (self.pos.stage + 1 < len(self.stages) and self.stage.until_tokens is not None
               and self.pos.tokens >= self.stage.until_tokens):
            self.pos.stage += 1
            self.pos.stage_samples = 0
            self.pos.per_source = {s.name: 0 for s in self.sources}

    def _perm(self, source: int, n: int, epoch: int) -> KeyedPermutation:
        key = (source, self.pos.stage, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            perm = self._perms[key] = KeyedPermutation(n, mix_key(self.seed, *key))
        return perm

    def _assign(self, start: int, stop: int) -> np.ndarray:
        """The source index of each of this stage's global samples [start, stop)."""
        names = [s.name for s in self.sources]
        bounds = np.cumsum(normalised([self.stage.weights.get(n, 0.0) for n in names]))
        u = uniform(mix_key(self.seed, self.pos.stage, 0x50), np.arange(start, stop, dtype=np.int64))
        return np.minimum(np.searchsorted(bounds, u, side="right"), len(names) - 1)

    # --- batches -----------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """This rank's rows of the next global batch: int64 tensors ``[local, seq_len]`` of
        ``tokens``, ``labels``, ``doc_ids`` (document of each token, numbered from 0 in each row) and ``positions``
        (restarting at the window start and at each document start; 0..seq_len-1 without
        reset_positions)."""
        self._advance_stage()
        L, B = self.seq_len, self.global_batch_size
        start = self.pos.stage_samples
        which = self._assign(start, start + B)
        # Index of each sample within its source: the source's count so far plus its rank in the batch.
        index = np.empty(B, dtype=np.int64)
        self.new_epochs = []
        for s, source in enumerate(self.sources):
            rows = np.flatnonzero(which == s)
            before = self.pos.per_source[source.name]
            index[rows] = before + np.arange(len(rows))
            n = self.num_windows_for(source.data, L)
            if len(rows):  # epochs (after the first) whose first sample is in this batch
                self.new_epochs += [(source.name, e) for e in range(max(1, -(-before // n)),
                                                                     (before + len(rows) - 1) // n + 1)]
            self.pos.per_source[source.name] = before + len(rows)
            self.pos.tokens_by_source[source.name] += len(rows) * L
        lo = self.dp_rank * self.local_batch_size
        windows = []
        for s, k in zip(which[lo:lo + self.local_batch_size], index[lo:lo + self.local_batch_size]):
            data = self.sources[s].data
            n = self.num_windows_for(data, L)
            windows.append((data, int(self._perm(int(s), n, int(k) // n)(int(k) % n)[0]) * L))
        self.pos.samples += B
        self.pos.stage_samples += B
        self.pos.tokens += B * L
        return pack_windows(windows, L, self.reset_positions, self.loss_mask)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- state --------------------------------------------------------------------------------
    def _plan(self) -> list[list]:
        return [[st.seq_len, st.global_batch_size, st.until_tokens, sorted(st.weights.items())]
                for st in self.stages[:self.pos.stage + 1]]

    def state_dict(self) -> dict[str, Any]:
        p = self.pos
        return {
            "consumed": int(p.samples), "tokens": int(p.tokens), "stage": int(p.stage),
            "stage_samples": int(p.stage_samples), "per_source": dict(p.per_source),
            "tokens_by_source": dict(p.tokens_by_source), "seed": self.seed,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "dp_size": self.dp_size,
            "dataset": "|".join(f"{s.name}={s.data.fingerprint}" for s in self.sources)
            if len(self.sources) > 1 else self.sources[0].data.fingerprint,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at the saved position. The sources, the seed and the current stage's seq_len must
        match (ValueError naming the key and both values); the data-parallel degree may differ."""
        mine = self.state_dict()
        consumed = sd.get("consumed")
        if not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise ValueError(f"data loader state has a bad 'consumed' value: {consumed!r}")
        for key in ("dataset", "seed"):
            if key not in sd:
                raise ValueError(f"data loader state has no {key!r}")
            if sd[key] != mine[key]:
                raise ValueError(f"data loader state mismatch on {key!r}: checkpoint has {sd[key]!r}, "
                                 f"current run has {mine[key]!r}")
        if "stage" not in sd:  # a single-stage state: position in samples only
            sd = {**sd, "tokens": consumed * sd["seq_len"], "stage": 0, "stage_samples": consumed,
                  "per_source": {self.sources[0].name: consumed},
                  "tokens_by_source": {self.sources[0].name: consumed * sd["seq_len"]}}
        if not 0 <= sd["stage"] < len(self.stages):
            raise ValueError(f"data loader state is in stage {sd['stage']}, this run has {len(self.stages)} stages")
        if sd["seq_len"] != self.stages[sd["stage"]].seq_len:
            raise ValueError(f"data loader state mismatch on 'seq_len': checkpoint has {sd['seq_len']!r}, "
                             f"current run has {self.stages[sd['stage']].seq_len!r}")
        self.pos = _Position(int(consumed), int(sd["tokens"]), int(sd["stage"]), int(sd["stage_samples"]),
                             {s.name: int(sd["per_source"].get(s.name, 0)) for s in self.sources},
                             {s.name: int(sd["tokens_by_source"].get(s.name, 0)) for s in self.sources})

    @property
    def epoch(self) -> int:
        """Epoch of the next sample of the first source (single-source loaders)."""
        return self.pos.per_source[self.sources[0].name] // self.num_windows_for(self.sources[0].data, self.seq_len)


def pack_windows(windows: Sequence[tuple[TokenSource, int]], seq_len: int, reset_positions: bool,
                 loss_mask: bool = False) -> dict:
    """Rows of a batch from (source, first token) windows of ``seq_len + 1`` tokens: int64 tensors
    ``[rows, seq_len]`` of tokens, labels, doc_ids and positions (see PackedLoader.next_batch).
    loss_mask: a label whose token the source's mask marks 0 is IGNORE_INDEX (-100)."""
    import torch

    L = seq_len
    tokens = np.empty((len(windows), L + 1), dtype=np.int64)
    labels = np.empty((len(windows), L), dtype=np.int64)
    doc_ids = np.empty((len(windows), L), dtype=np.int64)
    positions = np.empty((len(windows), L), dtype=np.int64)
    ar = np.arange(L, dtype=np.int64)
    for row, (data, first) in enumerate(windows):
        tokens[row] = data.tokens(first, first + L + 1)
        if loss_mask:  # the label of position t is token t+1: its mask decides
            labels[row] = np.where(data.loss_mask(first + 1, first + L + 1) > 0, tokens[row, 1:], -100)
        else:
            labels[row] = tokens[row, 1:]
        starts = np.asarray(data.doc_starts_in(first, first + L))
        ids = np.searchsorted(starts, first + ar, side="right") - 1
        doc_ids[row] = ids
        # Positions count from the window start or the document start, whichever is later, so
        # they stay below seq_len (a long document's tail is a fresh sequence to the model).
        positions[row] = (first + ar - np.maximum(starts[ids], first)) if reset_positions else ar
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(labels),
        "doc_ids": torch.from_numpy(doc_ids),
        "positions": torch.from_numpy(positions),
    }
