"""torch.compile on CPU: a transformer block is one graph with no complex tensors in it (Inductor
generates no code for complex ones and runs them eagerly), and compiled training (Inductor's C++
backend) follows the eager losses."""

import pytest
import torch

from dist_llama.model import ModelArgs, Transformer
from dist_llama.model.llama import build_attention_mask

from trainrun import train


def _complex_values(gm: torch.fx.GraphModule) -> list[str]:
    values = [(n, n.meta.get("example_value")) for n in gm.graph.nodes]
    return [n.name for n, v in values if isinstance(v, torch.Tensor) and v.is_complex()]


@pytest.mark.timeout(60)
def test_block_is_one_graph_without_complex_values():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    block = model.layers["0"]
    B, S = 2, 32
    x = torch.randn(B, S, args.dim)
    # What the CPU training path passes: two documents in row 0 with restarting positions, SDPA's
    # boolean document mask.
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(22)]), torch.arange(32)])
    mask = build_attention_mask(doc_ids, S, x.device, "sdpa")
    freqs = model.freqs_cis[positions]

    explained = torch._dynamo.explain(block)(x, freqs, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(block, backend=record)(x, freqs, mask)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert _complex_values(graphs[0]) == []
    assert torch.allclose(out, block(x, freqs, mask))


@pytest.mark.timeout(420)
def test_compiled_training_on_cpu_matches_eager(tmp_path, monkeypatch):
    """One rank, the tiny model, 2 steps: Inductor's C++ kernels against eager, loss by loss."""
    import torch._inductor.config

    # The forked rank inherits it: on 2 cores a pool of compile workers costs more than it saves.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    common = ["train.steps=2", "checkpoint.enabled=false", "health.spike_min_history=2"]
    eager, _ = train(1, *common, f"train.run_dir={tmp_path}/eager", "train.compile=false")
    compiled, _ = train(1, *common, f"train.run_dir={tmp_path}/compiled", "train.compile=true", timeout=400)
    assert len(compiled) == len(eager) == 2
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled, eager)
