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

from dist_llama.weights.sources import (DCPSource, DeepSpeedSource, HFSource, MetaSource, WeightsError,
                                        expected_shapes)

WeightSource = Union[HFSource, MetaSource, DCPSource, DeepSpeedSource]

__all__ = ["open_weights", "WeightSource", "WeightsError", "expected_shapes", "newest_checkpoint"]


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest valid checkpoint of a run directory (the cheap check: manifest and sizes)."""
    from dist_llama.train.checkpoint_integrity import STEP_DIR, check_checkpoint

    root = Path(run_dir) / "checkpoints"
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    return next((p for p in reversed(steps) if check_checkpoint(p) is None), None)


def open_weights(path: Union[str, Path], max_seq_len: Optional[int] = None) -> WeightSource:
    """The weights at `path`, recognised by content. max_seq_len: for Meta directories, whose
    params.json does not record it (default: 8192)."""
    import yaml

    from dist_llama.train.checkpoint_integrity import MANIFEST, check_checkpoint, read_manifest

    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: no such directory")
    if (path / "config.json").is_file():
        return HFSource(path)
    if (path / "params.json").is_file():
        return MetaSource(path, max_seq_len or 8192)
    run_dir = None
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        run_dir, step_dir = path, newest_checkpoint(path)
        if step_dir is None:
            raise WeightsError(f"{path}: a run directory without a valid checkpoint")
    elif (path / MANIFEST).is_file():
        step_dir, run_dir = path, path.parent.parent
        reason = check_checkpoint(step_dir)
        if reason is not None:
            raise WeightsError(f"{step_dir}: not a valid checkpoint ({reason})")
    else:
        raise WeightsError(f"{path}: not a Hugging Face directory (config.json), a Meta directory "
                           "(params.json) or a dist_llama run or checkpoint directory (manifest.json)")
    state = read_manifest(step_dir).get("state", "dcp")
    if state not in ("dcp", "deepspeed"):
        raise WeightsError(f"{step_dir}: holds {state} state, which is not read as weights")
    config_file = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WeightsError(f"{config_file}: the run's config is needed for the architecture ({exc})") from None
    return DCPSource(step_dir, config) if state == "dcp" else DeepSpeedSource(step_dir, config)
