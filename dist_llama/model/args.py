"""ModelArgs: the architecture of a Llama model, and the sizes derived from it. Plain Python (no
torch), so the configuration can hold a model without importing torch."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; head_dim = dim // n_heads."""
    n_kv_heads: Optional[int] = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = -1
    """Vocabulary size; -1 means take it from the tokenizer."""
    multiple_of: int = 256
    """The FFN hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: Optional[float] = None
    """Scales the FFN hidden size (2/3 * 4 * dim) before rounding; None means 1."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorms."""
    rope_theta: float = 500000.0
    """RoPE base (10000 for Llama 2, 500000 for Llama 3)."""
    use_scaled_rope: bool = False
    """Apply Llama 3.1's long-context frequency scaling to RoPE."""
    rope_scale_factor: float = 8.0
    """Llama 3.1 scaling: divisor for the low frequencies."""
    rope_low_freq_factor: float = 1.0
    """Llama 3.1 scaling: wavelengths above old_context_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama 3.1 scaling: wavelengths below old_context_len / this are left alone."""
    rope_old_context_len: int = 8192
    """Llama 3.1 scaling: the context length the unscaled model was trained on."""
    max_seq_len: int = 2048
    """Longest sequence (largest position + 1) the RoPE table covers."""
    context_len: Optional[int] = None
    """The context length the model is made for, as its source said (Hugging Face
    max_position_embeddings; taken from checkpoint.init_from); None: see context_length()."""
    attn_impl: str = "auto"
    """Attention kernel: "sdpa", "flex", or "auto" (flex on CUDA, sdpa elsewhere)."""
    score_head: bool = False
    """A reward model: a scalar `score` head (Linear(dim, 1), transformers' LlamaForSequenceClassification)
    in place of the `output` projection."""

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: n_kv_heads, or n_heads when that is None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


def ffn_hidden_dim(args: ModelArgs) -> int:
    """Meta's FFN width: 2/3 of 4*dim (SwiGLU has three matrices instead of two, so this keeps the
    parameter count of a 4*dim MLP), scaled by ffn_dim_multiplier, rounded up to multiple_of."""
    hidden_dim = 4 * args.dim
    hidden_dim = int(2 * hidden_dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden_dim = int(args.ffn_dim_multiplier * hidden_dim)
    return args.multiple_of * ((hidden_dim + args.multiple_of - 1) // args.multiple_of)


def context_length(args: ModelArgs) -> int:
    """The context the model is made for, as exported (Hugging Face max_position_embeddings): the
    largest of what its source said (context_len), the longest sequence the run used (max_seq_len)
    and, when RoPE is scaled, the scaling's original context times its factor."""
    scaled = int(args.rope_old_context_len * args.rope_scale_factor) if args.use_scaled_rope else 0
    if args.context_len is not None:
        return max(args.context_len, args.max_seq_len)
    return max(args.max_seq_len, scaled)
