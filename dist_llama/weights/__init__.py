"""Weights in and out: open any checkpoint dist_llama can start from or export (a Hugging Face
directory, a Meta original directory, a dist_llama run or step directory), check it against a
model config, load it into model parts of any layout (load.py), export it (export.py).

`open_weights(path)` returns a WeightSource: `.args` (ModelArgs, the checkpoint's architecture),
`.tokenizer` (the tokenizer file or spec it was trained with, or None), `.names()`, `.shape(name)`,
and `.read(name, index=())` (a tensor, or a slice of one, in dist_llama's names and RoPE layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from dist_llama.weights.run_source import check_tensors, is_run_or_step, newest_checkpoint, open_run
from dist_llama.weights.sources import (DCPSource, DeepSpeedSource, HFSource, MetaSource, WeightsError,
                                        expected_shapes)

WeightSource = Union[HFSource, MetaSource, DCPSource, DeepSpeedSource]

__all__ = ["open_weights", "WeightSource", "WeightsError", "expected_shapes", "newest_checkpoint"]


def open_weights(path: Union[str, Path], max_seq_len: Optional[int] = None) -> WeightSource:
    """The weights at `path`, recognised by content. max_seq_len: for Meta directories, whose
    params.json does not record it (default: 8192)."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: no such directory")
    # Every source's tensors are checked against the architecture it states (config.json,
    # params.json, the checkpoint's manifest) before a value is read.
    if (path / "config.json").is_file():
        return check_tensors(HFSource(path), str(path / "config.json"))
    if (path / "params.json").is_file():
        return check_tensors(MetaSource(path, max_seq_len or 8192), str(path / "params.json"))
    if is_run_or_step(path):
        return open_run(path)  # the checkpoint's own architecture, every tensor checked against it
    raise WeightsError(f"{path}: not a Hugging Face directory (config.json), a Meta directory "
                       "(params.json) or a dist_llama run or checkpoint directory (manifest.json)")
