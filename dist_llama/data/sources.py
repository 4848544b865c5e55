"""Resolve a dataset argument (a prepared directory, or a builtin corpus name) to a TokenDataset.

Builtin corpora are prepared on first use into a cache directory; concurrent callers (several
ranks starting together) each prepare into their own temporary directory and rename it into place;
the first rename wins, the others discard their copy. No half-written directory is ever visible.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil

from .dataset import TokenDataset
from .prepare import commit_dir, make_temp_dir, write_dataset
from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["open_dataset", "BUILTIN_DATASETS", "default_cache_dir", "KJV_PATH"]

KJV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "kjv.jsonl.gz")
BUILTIN_DATASETS = {"kjv": KJV_PATH}


def default_cache_dir() -> str:
    """``$DIST_LLAMA_CACHE``, else ``~/.cache/dist_llama``."""
    return os.environ.get("DIST_LLAMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dist_llama")


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _read_jsonl_gz(path: str):
    with gzip.open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def _prepare_builtin(name: str, tok: Tokenizer, target: str) -> None:
    tmp = make_temp_dir(target)
    try:
        write_dataset(_read_jsonl_gz(BUILTIN_DATASETS[name]), tok, tmp, bos=tok.bos_id is not None,
                      sources=[BUILTIN_DATASETS[name]])
        if not commit_dir(tmp, target, replace=False):
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_dataset(path: str, tokenizer_spec: str | Tokenizer, cache_dir: str | None = None) -> TokenDataset:
    """Open a prepared dataset directory, or the builtin ``"kjv"`` corpus tokenized with
    ``tokenizer_spec`` (prepared on first use into
    ``<cache_dir or $DIST_LLAMA_CACHE or ~/.cache/dist_llama>/kjv-<tokenizer name>/``).

    The dataset's tokenizer must be the one ``tokenizer_spec`` builds, else ValueError.
    """
    tok = tokenizer_spec if isinstance(tokenizer_spec, Tokenizer) else build_tokenizer(tokenizer_spec)
    path = os.fspath(path)
    if path in BUILTIN_DATASETS and not os.path.isdir(path):
        target = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), f"{path}-{_sanitize(tok.name)}")
        if not os.path.isfile(os.path.join(target, "meta.json")):
            _prepare_builtin(path, tok, target)
    elif os.path.isdir(path):
        target = path
    else:
        raise ValueError(
            f"dataset {path!r}: not a prepared dataset directory (see dist-llama-prepare) nor a builtin "
            f"dataset ({', '.join(sorted(BUILTIN_DATASETS))})"
        )
    ds = TokenDataset.open(target)
    if ds.tokenizer_name != tok.name:
        raise ValueError(
            f"dataset {target} was tokenized with {ds.tokenizer_name!r} but the configured tokenizer "
            f"{tokenizer_spec if isinstance(tokenizer_spec, str) else tok!r} is {tok.name!r}"
        )
    return ds
