# Conversion between Hugging Face LlamaForCausalLM state dicts and ours (Meta's names).
#
# Two differences only: parameter names, and the RoPE layout of wq/wk. Meta rotates interleaved
# pairs (x[2j], x[2j+1]); HF's rotate_half pairs x[j] with x[j + head_dim/2]. HF's
# convert_llama_weights_to_hf.py therefore permutes the rows of each head of wq and wk so that the
# same rotation lands on the same features; we apply that permutation and its inverse here.
# Plain dicts and tensors in, plain dicts and tensors out: transformers is not needed.

import re
from typing import Any, Dict, Optional

import torch

from .args import ModelArgs, ffn_hidden_dim

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
"""A block's parameters: our (Meta's) module name → Hugging Face's."""
TOP_NAMES = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "score": "score",  # LlamaForSequenceClassification's head (a reward model)
}
"""Parameters outside the blocks: ours → Hugging Face's."""
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_TO_META_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_HF_TO_META_TOP = {v: k for k, v in TOP_NAMES.items()}


def hf_name(name: str) -> str:
    """Our (Meta's) parameter name → Hugging Face LlamaForCausalLM's (KeyError for other names)."""
    m = _META_LAYER.fullmatch(name)
    if m:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    if not name.endswith(".weight"):
        raise KeyError(name)
    return f"{TOP_NAMES[name[: -len('.weight')]]}.weight"


def meta_name(key: str) -> Optional[str]:
    """Hugging Face's parameter name → ours, or None for a key that is not a Llama parameter."""
    m = _HF_LAYER.fullmatch(key)
    if m and m.group(2) in _HF_TO_META_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}.weight"
    if key.endswith(".weight") and key[: -len(".weight")] in _HF_TO_META_TOP:
        return _HF_TO_META_TOP[key[: -len(".weight")]] + ".weight"
    return None


def rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """The heads whose rows the RoPE permutation reorders in parameter `name` (ours): wq's query
    heads, wk's key/value heads; None for every other parameter."""
    module = name.split(".")[-2] if "." in name else ""
    return {"wq": args.n_heads, "wk": args.kv_heads}.get(module)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows in Meta's RoPE layout → Hugging Face's: per head, rows (pair j, member r) ordered
    j-major become r-major."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_to_hf_rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def from_hf_state_dict(sd: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> ours. Tied checkpoints (no lm_head) get output = embeddings;
    rotary inv_freq buffers, which some versions save, are dropped."""
    out = {}
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = meta_name(key)
        assert name is not None, f"unexpected HF key {key}"
        heads = rope_heads(name, args)
        out[name] = hf_to_meta_rows(value, heads) if heads else value
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def to_hf_state_dict(sd: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Our state dict -> HF LlamaForCausalLM names and RoPE layout (untied lm_head)."""
    out = {}
    for name, value in sd.items():
        heads = rope_heads(name, args)
        out[hf_name(name)] = meta_to_hf_rows(value, heads) if heads else value
    return out


def _ffn_args(dim: int, hidden: int) -> tuple:
    """A (ffn_dim_multiplier, multiple_of) for which Meta's rounding gives exactly `hidden`.
    Meta's rounding is not invertible, so try the published conventions first (Llama 2: no
    multiplier, multiple_of 256; Llama 3: one-decimal multiplier, multiple_of up to 4096), then an
    exact fallback."""
    base = int(2 * 4 * dim / 3)
    candidates = [
        (None, 256),
        (round(hidden / base, 1), _largest_pow2_divisor(hidden, 4096)),
        (round(hidden / base, 2), _largest_pow2_divisor(hidden, 4096)),
        ((hidden + 0.25) / base, 1),
    ]
    for mult, multiple_of in candidates:
        if ffn_hidden_dim(ModelArgs(dim=dim, ffn_dim_multiplier=mult, multiple_of=multiple_of)) == hidden:
            return mult, multiple_of
    raise ValueError(f"cannot express intermediate_size {hidden} for dim {dim} in Meta's FFN rounding")


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def args_from_hf_config(hf_config: Any) -> ModelArgs:
    """ModelArgs equivalent to a transformers LlamaConfig (read by attribute, so any object with
    the same fields works). Handles both `rope_parameters` (transformers >= 5) and the older
    `rope_theta` + `rope_scaling`."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError("head_dim != hidden_size // num_attention_heads is not supported")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Llama checkpoints with biases are not supported")
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported RoPE type {rope_type!r}")
    mult, multiple_of = _ffn_args(c.hidden_size, c.intermediate_size)

    args = ModelArgs(
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        vocab_size=c.vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=c.rms_norm_eps,
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        max_seq_len=c.max_position_embeddings,
        context_len=c.max_position_embeddings,
    )
    # A reward model: transformers' sequence classifier with one label (its `score` head).
    args.score_head = any(str(a).endswith("ForSequenceClassification") for a in getattr(c, "architectures", None) or ())
    if args.score_head and getattr(c, "num_labels", 1) != 1:
        raise ValueError(f"a sequence classifier with num_labels={c.num_labels}; a reward model has one label")
    if rope_type == "llama3":
        args.use_scaled_rope = True
        args.rope_scale_factor = float(rope["factor"])
        args.rope_low_freq_factor = float(rope["low_freq_factor"])
        args.rope_high_freq_factor = float(rope["high_freq_factor"])
        args.rope_old_context_len = int(rope.get("original_max_position_embeddings", c.max_position_embeddings))
    return args
