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

from dist_llama.config.engines import engine_facts
from dist_llama.config.errors import ConfigError

DPO_REFERENCES = ("model", "precomputed")
"""Where DPO's reference log-probabilities come from (train.dpo.reference)."""
REWARD_MARGINS = ("none", "small", "large", "record")
"""The reward model's ranking-loss margin (train.reward.margin)."""
PPO_VALUE_INITS = ("reward", "policy")
"""Where PPO's value model starts (train.ppo.value_init)."""


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


def _validate_ppo(cfg, p) -> None:
    ppo, t = cfg.train.ppo, cfg.train
    _require(bool(ppo.reward or ppo.reward_fn), "train.ppo.reward",
             "train.objective=ppo needs a reward model (a reward run or an exported sequence-classifier directory) "
             "or a rule-based reward train.ppo.reward_fn=module:function")
    _require(not (ppo.reward and ppo.reward_fn), "train.ppo.reward_fn",
             "give either train.ppo.reward_fn or train.ppo.reward, not both")
    _require(not ppo.reward_safety or bool(ppo.reward), "train.ppo.reward_safety",
             "a safety reward model is combined with a helpfulness one: set train.ppo.reward too")
    _require(not ppo.reward_fn or ppo.reward_fn.count(":") == 1 and all(ppo.reward_fn.split(":")),
             "train.ppo.reward_fn", f"must be module:function; got {ppo.reward_fn!r}")
    _require(ppo.value_init in PPO_VALUE_INITS, "train.ppo.value_init",
             f"must be one of {', '.join(PPO_VALUE_INITS)}; got {ppo.value_init!r}")
    _require(ppo.value_init == "policy" or bool(ppo.reward), "train.ppo.value_init",
             "value_init=reward starts the value model from train.ppo.reward: with a reward_fn use value_init=policy")
    for key in ("pp", "cp"):
        # A rollout generates whole sequences on each rank's model: a pipeline stage or a context-parallel
        # shard holds no whole model to generate with.
        _require(getattr(p, key) == 1, f"parallel.{key}", f"must be 1 with train.objective=ppo (rollouts generate "
                 f"with the whole model on each rank); got {getattr(p, key)}")
    _require(engine_facts(p).second_trained_model, "parallel.engine",
             f"train.objective=ppo trains a value model beside the policy: use fsdp or ddp, not {p.engine}")
    for key in ("kl_coef", "value_clip"):
        _require(getattr(ppo, key) >= 0, f"train.ppo.{key}", f"must be >= 0, got {getattr(ppo, key)}")
    _require(0 < ppo.clip < 1, "train.ppo.clip", f"must be in (0, 1), got {ppo.clip}")
    for key in ("gamma", "lam"):
        _require(0 <= getattr(ppo, key) <= 1, f"train.ppo.{key}", f"must be in [0, 1], got {getattr(ppo, key)}")
    _require(0 < ppo.safety_threshold < 1, "train.ppo.safety_threshold",
             f"must be in (0, 1), got {ppo.safety_threshold}")
    for key in ("epochs", "max_new_tokens"):
        _require(getattr(ppo, key) > 0, f"train.ppo.{key}", f"must be positive, got {getattr(ppo, key)}")
    _require(ppo.temperature > 0, "train.ppo.temperature", f"must be positive (rollouts sample), got {ppo.temperature}")
    _require(0 < ppo.top_p <= 1, "train.ppo.top_p", f"must be in (0, 1], got {ppo.top_p}")
    _require(ppo.value_lr > 0, "train.ppo.value_lr", f"must be positive, got {ppo.value_lr}")
    dp = max(1, p.dp)
    _require(ppo.mini_batch_size > 0 and t.global_batch_size % ppo.mini_batch_size == 0
             and ppo.mini_batch_size % dp == 0, "train.ppo.mini_batch_size",
             f"must divide train.global_batch_size ({t.global_batch_size}) and be a multiple of the data-parallel "
             f"degree ({dp}); got {ppo.mini_batch_size}")
    _require(ppo.max_new_tokens < cfg.data.seq_len, "train.ppo.max_new_tokens",
             f"must be below data.seq_len ({cfg.data.seq_len}, prompt and response together); got {ppo.max_new_tokens}")
    _require(not cfg.data.sources and not cfg.data.stages, "data.sources",
             "train.objective=ppo reads one prompts dataset (data.path, prepared with --format chat)")
    _require(t.eval_interval == 0, "train.eval_interval", f"must be 0 with train.objective=ppo, got {t.eval_interval}")


OBJECTIVES = {
    "pretrain": ObjectiveSpec("pretrain", "dist_llama.train.objectives.pretrain:Pretrain", None),
    "sft": ObjectiveSpec("sft", "dist_llama.train.objectives.pretrain:SFT", "chat"),
    "dpo": ObjectiveSpec("dpo", "dist_llama.train.objectives.dpo:DPO", "preference", packs_windows=False,
                         starting_reference=True, validate=_validate_dpo),
    "reward": ObjectiveSpec("reward", "dist_llama.train.objectives.reward:Reward", "preference", packs_windows=False,
                            score_head=True, validate=_validate_reward),
    "ppo": ObjectiveSpec("ppo", "dist_llama.train.objectives.ppo:PPO", "chat", packs_windows=False,
                         starting_reference=True, validate=_validate_ppo),
}
"""train.objective → its spec."""


def objective_spec(name: str) -> ObjectiveSpec:
    """The spec of train.objective `name`; ConfigError naming the key when there is none."""
    spec = OBJECTIVES.get(name)
    _require(spec is not None, "train.objective", f"must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    return spec
