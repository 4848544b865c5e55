"""Closed-form parameter counts, PaLM FLOPs per token, MFU, and the CPU peak probe."""

import math

import pytest
import torch

from dist_llama.model import (
    H100_BF16_PEAK,
    ModelArgs,
    Transformer,
    count_params,
    flops_per_token,
    measure_cpu_peak_flops,
    mfu,
)

pytestmark = pytest.mark.timeout(120)

LLAMA3_8B = ModelArgs(
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3
)


def meta_numel(args: ModelArgs):
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    emb_out = model.tok_embeddings.weight.numel() + model.output.weight.numel()
    return total, total - emb_out


@pytest.mark.parametrize(
    "args",
    [
        ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32),
        ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=1000, multiple_of=64, ffn_dim_multiplier=1.3),
        ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=50, multiple_of=256),
        LLAMA3_8B,
    ],
    ids=["tiny-mha", "tiny-gqa-mult", "mqa", "llama3-8b"],
)
def test_count_params_matches_model(args):
    assert count_params(args) == meta_numel(args)


def test_llama3_8b_param_count():
    total, non_emb = count_params(LLAMA3_8B)
    assert total == 8_030_261_248  # the published "8B" (8.03e9)
    assert non_emb == total - 2 * 128256 * 4096


def test_flops_per_token_by_hand():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32)
    # ffn: int(2*256/3)=170 -> 192. per layer: attn 64*16*(2*4+2*2)=12288, ffn 3*64*192=36864, norms 128
    n = 2 * (12288 + 36864 + 128) + 64
    assert count_params(args)[1] == n == 98624
    assert flops_per_token(args, 128) == 6 * n + 12 * 2 * 4 * 16 * 128


def test_mfu_arithmetic():
    assert mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
    assert mfu(250.0, 2e9, 1e12) == pytest.approx(0.5)
    # Llama 3 8B at seq 8192 on one H100: ~ 5.4e10 FLOP/token, so 7000 tok/s is ~38% MFU
    fpt = flops_per_token(LLAMA3_8B, 8192)
    assert 5.0e10 < fpt < 6.0e10
    assert 0.3 < mfu(7000.0, fpt, H100_BF16_PEAK) < 0.45
    assert H100_BF16_PEAK == 989e12


def test_measure_cpu_peak_flops():
    peak = measure_cpu_peak_flops(n=256, repeats=2)
    assert math.isfinite(peak) and peak > 0
