# Llama 2/3 decoder, written to read like Meta's reference model (meta-llama/llama-models,
# models/llama3/model.py): same module names, same parameter names, same interleaved-pair RoPE,
# so Meta checkpoints load as they are. What differs from the reference is what training needs:
# per-token positions and document masking for packed sequences, SDPA/FlexAttention,
# meta-device construction with explicit init_weights, blocks held in a ModuleDict so that
# pipeline stages can drop layers, and mask building and the attention kernel in parameterless
# submodules (Transformer.mask, Attention.core) so that context parallelism can swap them.
# The KV cache of Meta's inference path is here too, but held by the caller (KVCache, passed to
# forward) rather than allocated inside Attention, so the training path carries no state.
# Nothing here knows about parallelism.

import functools
import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from .args import ModelArgs, ffn_hidden_dim
from .init import Init, canonical_name, init_param_


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # Normalise in fp32 even under bf16: the mean of squares loses too much in bf16.
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def apply_scaling(
    freqs: torch.Tensor,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> torch.Tensor:
    """Llama 3.1 RoPE scaling: frequencies whose wavelength is short compared with the original
    context are kept, long ones are divided by scale_factor, and the band between is interpolated
    smoothly. Same arithmetic as Meta's loop, written with torch.where so it also runs on meta tensors."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    assert low_freq_wavelen != high_freq_wavelen
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * freqs / scale_factor + smooth * freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, smoothed)
    return torch.where(wavelen < high_freq_wavelen, freqs, new_freqs)


def precompute_freqs_cis(
    dim: int,
    end: int,
    theta: float = 10000.0,
    use_scaled: bool = False,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> torch.Tensor:
    """Rotations e^{i * pos * freq} for positions 0..end-1 as real (cos, sin) pairs, fp32
    [end, dim // 2, 2]: torch.view_as_real of Meta's complex table. Real, because Inductor
    generates no code for complex tensors and would run the rotation of every block eagerly."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor, low_freq_factor, high_freq_factor, old_context_len)
    freqs = torch.outer(t, freqs)
    return torch.stack((torch.cos(freqs), torch.sin(freqs)), dim=-1)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate consecutive pairs (x[2j], x[2j+1]) of each head by the angle of freqs_cis[..., j, :]
    (Meta's complex product (x[2j] + i x[2j+1]) * (cos + i sin), written out in fp32).
    xq, xk: [B, S, H, head_dim]; freqs_cis: [B or 1, S, head_dim // 2, 2], one row per token so
    positions may restart inside a packed sequence."""
    cos, sin = freqs_cis.unsqueeze(2).unbind(-1)  # broadcast over heads

    def rotate(x: torch.Tensor) -> torch.Tensor:
        re, im = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


# A module-level cache, not state we manage: torch.compile is what makes FlexAttention fast (and
# what lets create_block_mask avoid materialising an S x S mask), and compiling once per process
# avoids recompiles. Only reached on the flex path, so CPU (SDPA) runs never compile anything.
@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def compiled_create_block_mask():
    """The one compiled create_block_mask of the process (context parallelism builds its masks with it too)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


Mask = Union[None, torch.Tensor, BlockMask]


def build_attention_mask(
    doc_ids: Optional[torch.Tensor], seq_len: int, device: torch.device, attn_impl: str
) -> Mask:
    """Causal attention restricted to tokens of the same document (causal block-diagonal).

    Returns a FlexAttention BlockMask for "flex"; for "sdpa", None when there are no document ids
    (SDPA's is_causal fast path) or a boolean [B, 1, S, S] mask (True = attend). Every query can
    attend to itself, so no row is fully masked and softmax never sees -inf everywhere."""
    if attn_impl == "flex":
        if doc_ids is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            batch = None
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

            batch = doc_ids.shape[0]
        return compiled_create_block_mask()(mask_mod, batch, None, seq_len, seq_len, device=device)
    if doc_ids is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


def resolve_attn_impl(attn_impl: str, device: torch.device) -> str:
    if attn_impl == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return attn_impl


class AttentionMask(nn.Module):
    """Builds the mask once per forward; a module (without parameters) so that context parallelism
    can swap it from outside."""

    def __init__(self, attn_impl: str = "auto"):
        super().__init__()
        self.attn_impl = attn_impl

    def forward(self, doc_ids: Optional[torch.Tensor], seq_len: int, device: torch.device) -> Mask:
        return build_attention_mask(doc_ids, seq_len, device, resolve_attn_impl(self.attn_impl, device))


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v under the mask; a module (without parameters) so that context
    parallelism can swap it from outside. xq [B, Sq, Hq, D], xk/xv [B, Skv, Hkv, D] -> [B, Sq, Hq, D]."""

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, mask: Mask) -> torch.Tensor:
        n_rep = xq.shape[2] // xk.shape[2]
        if isinstance(mask, BlockMask):
            # FlexAttention shares K/V heads itself; no copies.
            xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, S, head_dim]
            output = _compiled_flex_attention()(xq, xk, xv, block_mask=mask, enable_gqa=n_rep > 1)
        else:
            xk, xv = repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)
            xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, S, head_dim]
            output = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=mask, is_causal=mask is None)
        return output.transpose(1, 2)


def cached_attention_mask(start_pos: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Boolean [seqlen, start_pos + seqlen] mask (True = attend) for queries at positions
    start_pos.. against every cached key before them. Explicit even for one query: SDPA's
    is_causal aligns the diagonal top-left, which is wrong once there are more keys than queries."""
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=device).tril(diagonal=start_pos)


class KVCache:
    """One layer's keys and values for positions 0..max_seq_len-1 (Meta's cache_k / cache_v):
    [batch, max_seq_len, kv heads, head_dim], allocated at the first update with the heads the
    keys come with (all of them, or a tensor-parallel rank's share). Inference only."""

    def __init__(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        self.batch_size, self.max_seq_len, self.dtype, self.device = batch_size, max_seq_len, dtype, device
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor):
        """Store this call's keys and values at start_pos..; return those of positions 0.. so far."""
        bsz, seqlen = xk.shape[:2]
        if self.cache_k is None:
            shape = (self.batch_size, self.max_seq_len, *xk.shape[2:])
            self.cache_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.cache_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
        return self.cache_k[:bsz, : start_pos + seqlen], self.cache_v[:bsz, : start_pos + seqlen]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads = args.kv_heads
        self.n_heads = args.n_heads
        self.head_dim = args.dim // args.n_heads

        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.core = CoreAttention()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Mask,
                cache: Optional[KVCache] = None, start_pos: int = 0):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)

        # Head counts come from the projections' outputs, not from args: under tensor parallelism
        # each rank holds a slice of the heads.
        xq = xq.view(bsz, seqlen, -1, self.head_dim)
        xk = xk.view(bsz, seqlen, -1, self.head_dim)
        xv = xv.view(bsz, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        if cache is not None:
            # The queries of this call attend to the keys of every earlier position as well.
            xk, xv = cache.update(start_pos, xk, xv)

        output = self.core(xq, xk, xv, mask)
        return self.wo(output.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(dim=args.dim, hidden_dim=ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Mask,
                cache: Optional[KVCache] = None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.vocab_size > 0, "vocab_size must be set (from the tokenizer) before building the model"
        assert args.dim % args.n_heads == 0, "dim must be divisible by n_heads"
        assert args.n_heads % args.kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert args.attn_impl in ("auto", "sdpa", "flex"), f"unknown attn_impl {args.attn_impl!r}"
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers

        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict, not a list: pipeline stages delete the blocks they do not own and the remaining
        # keys keep their global layer index, so checkpoints stay addressable by layer.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        # A reward model reads one scalar per position instead of next-token logits (Llama 2 §3.2.2:
        # the classification head replaces the next-token head).
        self.output = None if args.score_head else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.score = nn.Linear(args.dim, 1, bias=False) if args.score_head else None
        self.mask = AttentionMask(args.attn_impl)

        # Derived from args, never checkpointed; recomputed by init_weights after to_empty().
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)

    def _precompute_freqs_cis(self) -> torch.Tensor:
        # Positions index this table directly, so max_seq_len rows cover every position < max_seq_len
        # (Meta sizes it 2x for generation beyond the training length; training never needs that).
        args = self.args
        return precompute_freqs_cis(
            args.dim // args.n_heads,
            args.max_seq_len,
            args.rope_theta,
            args.use_scaled_rope,
            args.rope_scale_factor,
            args.rope_low_freq_factor,
            args.rope_high_freq_factor,
            args.rope_old_context_len,
        )

    def init_weights(self, seed: int = 0, buffer_device: Optional[torch.device] = None):
        """(Re)compute freqs_cis and initialise every parameter in place, each from its own random
        stream seeded by (seed, its name): the same values for the whole model, a pipeline stage
        (modules set to None and removed layers simply are not there) or a sharded copy.

        Call after `to_empty(device=...)` of a meta-built model (or any time to re-init).
        buffer_device: where freqs_cis is built; default: where it currently lives.
        """
        self.init_buffers(buffer_device)
        for name, param in self.named_parameters():
            init_param_(param, name, seed, self.param_init(canonical_name(name)))

    def init_buffers(self, buffer_device: Optional[torch.device] = None):
        """(Re)compute freqs_cis only: after to_empty() of a model whose weights are then loaded."""
        buffer_device = buffer_device if buffer_device is not None else self.freqs_cis.device
        with torch.device(buffer_device):
            self.freqs_cis = self._precompute_freqs_cis()

    def new_cache(self, batch_size: int, max_seq_len: int) -> Dict[str, KVCache]:
        """An empty KVCache per layer (keyed like self.layers), on the weights' device and dtype."""
        wk = next(iter(self.layers.values())).attention.wk.weight
        return {key: KVCache(batch_size, max_seq_len, wk.dtype, wk.device) for key in self.layers}

    def param_init(self, name: str) -> Init:
        """How the parameter `name` starts: RMSNorm weights 1; tok_embeddings N(0, 1); wq/wk/wv/w1
        truncated normal std 0.02; wo/w2/w3 std 0.02 / sqrt(2 (layer_id + 1)), depth-scaled (as
        torchtitan) so that the residual stream does not grow with depth; output std dim**-0.5 cut
        at +-3 std. (The std-0.02 truncations keep nn.init's +-2 bounds: effectively untruncated.)"""
        *path, module, _ = name.split(".")
        if module.endswith("norm"):
            return lambda t, generator: nn.init.ones_(t)
        if module == "tok_embeddings":
            return nn.init.normal_
        if module == "score":  # as transformers initialises LlamaForSequenceClassification's head
            return functools.partial(nn.init.normal_, std=0.02)
        if module == "output":
            std = self.args.dim**-0.5
            return functools.partial(nn.init.trunc_normal_, std=std, a=-3 * std, b=3 * std)
        layer_id = int(path[1])  # layers.{i}.attention.wq.weight
        std = 0.02 if module in ("wq", "wk", "wv", "w1") else 0.02 / (2 * (layer_id + 1)) ** 0.5
        return functools.partial(nn.init.trunc_normal_, std=std)

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        start_pos: int = 0,
        cache: Optional[Dict[str, KVCache]] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens: [B, S] int64 token ids, or [B, S, dim] hidden states when this module has no
        tok_embeddings (a later pipeline stage).
        doc_ids: [B, S]; attention stays within equal ids (causal block-diagonal). None: plain causal.
        positions: [B, S] int64 RoPE positions (may restart per document). None: 0..S-1 per row.
        cache: inference (from new_cache): the tokens sit at positions start_pos..start_pos+S-1 and
        attend to the cached keys and values of positions < start_pos, then join them. No doc_ids
        or positions with it; the training path (cache None) is untouched.
        return_hidden: stop before `output` (for a loss that applies it to a chunk of tokens at a time).
        Returns fp32 logits [B, S, vocab] (a score head: fp32 scores [B, S, 1]), or the hidden states
        [B, S, dim] (after `norm` where this module has it) when it has no head or return_hidden."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        seqlen = h.shape[1]

        # model.bfloat16() and Module.to(dtype) cast this table too (FSDP and DeepSpeed mixed
        # precision leave buffers alone): cos and sin rounded to bf16 are off by up to ~4e-3.
        assert self.freqs_cis.dtype == torch.float32, (
            f"freqs_cis was cast to {self.freqs_cis.dtype}; call init_buffers() after casting the model")
        if cache is not None:
            assert doc_ids is None and positions is None, "the KV cache path takes neither doc_ids nor positions"
            freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen].unsqueeze(0)
            mask = cached_attention_mask(start_pos, seqlen, h.device)
            for key, layer in self.layers.items():
                h = layer(h, freqs_cis, mask, cache[key], start_pos)
        else:
            if positions is None:
                freqs_cis = self.freqs_cis[:seqlen].unsqueeze(0)
            else:
                freqs_cis = self.freqs_cis[positions]
            mask = self.mask(doc_ids, seqlen, h.device)
            for layer in self.layers.values():
                h = layer(h, freqs_cis, mask)

        if self.norm is not None:
            h = self.norm(h)
        head = self.score if self.score is not None else self.output
        if head is None or return_hidden:
            return h
        return head(h).float()
