"""A dist_llama run or step directory as a weight source (export, generate, init_from).

The architecture is the checkpoint's own: the manifest's "model" (written at every save), else the
trainer state's (checkpoints saved before the manifest carried it), else, for the oldest, the run's
config.yaml. Whichever it is, every tensor's name and shape is checked against it before any value is
read: a config.yaml rewritten by a later run of another model must not make an export of 2 layers
out of a checkpoint of 4, with exit 0.

While a source is open it holds its checkpoint (checkpoint_files.ReadHold): the run, if it is still
training, does not delete that checkpoint at retention until the reader is done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dist_llama.checkpoint_format.files import ReadHold
from dist_llama.checkpoint_format.integrity import (MANIFEST, STATE_FILE, STEP_DIR, check_checkpoint, read_listed,
                                                   read_manifest)
from dist_llama.weights.sources import DCPSource, DeepSpeedSource, WeightsError, tensor_problem


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest valid checkpoint of a run directory (the cheap check: manifest and sizes)."""
    root = Path(run_dir) / "checkpoints"
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    return next((p for p in reversed(steps) if check_checkpoint(p) is None), None)


def is_run_or_step(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() or (path / MANIFEST).is_file()


def open_run(path: Path):
    """The source of `path`, a run directory (its newest valid checkpoint) or a step directory,
    holding that checkpoint while it is open. WeightsError for anything it cannot take."""
    for _ in range(5):  # the newest one may be deleted by retention between the pick and the hold
        step_dir, run_dir = _pick(path)
        try:
            hold = ReadHold(step_dir)
        except FileNotFoundError:
            continue
        source = _open_step(step_dir, run_dir)
        source.hold = hold
        return source
    raise WeightsError(f"{path}: its checkpoints kept being removed while being opened")


def _pick(path: Path) -> tuple[Path, Path]:
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        step_dir = newest_checkpoint(path)
        if step_dir is None:
            raise WeightsError(f"{path}: a run directory without a valid checkpoint")
        return step_dir, path
    reason = check_checkpoint(path)
    if reason is not None:
        raise WeightsError(f"{path}: not a valid checkpoint ({reason})")
    return path, path.parent.parent


def _open_step(step_dir: Path, run_dir: Path):
    import yaml

    manifest = read_manifest(step_dir)
    state = manifest.get("state", "dcp")
    if state not in ("dcp", "deepspeed"):
        raise WeightsError(f"{step_dir}: holds {state} state, which is not read as weights")
    model, where = recorded_model(step_dir, manifest)
    config_file = run_dir / "config.yaml"
    try:  # is_file: a regular file, not a FIFO to block on
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else "not a regular file"
    except (OSError, yaml.YAMLError) as exc:
        config = exc
    if not isinstance(config, dict):
        if model is None:
            raise WeightsError(f"{config_file}: the run's config is needed for the architecture ({config})")
        config = {}  # it only gives the tokenizer and max_seq_len once the checkpoint has the model
    if model is not None:
        config = {**config, "model": {**(config.get("model") or {}), **model}}
    source = DCPSource(step_dir, config) if state == "dcp" else DeepSpeedSource(step_dir, config)
    check_tensors(source, where if model is not None else str(config_file))
    return source


def recorded_model(step_dir: Path, manifest: dict) -> tuple[Optional[dict], str]:
    """The model arguments the checkpoint records, and where: the manifest, else the trainer state."""
    if isinstance(manifest.get("model"), dict):
        return manifest["model"], str(step_dir / MANIFEST)
    try:
        model = json.loads(read_listed(step_dir, STATE_FILE, manifest)).get("model")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        model = None
    return (model, str(step_dir / STATE_FILE)) if isinstance(model, dict) else (None, "")


def check_tensors(source, where: str):
    """`source`, once it is known to hold exactly the parameters, with their shapes, of the model its
    arguments (read from `where`) describe (WeightsError naming the first tensor that differs)."""
    problem = tensor_problem(source, source.args)
    if problem is not None:
        raise WeightsError(f"{problem} (the model as {where} describes it: n_layers={source.args.n_layers})")
    return source
