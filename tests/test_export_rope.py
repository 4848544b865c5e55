"""Export keeps the RoPE scaling and the context length a model was made for: Meta's params.json
round trip for scale factors 8 and 32 (and a high-frequency factor other than 4), judged by
transformers' logits on the original Hugging Face model; an original context Meta's format cannot
hold refused with exit 2 (and kept by the Hugging Face format); and `max_position_embeddings` of a
run started from an 8K or 16K Hugging Face model is that model's, not the run's training length."""

from __future__ import annotations

import json

import pytest
import torch

from sharp import randomize_
from trainrun import train

TOKENS = torch.randint(0, 258, (1, 96), generator=torch.Generator().manual_seed(11))


def _hf_model(path, factor: float, original: int, high: float = 4.0, max_positions: int = 512):
    """A random transformers Llama (the tiny test shape, byte vocabulary) with Llama 3.1 scaling,
    saved to `path`; returns its logits on TOKENS."""
    import transformers

    from dist_llama.model import ModelArgs, ffn_hidden_dim

    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=ffn_hidden_dim(ModelArgs(dim=64, multiple_of=32)),
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=False,
        attn_implementation="eager",
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                      "original_max_position_embeddings": original})
    torch.manual_seed(0)
    model = randomize_(transformers.LlamaForCausalLM(config).float().eval(), seed=5)
    model.save_pretrained(path, safe_serialization=True)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _our_logits(path) -> torch.Tensor:
    from dist_llama.generate import load_model
    from dist_llama.weights import open_weights

    with torch.no_grad():
        return load_model(open_weights(path), torch.device("cpu"), torch.float32)(TOKENS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("factor,high", [(8.0, 4.0), (32.0, 4.0), (32.0, 2.0)])
def test_meta_export_round_trip_keeps_the_rope_scaling(tmp_path, factor, high):
    """Meta's convention holds use_scaled_rope, rope_scaling_factor and rope_high_freq_factor (its
    code fixes the low-frequency factor at 1 and the original context at 8192): exported and read
    back, the model gives transformers' logits. The old export wrote use_scaled_rope alone, so
    factor 32 came back as 8."""
    from dist_llama.weights.export import main as export

    reference = _hf_model(tmp_path / "hf", factor, 8192, high)
    assert export(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "meta"), "--format", "meta"]) == 0
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True
    assert params["rope_scaling_factor"] == factor and params["rope_high_freq_factor"] == high
    ours = _our_logits(tmp_path / "meta")
    assert ((ours - reference).abs().max() / reference.abs().max()).item() <= 1e-5


@pytest.mark.timeout(120)
def test_an_original_context_meta_cannot_hold_is_refused_and_hf_keeps_it(tmp_path, capsys):
    """Original context 64: --format meta exits 2 naming rope_old_context_len and writes nothing;
    --format hf keeps it (transformers' logits from the export equal the source's)."""
    import transformers

    from dist_llama.weights.export import main as export

    reference = _hf_model(tmp_path / "hf", 8.0, 64)
    capsys.readouterr()  # transformers' progress bars
    assert export(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "meta"), "--format", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rope_old_context_len" in err and "64" in err, err
    assert not (tmp_path / "meta").exists()
    assert export(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling["original_max_position_embeddings"] == 64 and scaling["factor"] == 8.0
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=TOKENS).logits, reference, rtol=0, atol=1e-5)


@pytest.mark.timeout(240)
def test_exported_context_length_is_the_imported_models(tmp_path):
    """A run started (checkpoint.init_from) from 8K and 16K Hugging Face models trains at 64 tokens
    (model.max_seq_len 512); its export says max_position_embeddings 8192 and 16384, as the sources
    did (the old export wrote the run's 512, below the 8192 original context of the scaling); and a
    model trained from scratch with scaling exports at least its original context x factor."""
    from dist_llama.weights.export import main as export

    for positions in (8192, 16384):
        hf = tmp_path / f"hf{positions}"
        _hf_model(hf, 8.0, 32, max_positions=positions)
        run = tmp_path / f"run{positions}"
        train(1, f"checkpoint.init_from={hf}", f"train.run_dir={run}", "train.steps=1", "model.n_layers=2",
              "model.max_seq_len=512", "checkpoint.interval=1", "checkpoint.async_save=false")
        out = tmp_path / f"out{positions}"
        assert export(["--checkpoint", str(run), "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == positions

    run = tmp_path / "scratch"
    train(1, f"train.run_dir={run}", "train.steps=1", "model.n_layers=2", "model.use_scaled_rope=true",
          "model.rope_old_context_len=128", "model.max_seq_len=512", "checkpoint.interval=1",
          "checkpoint.async_save=false")
    assert export(["--checkpoint", str(run), "--out", str(tmp_path / "out_scratch")]) == 0
    config = json.loads((tmp_path / "out_scratch" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 * 8 == config["rope_scaling"]["original_max_position_embeddings"] * 8
