"""Reading a model's weights from a checkpoint, one parameter at a time, in dist_llama's (Meta's) names.

    source = open_weights(path)
    source.args        # ModelArgs: the architecture
    source.tokenizer   # the tokenizer spec the checkpoint names (for data.build_tokenizer), or None
    source.names()     # parameter names: tok_embeddings.weight, layers.0.attention.wq.weight, ...
    source.read(name)  # the full tensor of one parameter

HF-ONLY FIRST VERSION, to be replaced by the full reader (dist_llama run checkpoints, Meta
consolidated files, Hugging Face directories): only a Hugging Face directory is understood here,
config.json + model.safetensors or a sharded model.safetensors.index.json.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Protocol

import torch

from dist_llama.model.args import ModelArgs
from dist_llama.model.hf import args_from_hf_config, from_hf_state_dict

__all__ = ["WeightSource", "open_weights"]

_EMBED = "model.embed_tokens.weight"


class WeightSource(Protocol):
    args: ModelArgs
    tokenizer: str | None

    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class HFDirectory:
    """A Hugging Face LlamaForCausalLM directory, read lazily with safetensors."""

    def __init__(self, path: Path):
        self.path = path
        config = json.loads((path / "config.json").read_text())
        self.args = args_from_hf_config(types.SimpleNamespace(**config))
        tok = path / "tokenizer.json"
        self.tokenizer = str(tok) if tok.is_file() else None

        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (path / "model.safetensors").is_file():
            shards = [path / "model.safetensors"]
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._files, self._meta = {}, {}  # HF key -> its file, and an empty (meta) tensor of its shape
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    self._files[key] = shard
                    self._meta[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
        # Our name -> HF key, found by converting the meta tensors. Every conversion also returns
        # the embeddings' stand-in (see _convert), which names only what the embeddings key itself
        # gives; that key comes last, so output.weight is lm_head when there is one.
        self._key = {}
        embed = self._meta[_EMBED]
        for key in sorted(self._files, key=lambda k: k == _EMBED):
            for name, tensor in self._convert(key, self._meta[key]).items():
                if key == _EMBED or tensor is not embed:
                    self._key.setdefault(name, key)

    def _convert(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        # from_hf_state_dict ties output to the embeddings when lm_head is absent, so any dict it
        # converts needs the embeddings: a meta stand-in costs nothing.
        return from_hf_state_dict({_EMBED: self._meta[_EMBED], key: tensor}, self.args)

    def names(self) -> list[str]:
        return list(self._key)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._key:
            raise KeyError(f"{self.path}: no parameter {name}")
        key = self._key[name]
        with safe_open(self._files[key], framework="pt") as f:
            return self._convert(key, f.get_tensor(key))[name]


def open_weights(path: str | Path) -> WeightSource:
    """The weights at `path`. Raises ValueError for anything this version cannot read."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "config.json").is_file():
        return HFDirectory(path)
    raise ValueError(f"{path}: not a Hugging Face directory (config.json + safetensors); "
                     "this first version reads only those")
