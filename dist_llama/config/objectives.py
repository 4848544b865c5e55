"""The training objectives (train.objective), in one torch-free registry: what data each reads, how
its settings are validated, and where its implementation lives. The only place that compares an
objective's name; the trainer builds the implementation with `dist_llama.train.objectives`.

Adding an objective: its module in `train/objectives/` (an `Objective`, see base.py there) and one
line in OBJECTIVES; settings of its own go in a nested section of TrainConfig (`train.<name>.*`),
checked by the `validate` its spec names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from dist_llama.config.errors import ConfigError

DPO_REFERENCES = ("model", "precomputed")
"""Where DPO's reference log-probabilities come from (train.dpo.reference)."""
REWARD_MARGINS = ("none", "small", "large", "record")
"""The reward model's ranking-loss margin (train.reward.margin)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the configuration needs to know of an objective, without importing it."""

    name: str
    """The train.objective value."""
    implementation: str
    """module:Class of its Objective (imported only when training is built)."""
    data_kind: Optional[str]
    """The dist-llama-prepare --format its data needs (chat, preference), or None for any."""
    packs_windows: bool = True
    """Whether it packs documents into seq_len windows (and can hold out data for validation)."""
    starting_reference: bool = False
    """Whether it trains against the starting weights (a frozen reference not in the checkpoints):
    their identity is recorded in the run directory and a resume with other ones is refused."""
    score_head: bool = False
    """Whether its model is a reward model: a scalar `score` head in place of the output projection."""
    validate: Optional[Callable] = None
    """validate(cfg, parallel): ConfigError naming the key of a setting it cannot run with."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _validate_pairs(cfg, p, held_out: bool) -> None:
    """What every objective on preference pairs needs: one dataset, each pair whole on one rank."""
    t, d, name = cfg.train, cfg.data, cfg.train.objective
    # A pair's two sequences are scored together on one rank: a pipeline would have to carry the
    # pair's statistics through its schedule, and context parallelism would cut the sequences.
    for key in ("pp", "cp"):
        _require(getattr(p, key) == 1, f"parallel.{key}", f"must be 1 with train.objective={name} (a preference "
                 f"pair is scored whole on one rank); got {getattr(p, key)}")
    _require(not d.sources and not d.stages and not d.anneal_weights, "data.sources",
             f"train.objective={name} reads one preference dataset (data.path): no sources or stages")
    if not held_out:
        _require(not d.eval_sources, "data.eval_sources", f"train.objective={name} has no validation on held-out pairs")
        _require(t.eval_interval == 0, "train.eval_interval",
                 f"must be 0 with train.objective={name} (no held-out preference pairs), got {t.eval_interval}")
        return
    _require(len(d.eval_sources or []) <= 1, "data.eval_sources",
             f"train.objective={name} validates on one held-out preference dataset")
    _require(t.eval_interval == 0 or bool(d.eval_sources), "train.eval_interval",
             f"train.objective={name} validates on held-out pairs: set data.eval_sources to one preference "
             "dataset (dist-llama-prepare --format preference), or train.eval_interval=0")


def _validate_dpo(cfg, p) -> None:
    dpo = cfg.train.dpo
    _require(dpo.beta > 0, "train.dpo.beta", f"must be positive, got {dpo.beta}")
    _require(dpo.nll_coef >= 0, "train.dpo.nll_coef", f"must be >= 0, got {dpo.nll_coef}")
    _require(dpo.reference in DPO_REFERENCES, "train.dpo.reference",
             f"must be one of {', '.join(DPO_REFERENCES)}; got {dpo.reference!r}")
    _validate_pairs(cfg, p, held_out=False)


def _validate_reward(cfg, p) -> None:
    margin = cfg.train.reward.margin
    _require(margin in REWARD_MARGINS, "train.reward.margin",
             f"must be one of {', '.join(REWARD_MARGINS)}; got {margin!r}")
    _validate_pairs(cfg, p, held_out=True)


OBJECTIVES = {
    "pretrain": ObjectiveSpec("pretrain", "dist_llama.train.objectives.pretrain:Pretrain", None),
    "sft": ObjectiveSpec("sft", "dist_llama.train.objectives.pretrain:SFT", "chat"),
    "dpo": ObjectiveSpec("dpo", "dist_llama.train.objectives.dpo:DPO", "preference", packs_windows=False,
                         starting_reference=True, validate=_validate_dpo),
    "reward": ObjectiveSpec("reward", "dist_llama.train.objectives.reward:Reward", "preference", packs_windows=False,
                            score_head=True, validate=_validate_reward),
}
"""train.objective → its spec."""


def objective_spec(name: str) -> ObjectiveSpec:
    """The spec of train.objective `name`; ConfigError naming the key when there is none."""
    spec = OBJECTIVES.get(name)
    _require(spec is not None, "train.objective", f"must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    return spec
