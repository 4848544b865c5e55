"""The Llama model. ModelArgs (plain Python) is imported at once; everything else needs torch and is
imported on first use, so that the configuration, which holds a ModelArgs, imports no torch."""

from .args import ModelArgs, ffn_hidden_dim

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


def __getattr__(name: str):
    # PEP 562: Python calls this only for names not defined above, i.e. the torch-backed ones.
    if name == "Transformer":
        from .llama import Transformer

        return Transformer
    if name in ("count_params", "flops_per_token", "mfu", "measure_cpu_peak_flops", "H100_BF16_PEAK"):
        from . import flops

        return getattr(flops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
