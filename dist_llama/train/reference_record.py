"""What DPO's reference model was, recorded in the run directory (`<run_dir>/dpo_reference.json`).

The reference is the starting weights (checkpoint.init_from, or the seed's initialisation), and it
is not in the checkpoints: every restart rebuilds it from init_from (train.dpo.reference=model), or
recomputes the precomputed table from it when the table is gone. Weights swapped at that path
between restarts would silently give the resumed run another reference. So the first start
records the reference's identity: the sha256 of every file the weights are read from (a Hugging
Face or Meta directory's weight and config files; a dist_llama checkpoint's manifest, which lists
its files' digests), with each file's size and mtime so that a restart whose files are untouched
hashes nothing. A resume (a checkpoint to resume exists) whose reference differs is refused before
any process group: exit 2, naming this file and both identities.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from dist_llama.config import Config, ConfigError
from dist_llama.config.objectives import objective_spec
from dist_llama.checkpoint_format.integrity import MANIFEST, sha256_file

FILE = "dpo_reference.json"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
CONFIG_FILES = ("config.json", "params.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _source_files(root: Path) -> list[Path]:
    """The files the starting weights are read from."""
    if (root / "config.json").is_file() or (root / "params.json").is_file():
        return sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_FILES))
    if (root / MANIFEST).is_file():
        return [root / MANIFEST]
    from dist_llama.weights import newest_checkpoint

    step = newest_checkpoint(root)
    return [step / MANIFEST] if step is not None else []


def identity(cfg: Config, known: Optional[dict] = None) -> dict:
    """The reference's identity; `known` (a recorded identity) spares hashing files whose size and
    mtime are unchanged."""
    if not cfg.checkpoint.init_from:
        return {"init_from": None, "seed": cfg.train.seed}
    root = Path(cfg.checkpoint.init_from)
    before = (known or {}).get("files", {})
    files = {}
    for path in _source_files(root):
        rel, st = str(path.relative_to(root)), path.stat()
        old = before.get(rel)
        same = old is not None and old[:2] == [st.st_size, st.st_mtime_ns]
        files[rel] = old if same else [st.st_size, st.st_mtime_ns, sha256_file(path)]
    return {"init_from": str(root), "files": files}


def _summary(ident: dict) -> str:
    if ident.get("init_from") is None:
        return f"the initialisation of train.seed={ident.get('seed')}"
    digests = sorted((rel, v[2]) for rel, v in ident.get("files", {}).items())
    return f"{ident['init_from']} (sha256 {hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]})"


def _content(ident: dict):
    if ident.get("init_from") is None:
        return ("seed", ident.get("seed"))
    return ("files", sorted((rel, v[2]) for rel, v in ident.get("files", {}).items()))


def _read(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / FILE).read_text())
    except (OSError, ValueError):
        return None


def check_reference(cfg: Config) -> None:
    """Before a resume of a DPO run: ConfigError if the reference would differ from the recorded one."""
    if not objective_spec(cfg.train.objective).starting_reference:
        return
    run_dir = Path(cfg.train.run_dir)
    recorded = _read(run_dir)
    if not isinstance(recorded, dict):
        return  # a run started before this record existed: recorded at this start
    ours = identity(cfg, recorded)
    if _content(ours) != _content(recorded):
        raise ConfigError("checkpoint.init_from", f"{run_dir / FILE}: this run's DPO reference was "
                          f"{_summary(recorded)}, the starting weights now are {_summary(ours)}; resuming would "
                          "train against another reference: restore those weights, or start in another train.run_dir")


def record_reference(cfg: Config) -> None:
    """Rank 0, under the run lock, before any process group: write (or refresh) the record."""
    if not objective_spec(cfg.train.objective).starting_reference:
        return
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ident = identity(cfg, _read(run_dir))
    tmp = run_dir / f".{FILE}.tmp"
    tmp.write_text(json.dumps(ident, indent=1) + "\n")
    os.replace(tmp, run_dir / FILE)
