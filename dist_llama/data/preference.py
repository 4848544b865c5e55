"""Preference records (``dist-llama-prepare --format preference``) and what each pair carries
besides its two responses.

A record is ``{"prompt": [messages], "chosen": str, "rejected": str}``, optionally with Llama 2's
annotator ``rating`` (how much better the chosen response is: one of RATINGS) or a numeric
``margin``; or Llama 3's ranked row ``{"prompt": [...], "responses": [best, ..., worst]}`` (edited >
chosen > rejected), which gives every ordered pair of its responses. Each pair is stored as two
adjacent documents (prompt + better, prompt + worse: data/pairs.py), and its labels as one row of
``pairs.npy`` (float64 [n_pairs, 4]): the index of its input file in the dataset's ``pair_files``,
its line there, its rating's index in RATINGS (-1: none) and its margin (NaN: none). Reward-model
training reads the margins (Llama 2's m(r)) and reports accuracy per rating; every error about a
pair names its file and line.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RATINGS", "RATING_KEYS", "MARGINS", "PAIRS_FILE", "record_pairs", "rating_index"]

RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")
"""Llama 2's four preference levels, strongest first (the rating's index is stored)."""
RATING_KEYS = ("significantly_better", "better", "slightly_better", "negligibly_better")
"""The levels as metric names (accuracy/<key>)."""
_ALIASES = {"negligibly better": 3, "unsure": 3}
MARGINS = {"small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}
"""Llama 2's margin m(r) per rating (Table 27): the small and the large variant."""
PAIRS_FILE = "pairs.npy"


def rating_index(value) -> int:
    """The index in RATINGS of a record's rating (ValueError listing the allowed ones)."""
    if isinstance(value, str):
        key = " ".join(value.lower().split())
        if key in RATINGS:
            return RATINGS.index(key)
        if key in _ALIASES:
            return _ALIASES[key]
    raise ValueError(f"unknown rating {value!r} (allowed: {', '.join(repr(r) for r in RATINGS)})")


def _response(value, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty: a preference pair needs two responses")
    return value


def record_pairs(obj: dict) -> list[tuple[str, str, int, float]]:
    """(better, worse, rating index or -1, margin or NaN) of every pair a record gives (ValueError
    naming what is wrong)."""
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            n = len(responses) if isinstance(responses, list) else type(responses).__name__
            raise ValueError(f"'responses' must list at least two responses, best first; got {n}")
        if "chosen" in obj or "rejected" in obj:
            raise ValueError("a record has either 'responses' (a ranked row) or 'chosen' and 'rejected', not both")
        texts = [_response(r, f"responses[{i}]") for i, r in enumerate(responses)]
        if len({t.strip() for t in texts}) < len(texts):
            raise ValueError("'responses' holds the same response twice: the ranking prefers nothing between them")
        pairs = [(texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    else:
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise ValueError(f"no key {key!r} (a preference record is {{prompt: [messages], chosen: str, "
                                 "rejected: str}, or {prompt, responses: [best, ..., worst]})")
        pairs = [(_response(obj["chosen"], "chosen"), _response(obj["rejected"], "rejected"))]
        if pairs[0][0].strip() == pairs[0][1].strip():
            raise ValueError("'chosen' and 'rejected' are the same response: the pair prefers nothing")
    rating = rating_index(obj["rating"]) if obj.get("rating") is not None else -1
    margin = obj.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise ValueError(f"'margin' must be a finite number, got {margin!r}")
    return [(better, worse, rating, float("nan") if margin is None else float(margin)) for better, worse in pairs]


def pair_table(rows: list[tuple[int, int, int, float]]) -> np.ndarray:
    """pairs.npy's array of (file index, line, rating index, margin) rows."""
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 4)


def pair_labels(data) -> "np.ndarray | None":
    """A preference dataset's pairs.npy (see the module docstring), or None when it was prepared
    before pairs carried labels. ValueError naming the file when it does not match the dataset."""
    import os

    entry = data.meta.get("pairs")
    if entry is None:
        return None
    path = os.path.join(data.path, PAIRS_FILE)
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if table.dtype != np.float64 or table.shape != (data.n_docs // 2, 4):
        raise ValueError(f"{path}: expected float64 [{data.n_docs // 2}, 4] (one row per pair), got "
                         f"{table.dtype} {list(table.shape)}")
    return table


def pair_origin(data, labels: "np.ndarray | None", pair: int) -> str:
    """'file:line' of a pair's record, or 'pair <k> of <dataset>' when the dataset does not say."""
    files = (data.meta.get("pairs") or {}).get("files") or []
    if labels is not None and 0 <= int(labels[pair, 0]) < len(files):
        return f"{files[int(labels[pair, 0])]}:{int(labels[pair, 1])}"
    return f"preference pair {pair} of {data.path}"
