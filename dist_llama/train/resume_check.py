"""What a run directory's checkpoints say about a new start, checked before any process group exists
and before anything is written (config.yaml included): exit 2 instead of a traceback, a silent
restart from step 0, or a resumed run that quietly trains another model.

- The newest checkpoint whose manifest is complete must hold the same model
  (every architecture field), seed and current-stage sequence length as the config: a mismatch names
  the key and both values.
- checkpoint.resume=false in a directory that holds checkpoints is refused: retention and resume would
  mix the old run's checkpoints with the new run's.
- checkpoint.enabled=false there still needs the same model: the run rewrites config.yaml, which
  must not describe a model the checkpoints do not hold.
- Checkpoints whose manifests all fail stop the job: starting over would overwrite them. Every rank
  runs this before any process group, so it reads manifests only (the files are checked at resume,
  a share per rank: Checkpointer.latest).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from dist_llama.config import Config, ConfigError
from dist_llama.config.data_plan import stages_of
from dist_llama.checkpoint_format.integrity import STATE_FILE, STEP_DIR, manifest_problem, read_listed, read_manifest
from dist_llama.train.reference_record import check_reference

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scale_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_old_context_len")
"""ModelArgs fields a checkpoint's weights depend on."""


def model_record(cfg: Config) -> dict:
    """What a checkpoint records of the model it holds (trainer_state.json and manifest.json "model"):
    the fields resume compares, and those a weight reader needs besides (the context the model was
    trained for, what export writes as max_position_embeddings)."""
    args = dataclasses.asdict(cfg.model)
    return {k: args[k] for k in (*MODEL_FIELDS, "max_seq_len", "context_len") if k in args}


def check_run_dir(cfg: Config) -> None:
    """Raise ConfigError if starting `cfg` in its run directory would lose or mix up saved work."""
    root = Path(cfg.train.run_dir) / "checkpoints"
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    if not steps:
        return
    if not cfg.checkpoint.enabled:
        # Nothing is saved or resumed, but config.yaml is rewritten: it must still describe the
        # model the directory's checkpoints hold (older checkpoints' readers fall back to it).
        newest = next((p for p in reversed(steps) if manifest_problem(p) is None), None)
        if newest is not None:
            _compare_model(cfg, newest, _saved_state(newest))
        return
    if not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume", f"false, but {root} holds checkpoints (newest {steps[-1].name}): "
                          "a new run there would mix with them; use another train.run_dir or remove them")
    reasons: dict[str, str] = {}
    for p in reversed(steps):  # newest first; stop at the first complete one
        reason = manifest_problem(p)
        if reason is None:
            _compare(cfg, p)
            return check_reference(cfg)  # DPO: the reference the resumed run trains against
        reasons[p.name] = reason
    first = next(iter(reasons.items()))
    raise ConfigError("train.run_dir", f"{root} holds {len(steps)} checkpoints and none is valid "
                          f"({first[0]}: {first[1]}); starting over would overwrite them: move them away to "
                          "start over, or restore one")


def _saved_state(step_dir: Path) -> dict:
    """The checkpoint's trainer state ({} when unreadable: the deep check at resume reports it)."""
    try:
        state = json.loads(read_listed(step_dir, STATE_FILE, read_manifest(step_dir)))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return state if isinstance(state, dict) else {}


def _compare_model(cfg: Config, step_dir: Path, state: dict) -> None:
    saved: Optional[dict] = state.get("model")
    if isinstance(saved, dict):
        ours = model_record(cfg)
        for key in MODEL_FIELDS:
            if key in saved and saved[key] != ours[key]:
                raise ConfigError(f"model.{key}", f"checkpoint {step_dir.name} has {saved[key]}, config has "
                                  f"{ours[key]} (resume needs the same model; use another train.run_dir)")


def _compare(cfg: Config, step_dir: Path) -> None:
    state = _saved_state(step_dir)
    _compare_model(cfg, step_dir, state)
    data = state.get("data") or {}
    if "seed" in data and data["seed"] != cfg.train.seed:
        raise ConfigError("train.seed", f"checkpoint {step_dir.name} has {data['seed']}, config has {cfg.train.seed}")
    stages = stages_of(cfg)
    stage = data.get("stage", 0)
    if "seq_len" in data and stage < len(stages) and data["seq_len"] != stages[stage].seq_len:
        key = f"data.stages[{stage}].seq_len" if cfg.data.stages else "data.seq_len"
        raise ConfigError(key, f"checkpoint {step_dir.name} has {data['seq_len']}, config has {stages[stage].seq_len}")
