"""What train.objective=ppo checks before any process group: its reward function and reward models
(ConfigError naming the key: one line, exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
import importlib

from dist_llama.config import ConfigError


def check_reward_fn(spec: str) -> None:
    module, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("train.ppo.reward_fn", f"{spec!r} does not name a function ({exc})") from None
    if not callable(fn):
        raise ConfigError("train.ppo.reward_fn", f"{spec!r} is not callable")


def check_reward_model(cfg, key: str, path: str, tokenizer) -> None:
    """`path` opens as a reward model (a score head) with the policy's architecture and tokenizer."""
    from dist_llama.weights import WeightsError, open_weights
    from dist_llama.weights.load import check_source
    from dist_llama.weights.tokenizer_identity import tokenizer_mismatch

    try:
        source = open_weights(path, max_seq_len=cfg.model.max_seq_len)
    except WeightsError as exc:
        raise ConfigError(key, str(exc)) from None
    theirs = tokenizer_mismatch(source, tokenizer)
    if theirs is not None:
        raise ConfigError(key, f"{path} was trained with another tokenizer, {theirs}, than the policy's "
                          f"data.tokenizer={cfg.data.tokenizer}")
    if not source.args.score_head:
        raise ConfigError(key, f"{path} is a language model, not a reward model (no score head): train one with "
                          "train.objective=reward")
    value = " (and the value model, train.ppo.value_init=reward, starts from it)" if key == "train.ppo.reward" and \
        cfg.train.ppo.value_init == "reward" else ""
    try:
        check_source(source, dataclasses.replace(cfg.model, score_head=True))
    except ConfigError as exc:
        raise ConfigError(key, f"{path} is not a model of the policy's architecture{value}: {exc.message.split(' (')[0]} "
                          f"for {exc.key}") from None


def check_ppo_inputs(cfg, tokenizer) -> None:
    ppo = cfg.train.ppo
    if ppo.reward_fn:
        check_reward_fn(ppo.reward_fn)
    for key in ("reward", "reward_safety"):
        if getattr(ppo, key):
            check_reward_model(cfg, f"train.ppo.{key}", getattr(ppo, key), tokenizer)
