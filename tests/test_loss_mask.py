"""The loss is the mean over the counted label tokens of the global batch (labels of -100 don't
count), the same on every layout: against a plain PyTorch cross-entropy on one process, and against
the closed form ln(vocab) when the output layer is zero (every counted token then costs ln V)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainrun import DEBUG, TINY
from dist_llama.testing import run_ranks


def _mask(batch: dict) -> dict:
    """Drop about a third of the labels, unevenly across sequences and ranks (it follows the text)."""
    labels = torch.where(batch["tokens"] % 3 == 0, torch.full_like(batch["labels"], -100), batch["labels"])
    return {**batch, "labels": labels}


def _masked_losses(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.data import PackedLoader
    from dist_llama.model import Transformer
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config(DEBUG, [*TINY, "checkpoint.enabled=false", *overrides], world_size)
    trainer = build_trainer(cfg, init_distributed("cpu"), dataset)
    batch = _mask(trainer.parts.loader.next_batch())
    loss, _ = trainer.compute_gradients(batch)
    trainer.engine.discard()
    with torch.no_grad():
        for part in trainer.engine.parts:
            if getattr(part, "output", None) is not None:
                part.output.weight.zero_()
    zero_output_loss, _ = trainer.compute_gradients(batch)
    trainer.close()
    out = {"loss": loss.item(), "zero_output_loss": zero_output_loss.item(), "vocab": cfg.model.vocab_size}
    if dist.get_rank() == 0:  # the reference: plain PyTorch on the whole global batch, one process
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
        model.init_weights(cfg.train.seed)
        full = _mask(PackedLoader(dataset, cfg.data.seq_len, cfg.train.global_batch_size, 0, 1,
                                  seed=cfg.train.seed).next_batch())
        with torch.no_grad():
            logits = model(full["tokens"], doc_ids=full["doc_ids"], positions=full["positions"]).flatten(0, 1)
        labels = full["labels"].flatten()
        out["reference"] = F.cross_entropy(logits, labels, ignore_index=-100).item()
        out["sum_over_all_tokens"] = (F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                                      / labels.numel()).item()
        out["counted"] = int((labels != -100).sum())
        out["tokens"] = labels.numel()
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size,layout", [
    (1, []),
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=gpipe"]),
], ids=["1rank", "fsdp2", "tp2", "pp2"])
def test_masked_labels_give_the_mean_over_counted_tokens(world_size, layout):
    results = run_ranks(_masked_losses, world_size, layout, world_size, timeout=200)
    ref = results[0]
    assert 0.5 * ref["tokens"] < ref["counted"] < 0.9 * ref["tokens"]  # the mask drops a real share
    assert abs(ref["reference"] - ref["sum_over_all_tokens"]) > 0.1  # ... so the normalisation matters
    for r in results:  # every rank agrees on the global loss
        assert r["loss"] == pytest.approx(ref["reference"], rel=1e-5)
        assert r["zero_output_loss"] == pytest.approx(math.log(r["vocab"]), rel=1e-6)
