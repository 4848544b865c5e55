"""Real-valued RoPE (cos/sin table) against Meta's complex reference, written out here: the table and
the rotation, with and without Llama 3.1 scaling, for positions restarting per document and for the
positions a context-parallel rank holds."""

import pytest
import torch

from dist_llama.model import ModelArgs, Transformer
from dist_llama.model.llama import apply_rotary_emb, apply_scaling, precompute_freqs_cis
from dist_llama.parallel.context import cp_global_indices

pytestmark = pytest.mark.timeout(60)


# Meta's reference (meta-llama/llama3 model.py), complex64 throughout.
def meta_precompute_freqs_cis(dim, end, theta, use_scaled, old_context_len):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    if use_scaled:
        freqs = apply_scaling(freqs, 8.0, 1.0, 4.0, old_context_len)  # tested against Meta's loop in test_model
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def meta_apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.unsqueeze(2)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("theta,use_scaled", [(10000.0, False), (500000.0, True)])
def test_real_rope_equals_meta_complex(theta, use_scaled):
    head_dim, end, old_context_len = 32, 4096, 256  # the scaled case keeps, blends and divides frequencies
    table = precompute_freqs_cis(head_dim, end, theta, use_scaled, old_context_len=old_context_len)
    reference = meta_precompute_freqs_cis(head_dim, end, theta, use_scaled, old_context_len)
    assert table.dtype == torch.float32 and table.shape == (end, head_dim // 2, 2)
    assert rel_err(table, torch.view_as_real(reference)) <= 1e-6

    torch.manual_seed(0)
    B, S, Hq, Hkv = 2, 64, 4, 2
    xq, xk = torch.randn(B, S, Hq, head_dim), torch.randn(B, S, Hkv, head_dim)
    restarting = torch.stack([torch.cat([torch.arange(20), torch.arange(44)]), torch.arange(3000, 3000 + S)])
    cp_rank1 = cp_global_indices(S * 2, cp_rank=1, cp_size=2).expand(B, -1)  # chunks 1 and 2 of 4
    for positions in (restarting, cp_rank1):
        ours = apply_rotary_emb(xq, xk, table[positions])
        ref = meta_apply_rotary_emb(xq, xk, reference[positions])
        for a, b in zip(ours, ref):
            assert rel_err(a, b) <= 1e-6
    # The rotation is not the identity: the comparison above can fail.
    assert rel_err(apply_rotary_emb(xq, xk, table[restarting])[0], xq) > 0.1

    # bf16 inputs are rotated in fp32 and returned in bf16, as Meta's.
    q16, k16 = xq.bfloat16(), xk.bfloat16()
    for a, b in zip(apply_rotary_emb(q16, k16, table[restarting]), meta_apply_rotary_emb(q16, k16, reference[restarting])):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_model_buffer_is_the_real_table():
    args = ModelArgs(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32, max_seq_len=256, rope_theta=500000.0,
                     use_scaled_rope=True, rope_old_context_len=64)
    model = Transformer(args)
    reference = meta_precompute_freqs_cis(32, 256, 500000.0, True, 64)
    assert rel_err(model.freqs_cis, torch.view_as_real(reference)) <= 1e-6
    assert "freqs_cis" not in model.state_dict()  # checkpoints never held it
