"""``dist-llama-prepare --skip-bad``: a chat or preference record that cannot be trained on (bad
JSON, wrong types, turns out of order, an empty or identical preference pair; see record_checks.py)
is left out instead of stopping the run, and listed in ``<out>/skipped.jsonl``, one
``{"file", "line", "reason"}`` object per record, in input order. Without the flag the first such
record stops prepare with exit 2, naming its file and line."""

from __future__ import annotations

import json
import os

import numpy as np

from .chat import encode_records
from .prepare_inputs import InputError
from .tokenizer import Tokenizer

__all__ = ["SKIPPED_FILE", "encode_or_skip", "write_skipped"]

SKIPPED_FILE = "skipped.jsonl"


def encode_or_skip(items, tokenizer: Tokenizer, fmt: str,
                   skip_bad: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple], list[dict]]:
    """encode_records of a batch's items; with skip_bad, record by record, the bad ones returned
    as {file, line, reason} instead of raised."""
    if not skip_bad:
        return (*encode_records(items, tokenizer, fmt), [])
    ids, masks, pairs, skipped = [], [], [], []
    for item in items:
        try:
            more_ids, more_masks, more_pairs = encode_records([item], tokenizer, fmt)
        except InputError as exc:
            path, line = item[1], item[2]
            reason = str(exc).removeprefix(f"{path}:{line}: ").removeprefix(f"{path}: ")
            skipped.append({"file": path, "line": line, "reason": reason})
            continue
        ids += more_ids
        masks += more_masks
        pairs += more_pairs
    return ids, masks, pairs, skipped


def write_skipped(out_dir: str, skipped: list[dict]) -> None:
    """The skipped records' list, in the dataset directory (written only when something was skipped)."""
    if not skipped:
        return
    with open(os.path.join(out_dir, SKIPPED_FILE), "w") as f:
        for entry in skipped:
            f.write(json.dumps(entry) + "\n")
