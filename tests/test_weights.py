"""Weights in: checkpoint.init_from from a Hugging Face directory (sharded safetensors), a Meta
original directory (one file, or two model-parallel shards) and a dist_llama checkpoint, into every
layout; checked against transformers' own loss on the same batch, and every bad input exits 2
naming the key or file before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from dist_llama.testing import run_ranks
from sharp import randomize_
from trainrun import DEBUG, TINY

# The tiny model of the layout tests, with Llama 3.1 RoPE scaling (an original context of 32 so that
# the 64-token sequences go beyond it) and the byte tokenizer's vocabulary.
MODEL = ["model.use_scaled_rope=true", "model.rope_old_context_len=32", "model.rope_theta=10000"]


def hf_llama():
    import transformers

    from dist_llama.model import ModelArgs, ffn_hidden_dim

    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=ffn_hidden_dim(ModelArgs(dim=64, multiple_of=32)),
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="eager",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    return randomize_(transformers.LlamaForCausalLM(config).float().eval(), seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_llama().save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()  # sharded: the index is read
    return path


def hf_loss(hf_dir, batch) -> float:
    """transformers' mean cross-entropy on a packed batch: its own model, loaded by itself, with
    the same document mask (a 4-D additive mask) and positions."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    doc = batch["doc_ids"]
    seq = doc.shape[1]
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"], attention_mask=mask[:, None], position_ids=batch["positions"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100).item()


def _first_loss(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.data import PackedLoader
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config(DEBUG, [*TINY, *MODEL, *overrides], world_size)
    trainer = build_trainer(cfg, init_distributed("cpu"), dataset)
    loss, _ = trainer.compute_gradients(trainer.p.loader.next_batch())
    events = [e["event"] for e in trainer.logger.events] if hasattr(trainer.logger, "events") else None
    trainer.close()
    full = PackedLoader(dataset, cfg.data.seq_len, cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed).next_batch()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return loss.item(), full if rank == 0 else None, events


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,layout", [
    (1, []),
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"]),
    (2, ["parallel.dp_shard=2", "train.meta_init=true"]),
    (4, ["parallel.dp_shard=2", "parallel.tp=2", "train.meta_init=true"]),
], ids=["1rank", "fsdp2", "tp2", "pp2", "fsdp2_meta", "fsdp2_tp2_meta"])
def test_init_from_hugging_face_gives_transformers_loss(hf_dir, tmp_path, world, layout):
    results = run_ranks(_first_loss, world, [f"train.run_dir={tmp_path}", f"checkpoint.init_from={hf_dir}",
                                             "checkpoint.enabled=false", *layout], world, timeout=200)
    loss, batch, _ = results[0]
    reference = hf_loss(hf_dir, batch)
    for rank_loss, _, _ in results:
        assert rank_loss == pytest.approx(reference, rel=1e-5), (rank_loss, reference)
