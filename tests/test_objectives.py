"""The objective interface: a new objective is one module and one registry line. A label-smoothed
pretraining loss (tests/label_smoothing_objective.py) registered in the test trains on one rank and
on FSDP-2, and its first loss equals transformers-free plain PyTorch on the same weights and batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_llama.config.objectives import OBJECTIVES, ObjectiveSpec
from dist_llama.testing import run_ranks
from trainrun import DEBUG, TINY


def _first_loss(world_size: int, run_dir):
    import torch.distributed as dist

    from dist_llama.data import PackedLoader
    from dist_llama.model import Transformer
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, sources = resolve_config(DEBUG, [*TINY, "train.objective=label_smoothed", "checkpoint.enabled=false",
                                          "data.eval_fraction=0", f"train.run_dir={run_dir}"], world_size)
    trainer = build_trainer(cfg, init_distributed("cpu"), sources)
    loss, _ = trainer.compute_gradients(trainer.parts.loader.next_batch())
    trainer.close()
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank:
        return None
    model = Transformer(cfg.model)
    model.init_weights(cfg.train.seed)
    batch = PackedLoader(sources, cfg.data.seq_len, cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed).next_batch()
    with torch.no_grad():
        logits = model(batch["tokens"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.1)
    plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    return loss.item(), expected.item(), plain.item()


@pytest.mark.timeout(120)
def test_a_new_objective_is_one_module_and_one_registry_line(monkeypatch, tmp_path):
    monkeypatch.setitem(OBJECTIVES, "label_smoothed",
                        ObjectiveSpec("label_smoothed", "label_smoothing_objective:LabelSmoothed", None))
    for world in (1, 2):
        loss, expected, plain = run_ranks(_first_loss, world, world, tmp_path / str(world), timeout=100)[0]
        assert loss == pytest.approx(expected, rel=1e-5), world
        assert abs(loss - plain) > 1e-3  # the registered objective's loss (30x the tolerance), not pretraining's
