from .flops import H100_BF16_PEAK, count_params, flops_per_token, measure_cpu_peak_flops, mfu
from .llama import ModelArgs, Transformer, ffn_hidden_dim

__all__ = [
    "ModelArgs",
    "Transformer",
    "ffn_hidden_dim",
    "count_params",
    "flops_per_token",
    "mfu",
    "measure_cpu_peak_flops",
    "H100_BF16_PEAK",
]
