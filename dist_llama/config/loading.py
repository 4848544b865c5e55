"""Loading a config: schema defaults, then a YAML preset, then key=value overrides, each checked by
omegaconf (unknown keys, wrong types: ConfigError naming the key); and saving the run record."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_llama.config.errors import ConfigError
from dist_llama.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's presets: a --config (or --cluster) name that is not a file is looked up here."""


RENAMED = {"train.dpo_beta": "train.dpo.beta", "train.dpo_nll_coef": "train.dpo.nll_coef",
           "train.dpo_mask_special": "train.dpo.mask_special", "train.dpo_reference": "train.dpo.reference"}
"""Keys that moved (old → new): the old names are read, with a deprecation line, for one release."""


def _renamed(key: str, where: Optional[str]) -> str:
    """The current name of `key`; a deprecation line naming `where` it was read (None: quiet)."""
    new = RENAMED.get(key)
    if new is None or where is None:
        return new or key
    print(f"dist_llama: {key} (in {where}) is deprecated: it is now {new}; the old name is read until the next "
          "release", file=sys.stderr)
    return new


def _rename_in_preset(preset: dict, where: Optional[str]) -> dict:
    """The preset with every renamed key moved to its new place."""
    out = {section: dict(value) if isinstance(value, dict) else value for section, value in preset.items()}
    for old in RENAMED:
        section, name = old.split(".", 1)
        if isinstance(out.get(section), dict) and name in out[section]:
            value = out[section].pop(name)
            node = out
            *parents, leaf = _renamed(old, where).split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def _parse_overrides(overrides: Sequence[str], warn: bool = True) -> list[str]:
    dotlist = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(item, "overrides are key=value or --key=value, e.g. train.steps=20")
        key, value = text.split("=", 1)
        dotlist.append(f"{_renamed(key, 'the command line' if warn else None)}={value}")
    return dotlist


def _key_of(exc: OmegaConfBaseException, fallback: str) -> str:
    return getattr(exc, "full_key", None) or fallback


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        key = _key_of(exc, source)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "?"
        raise ConfigError(key, f"unknown key (from {source}); allowed here: {allowed}") from None
    except OmegaConfBaseException as exc:
        key = _key_of(exc, source)
        node_type = type(OmegaConf.select(base, key)).__name__ if key != source else "?"
        raise ConfigError(key, f"wrong type or value (from {source}): {exc.msg.splitlines()[0]}; "
                          f"expected {node_type}") from None


def load(config_path: Optional[str], overrides: Sequence[str] = (), schema: type = Config) -> DictConfig:
    """Schema defaults, then the YAML preset, then key=value overrides, each checked by omegaconf."""
    cfg = OmegaConf.structured(schema)
    if config_path:
        path = Path(config_path)
        if not path.is_file() and (CONFIG_DIR / path.name).is_file():
            path = CONFIG_DIR / path.name
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {config_path}")
        try:
            preset = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{config_path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(preset, dict):
            raise ConfigError("--config", f"{config_path} must hold a mapping of sections")
        for section, value in preset.items():
            # A section the schema holds as a mapping (model, train, ...): a scalar there is a mistake.
            expects_mapping = isinstance(cfg.get(section) if section in cfg else None, DictConfig)
            if expects_mapping and value is not None and not isinstance(value, dict):
                raise ConfigError(str(section), f"must be a mapping of keys (in {config_path}), got "
                                                f"{type(value).__name__} {value!r}")
        cfg = _merge(cfg, _rename_in_preset(preset, str(config_path)), str(config_path))
    dotlist = _parse_overrides(overrides)
    for item in dotlist:
        try:
            override = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(item.split("=", 1)[0], f"cannot parse override: {exc.msg.splitlines()[0]}") from None
        cfg = _merge(cfg, override, "command line")
    return cfg


def explicit_keys(config_path: Optional[str], overrides: Sequence[str] = ()) -> set[str]:
    """The dotted keys a preset or an override sets (what the schema defaults do not decide)."""
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    if config_path:
        path = Path(config_path)
        path = path if path.is_file() else CONFIG_DIR / path.name
        walk(_rename_in_preset(yaml.safe_load(path.read_text()) or {}, None), "")
    keys.update(item.split("=", 1)[0] for item in _parse_overrides(overrides, warn=False))
    return keys


def to_object(cfg: DictConfig) -> Config:
    """The typed config; an interpolation that does not resolve (`${...}`) is a ConfigError naming its key."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = _key_of(exc, "config")
        raise ConfigError(key, f"cannot be resolved: {str(exc.msg or exc).splitlines()[0]}") from None


def save_resolved(cfg: Config, run_dir: Path) -> Path:
    """The run record: the exact config a run used, loadable again with --config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
    return path
