"""Loading a config: schema defaults, then a YAML preset, then key=value overrides, each checked by
omegaconf (unknown keys, wrong types: ConfigError naming the key); and saving the run record."""

from __future__ import annotations

import dataclasses
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


_MISSING = object()


def _nodes(data, prefix: str = ""):
    """(dotted path, value) of every node under `data`, list items as [i]."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        path = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}.{k}" if prefix else str(k)
        yield path, v
        yield from _nodes(v, path)


def _locate(data, key: str, value=_MISSING) -> Optional[str]:
    """The full path of the first node whose path ends with `key` (and holds `value`, if given):
    omegaconf names a key inside a list item without its path (`weight`, not `data.sources[1].weight`)."""
    return next((path for path, v in _nodes(data) if (path == key or path.endswith("." + key))
                 and (value is _MISSING or v == value)), None)


def _full_key(exc: OmegaConfBaseException, other, source: str, value=_MISSING) -> str:
    key = _key_of(exc, source)
    if key == source:
        return key
    data = OmegaConf.to_container(other) if isinstance(other, DictConfig) else other
    return _locate(data, key, value) or _locate(data, key) or key


def _merge(base: DictConfig, other, source: str, prefix: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        key = _full_key(exc, other, source)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent and "[" not in parent else base
        item = getattr(exc, "object_type", None)
        if "[" in key and dataclasses.is_dataclass(item):  # a key inside a list item: that item's fields
            allowed = ", ".join(f.name for f in dataclasses.fields(item))
        else:
            allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "?"
        raise ConfigError(prefix + key, f"unknown key (from {source}); allowed here: {allowed}") from None
    except OmegaConfBaseException as exc:
        key = _full_key(exc, other, source, getattr(exc, "value", _MISSING))
        node_type = type(OmegaConf.select(base, key)).__name__ if key != source and "[" not in key else "?"
        expected = f"; expected {node_type}" if node_type not in ("?", "NoneType") else ""
        raise ConfigError(prefix + key, f"wrong type or value (from {source}): {exc.msg.splitlines()[0]}"
                                        f"{expected}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys and drops the first without a word: a
    section written twice (`train:` ... `train:`) silently loses half of the preset."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key (a list): SafeLoader's own error follows
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, flag: str = "--config") -> dict:
    """A preset file's mapping of sections; ConfigError (naming `flag` and the file) for a file that is
    not UTF-8, not YAML, holds a key twice, is empty, or is not a mapping."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(flag, f"{path} is not UTF-8 text (byte {exc.start}): a YAML preset is expected") from None
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        preset = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(flag, f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if preset is None:  # an empty preset would silently train the schema's default model
        raise ConfigError(flag, f"{path} is empty (no settings): give a preset with at least one section, "
                                "or leave out the flag for the defaults")
    if not isinstance(preset, dict):
        raise ConfigError(flag, f"{path} must hold a mapping of sections, got {type(preset).__name__}")
    return preset


def preset_path(config_path: str, flag: str = "--config") -> Path:
    """The preset file: a path, or a name in configs/."""
    path = Path(config_path)
    if not path.is_file() and (CONFIG_DIR / path.name).is_file():
        path = CONFIG_DIR / path.name
    if not path.is_file():
        raise ConfigError(flag, f"file not found: {config_path}" + (" (a directory)" if path.is_dir() else ""))
    return path


def parse_override(item: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as exc:
        raise ConfigError(item.split("=", 1)[0], f"cannot parse override: {exc.msg.splitlines()[0]}") from None


def load(config_path: Optional[str], overrides: Sequence[str] = (), schema: type = Config,
         flag: str = "--config", prefix: str = "") -> DictConfig:
    """Schema defaults, then the YAML preset, then key=value overrides, each checked by omegaconf.
    `flag` names the preset in errors; `prefix` goes before every key named (e.g. "cluster.")."""
    cfg = OmegaConf.structured(schema)
    if config_path:
        path = preset_path(config_path, flag)
        preset = read_yaml(path, flag)
        for section, value in preset.items():
            # A section the schema holds as a mapping (model, train, ...): a scalar there is a mistake.
            expects_mapping = isinstance(cfg.get(section) if section in cfg else None, DictConfig)
            if expects_mapping and value is not None and not isinstance(value, dict):
                raise ConfigError(prefix + str(section), f"must be a mapping of keys (in {config_path}), got "
                                                         f"{type(value).__name__} {value!r}")
        cfg = _merge(cfg, _rename_in_preset(preset, str(config_path)), str(config_path), prefix)
    dotlist = _parse_overrides(overrides)
    for item in dotlist:
        cfg = _merge(cfg, parse_override(item), "command line", prefix)
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
        walk(_rename_in_preset(read_yaml(preset_path(config_path)), None), "")
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
