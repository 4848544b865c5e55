"""The Llama model: parity with Hugging Face transformers, document masking, meta-device init."""

import math

import pytest
import torch

from sharp import randomize_

from dist_llama.model import ModelArgs, Transformer, ffn_hidden_dim
from dist_llama.model.hf import args_from_hf_config, from_hf_state_dict, to_hf_state_dict
from dist_llama.model.llama import apply_scaling, precompute_freqs_cis

pytestmark = pytest.mark.timeout(120)

VOCAB = 300


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=128)
    base.update(kw)
    return ModelArgs(**base)

def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: error relative to the largest logit."""
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- Hugging Face parity


def hf_config(llama3: bool):
    import transformers  # a test dependency: a missing install must fail, not skip
    dim, multiple_of = 64, 32
    if llama3:
        ours = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=1.3)
        extra = dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            rope_theta=500000.0,
            max_position_embeddings=256,
            # A small original context so that, at head_dim 16, some frequencies are kept, one is
            # interpolated and the rest are divided by the factor.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    else:
        ours = ModelArgs(dim=dim, multiple_of=multiple_of)
        extra = dict(num_hidden_layers=2, num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=128)
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=dim,
        intermediate_size=ffn_hidden_dim(ours),
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **extra,
    )


def build_pair(llama3: bool):
    """A randomly initialised HF model (from config only, nothing downloaded) and ours loaded from it."""
    import transformers  # a test dependency: a missing install must fail, not skip
    config = hf_config(llama3)
    torch.manual_seed(0)
    hf = randomize_(transformers.LlamaForCausalLM(config).float().eval(), seed=1)
    args = args_from_hf_config(config)
    ours = Transformer(args).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), args), strict=True)
    return hf, ours, args


@pytest.mark.parametrize("llama3", [False, True], ids=["llama2", "llama3.1"])
def test_hf_parity(llama3):
    hf, ours, args = build_pair(llama3)
    seq = 96 if llama3 else 48  # llama 3.1: beyond the 64-token "original" context
    tokens = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.float()
        got = ours(tokens)
    err = max_rel_err(got, ref)
    print(f"{'llama3.1' if llama3 else 'llama2'} max |ours - hf| / max |hf| = {err:.3e}")
    assert err <= 1e-5

    if llama3:
        assert args.use_scaled_rope and args.rope_old_context_len == 64 and args.n_kv_heads == 2
        # The scaling must actually matter at this size, else the test above proves nothing about it.
        plain = Transformer(ModelArgs(**{**args.__dict__, "use_scaled_rope": False})).eval()
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert max_rel_err(plain(tokens), ref) > 1e-2


@pytest.mark.parametrize("llama3", [False, True], ids=["llama2", "llama3.1"])
def test_hf_state_dict_round_trip(llama3):
    hf, ours, args = build_pair(llama3)
    sd = hf.state_dict()
    back = to_hf_state_dict(from_hf_state_dict(sd, args), args)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # and ours -> HF loads strictly
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)


def test_args_from_hf_config_ffn_conventions():
    """intermediate_size maps back to (multiplier, multiple_of) giving the same width."""
    from dist_llama.model.hf import _ffn_args

    for dim, hidden in [(4096, 11008), (5120, 13824), (4096, 14336), (8192, 28672), (16384, 53248), (64, 191)]:
        mult, multiple_of = _ffn_args(dim, hidden)
        assert ffn_hidden_dim(ModelArgs(dim=dim, ffn_dim_multiplier=mult, multiple_of=multiple_of)) == hidden
    assert _ffn_args(4096, 11008) == (None, 256)
    assert _ffn_args(4096, 14336)[0] == 1.3


# ---------------------------------------------------------------- RoPE


def meta_apply_scaling(freqs, scale_factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's reference loop (llama-models, models/llama3/model.py), parameterised."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype, device=freqs.device)


def test_apply_scaling_matches_meta_loop():
    for head_dim, old in [(128, 8192), (16, 64), (64, 1024)]:
        freqs = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        ours = apply_scaling(freqs, 8.0, 1.0, 4.0, old)
        assert torch.equal(ours, meta_apply_scaling(freqs, 8.0, 1.0, 4.0, old))
        assert not torch.equal(ours, freqs)
    f = precompute_freqs_cis(16, 10, 10000.0)
    assert f.shape == (10, 8, 2) and f.dtype == torch.float32


# ---------------------------------------------------------------- document masking


def test_document_mask_matches_separate_documents():
    torch.manual_seed(0)
    model = randomize_(Transformer(tiny_args(n_layers=3))).eval()
    rows = [[5, 7, 4], [9, 7]]  # document lengths per packed row, S = 16
    S = 16
    tokens = torch.randint(0, VOCAB, (len(rows), S))
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])

    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids, positions=positions)
        worst = 0.0
        for b, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                alone = model(tokens[b : b + 1, start : start + n])[0]
                worst = max(worst, max_rel_err(packed[b, start : start + n], alone))
                start += n
    print(f"packed vs separate documents: max rel err {worst:.3e}")
    assert worst <= 1e-5

    # Without the mask the documents would leak into each other: the check above is not vacuous.
    with torch.no_grad():
        leaky = model(tokens, positions=positions)
    assert max_rel_err(leaky[0, 5:12], packed[0, 5:12]) > 1e-2


def test_no_doc_ids_equals_single_document():
    torch.manual_seed(0)
    model = randomize_(Transformer(tiny_args())).eval()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        plain = model(tokens)
        one_doc = model(tokens, doc_ids=torch.zeros_like(tokens), positions=torch.arange(20).expand(2, 20))
    assert max_rel_err(one_doc, plain) <= 1e-6


# ---------------------------------------------------------------- construction and init


def test_meta_device_init():
    args = tiny_args(dim=128, n_heads=8, n_kv_heads=4, vocab_size=512, use_scaled_rope=True, rope_old_context_len=64)
    with torch.device("meta"):
        model = Transformer(args)
    assert model.freqs_cis.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(123)
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta, name
        assert torch.isfinite(t).all(), name
    assert "freqs_cis" not in model.state_dict()
    fresh = Transformer(args)
    assert torch.equal(model.freqs_cis, fresh.freqs_cis)
    assert model.freqs_cis.dtype == torch.float32 and model.freqs_cis.shape == (args.max_seq_len, 8, 2)

    def close(t, std, tol=0.15):
        return abs(t.std().item() / std - 1) < tol

    assert close(model.tok_embeddings.weight, 1.0)
    for i, layer in model.layers.items():
        depth_std = 0.02 / math.sqrt(2 * (int(i) + 1))
        assert close(layer.attention.wq.weight, 0.02) and close(layer.feed_forward.w1.weight, 0.02)
        assert close(layer.attention.wo.weight, depth_std) and close(layer.feed_forward.w2.weight, depth_std)
        assert close(layer.feed_forward.w3.weight, depth_std)
        assert torch.equal(layer.attention_norm.weight, torch.ones(args.dim))
    out_std = args.dim**-0.5
    assert close(model.output.weight, out_std) and model.output.weight.abs().max() <= 3 * out_std + 1e-6
    assert torch.equal(model.norm.weight, torch.ones(args.dim))

    again = Transformer(args)  # built on CPU: construction draws from the RNG, so seed after it
    torch.manual_seed(123)
    again.init_weights()
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    tokens = torch.randint(0, 512, (1, 8))
    assert torch.isfinite(model(tokens)).all()


def test_pipeline_stage_shape():
    """Layers deleted and embeddings/norm/output set to None: init and forward still work."""
    args = tiny_args(n_layers=4)
    model = Transformer(args)
    del model.layers["0"], model.layers["3"]
    model.tok_embeddings = None
    model.norm = None
    model.output = None
    model.init_weights()
    h = torch.randn(2, 10, args.dim)
    out = model(h)
    assert out.shape == (2, 10, args.dim)
    assert list(model.layers.keys()) == ["1", "2"]
    assert {k.split(".")[1] for k in model.state_dict()} == {"1", "2"}


def test_ffn_hidden_dim_reference_models():
    assert ffn_hidden_dim(ModelArgs(dim=4096, ffn_dim_multiplier=1.3, multiple_of=1024)) == 14336  # Llama 3 8B
    assert ffn_hidden_dim(ModelArgs(dim=8192, ffn_dim_multiplier=1.3, multiple_of=4096)) == 28672  # Llama 3 70B
    assert ffn_hidden_dim(ModelArgs(dim=16384, ffn_dim_multiplier=1.2, multiple_of=4096)) == 53248  # 405B
    assert ffn_hidden_dim(ModelArgs(dim=4096, ffn_dim_multiplier=None, multiple_of=256)) == 11008  # Llama 2 7B


def test_gqa_shapes_and_forward():
    args = tiny_args(n_heads=4, n_kv_heads=2)
    model = Transformer(args)
    attn = model.layers["0"].attention
    head_dim = args.dim // args.n_heads
    assert attn.wq.weight.shape == (4 * head_dim, args.dim)
    assert attn.wk.weight.shape == (2 * head_dim, args.dim)
    assert attn.wv.weight.shape == (2 * head_dim, args.dim)
    assert attn.wo.weight.shape == (args.dim, 4 * head_dim)
    tokens = torch.randint(0, VOCAB, (3, 12))
    logits = model(tokens)
    assert logits.shape == (3, 12, VOCAB) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_forward_returns_fp32_logits():
    model = Transformer(tiny_args()).bfloat16()
    tokens = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(AssertionError, match="init_buffers"):  # .bfloat16() cast the RoPE table too
        model(tokens)
    model.init_buffers()
    assert model.freqs_cis.dtype == torch.float32
    logits = model(tokens)
    assert logits.dtype == torch.float32
