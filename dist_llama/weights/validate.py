"""What a weight source may claim, checked before it is believed: the architecture values of a
Hugging Face config.json or a Meta params.json (types, ranges, divisibility) and the finiteness of
every tensor read. A value that fails is a WeightsError naming the file and the key or tensor, which
every command reports as bad input (exit 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or does not fit: the message names the file or tensor."""


# Upper bounds far above any published Llama (405B: dim 16384, 126 layers, 128 heads, 128256 ids,
# 131072 positions; Llama 4: 10M positions) and far below what would exhaust a machine: a value past
# them is a broken or hostile file, not a model.
MAX_DIM = 1 << 20
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 24


def _int(where: Path, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WeightsError(f"{where}: {key} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise WeightsError(f"{where}: {key} must be an integer in [{low}, {high}], got {value}")
    return value


def _positive(where: Path, key: str, value: Any, below: float = math.inf) -> float:
    """A finite number > 0 (and < `below`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < below:
        bound = "" if below == math.inf else f" and < {below:g}"
        raise WeightsError(f"{where}: {key} must be a finite number > 0{bound}, got {value!r}")
    return float(value)


def _required_ints(where: Path, values: dict, keys: tuple) -> None:
    """Each (key, upper bound): present, an integer in [1, bound]."""
    for key, high in keys:
        if key not in values:
            raise WeightsError(f"{where}: {key} is missing")
        _int(where, key, values[key], 1, high)


def _heads(where: Path, dim: int, heads: int, kv: Optional[int], keys: tuple[str, str, str]) -> None:
    """heads divides dim into even head sizes (RoPE rotates pairs), kv heads divide heads."""
    dim_key, heads_key, kv_key = keys
    if dim % heads or (dim // heads) % 2:
        raise WeightsError(f"{where}: {heads_key}={heads} must divide {dim_key}={dim} into heads of an even size")
    if kv is not None and heads % kv:
        raise WeightsError(f"{where}: {kv_key}={kv} must divide {heads_key}={heads}")


def check_hf_config(config: Any, where: Path) -> None:
    """Every architecture value of a Hugging Face Llama config.json, before ModelArgs is built from it."""
    if not isinstance(config, dict):
        raise WeightsError(f"{where}: must be a JSON object, got {type(config).__name__}")
    c = config
    _required_ints(where, c, (("hidden_size", MAX_DIM), ("intermediate_size", MAX_DIM), ("num_hidden_layers", MAX_LAYERS),
                              ("num_attention_heads", MAX_HEADS), ("vocab_size", MAX_VOCAB),
                              ("max_position_embeddings", MAX_POSITIONS)))
    kv = c.get("num_key_value_heads")
    if kv is not None:
        _int(where, "num_key_value_heads", kv, 1, MAX_HEADS)
    if c.get("head_dim") is not None:
        _int(where, "head_dim", c["head_dim"], 1, MAX_DIM)
    _heads(where, c["hidden_size"], c["num_attention_heads"], kv,
           ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if "rms_norm_eps" not in c:
        raise WeightsError(f"{where}: rms_norm_eps is missing")
    _positive(where, "rms_norm_eps", c["rms_norm_eps"], below=1)
    if c.get("rope_theta") is not None:
        _positive(where, "rope_theta", c["rope_theta"])
    for key in ("rope_scaling", "rope_parameters"):
        if c.get(key) is not None:
            _check_hf_rope(where, key, c[key])


def _check_hf_rope(where: Path, key: str, rope: Any) -> None:
    if not isinstance(rope, dict):
        raise WeightsError(f"{where}: {key} must be an object or null, got {rope!r}")
    if rope.get("rope_theta") is not None:
        _positive(where, f"{key}.rope_theta", rope["rope_theta"])
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return  # the default, or a type the model refuses by name
    for field in ("factor", "low_freq_factor", "high_freq_factor"):
        if field not in rope:
            raise WeightsError(f"{where}: {key}.{field} is missing")
        _positive(where, f"{key}.{field}", rope[field])
    if not rope["low_freq_factor"] < rope["high_freq_factor"]:  # the smoothing divides by their difference
        raise WeightsError(f"{where}: {key}.low_freq_factor ({rope['low_freq_factor']}) must be below "
                           f"high_freq_factor ({rope['high_freq_factor']})")
    if rope.get("original_max_position_embeddings") is not None:
        _int(where, f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"], 1,
             MAX_POSITIONS)


def check_meta_params(params: Any, where: Path) -> None:
    """Every architecture value of a Meta params.json, before ModelArgs is built from it."""
    if not isinstance(params, dict):
        raise WeightsError(f"{where}: must be a JSON object, got {type(params).__name__}")
    p = params
    _required_ints(where, p, (("dim", MAX_DIM), ("n_layers", MAX_LAYERS), ("n_heads", MAX_HEADS)))
    kv = p.get("n_kv_heads")
    if kv is not None:
        _int(where, "n_kv_heads", kv, 1, MAX_HEADS)
    _heads(where, p["dim"], p["n_heads"], kv, ("dim", "n_heads", "n_kv_heads"))
    vocab = p.get("vocab_size", -1)
    if vocab != -1 and (isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= MAX_VOCAB):
        # Llama 2 writes -1: the tokenizer's (the output layer's rows)
        raise WeightsError(f"{where}: vocab_size must be -1 or an integer in [1, {MAX_VOCAB}], got {vocab!r}")
    if "multiple_of" in p:
        _int(where, "multiple_of", p["multiple_of"], 1, MAX_DIM)
    if p.get("ffn_dim_multiplier") is not None:
        _positive(where, "ffn_dim_multiplier", p["ffn_dim_multiplier"], below=1e3)
    if "norm_eps" in p:
        _positive(where, "norm_eps", p["norm_eps"], below=1)
    if "rope_theta" in p:
        _positive(where, "rope_theta", p["rope_theta"])
    if "use_scaled_rope" in p and not isinstance(p["use_scaled_rope"], bool):
        raise WeightsError(f"{where}: use_scaled_rope must be true or false, got {p['use_scaled_rope']!r}")
    for key in ("rope_scaling_factor", "rope_high_freq_factor"):
        if p.get(key) is not None:
            _positive(where, key, p[key])
    if p.get("rope_high_freq_factor") is not None and not p["rope_high_freq_factor"] > 1.0:
        # Meta's code fixes the low-frequency factor at 1; the smoothing divides by their difference
        raise WeightsError(f"{where}: rope_high_freq_factor must be above the low-frequency factor 1, "
                           f"got {p['rope_high_freq_factor']}")


_FINITE_CHUNK = 1 << 24
"""Elements checked at a time: the check's temporary is a bounded slice, not a copy of the tensor."""


def check_finite(t: torch.Tensor, file: Any, name: str) -> torch.Tensor:
    """`t` itself, unless it holds a NaN or an infinity: then a WeightsError naming file and tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    rows = t.reshape(1) if t.dim() == 0 else t
    step = max(1, _FINITE_CHUNK // max(1, rows[0].numel()))
    bad = sum(int((~torch.isfinite(rows[i:i + step])).sum()) for i in range(0, rows.shape[0], step))
    if bad:
        raise WeightsError(f"{file}: tensor {name} holds {bad} NaN or infinite value(s); weights must be finite")
    return t
