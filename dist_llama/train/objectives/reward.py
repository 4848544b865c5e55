"""Reward models (train.objective=reward), as Llama 2 and Llama 3 trained them.

The model is the Llama backbone with a scalar `score` head in place of the output projection
(transformers' LlamaForSequenceClassification); a sequence's reward r(x, y) is the score at its
last token, the end-of-turn token that closes the response. Each row of a batch is one preference
pair (data/pairs.py ScoredPairLoader: chosen then rejected, each attending only to itself), and

    loss = −log σ(r(x, y_c) − r(x, y_r) − m)

per pair, the mean over the global batch's pairs (layout-invariant: the ranks agree on the pair
count, as for DPO). The margin m is 0 (Llama 3), Llama 2's m(r) from the pair's rating (small or
large table, train.reward.margin) or the record's own. Started from a language model
(checkpoint.init_from), the head is new (initialised from the seed) and everything else loaded.

Metrics are means over the global batch's pairs: accuracy (r_c > r_r), the mean rewards of the
chosen and rejected responses and their mean difference; and accuracy per rating (Llama 2 reports
it that way, Table 8) over the pairs of that rating in the batch. Validation on held-out pairs
(data.eval_sources) reports val_loss and val_accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_llama.train.objectives.base import Objective

SUMS = ("accuracy", "reward_chosen", "reward_rejected", "reward_margin")
"""Per-pair statistics whose global mean each step reports."""


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Llama 2's binary ranking loss per pair: −log σ(r_c − r_r − m)."""
    return -F.logsigmoid(chosen - rejected - margin)


class Reward(Objective):
    """Pairs through the score-head model once each; the loss is the ranking loss's mean over the
    global batch's pairs."""

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        from dist_llama.data.preference import RATING_KEYS

        self.rating_keys = RATING_KEYS
        # Per rating: correct pairs, then pairs; summed like the rest, divided by their own count.
        self.metric_names = (*SUMS, *(f"_correct/{k}" for k in RATING_KEYS), *(f"_pairs/{k}" for k in RATING_KEYS))

    def loader(self, sources: list, dp_rank: int, dp_size: int):
        from dist_llama.data.pairs import ScoredPairLoader

        cfg = self.cfg
        (source,) = sources
        return ScoredPairLoader(source.data, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size,
                                seed=cfg.train.seed, margin=cfg.train.reward.margin, name=source.name)

    def evaluator(self, held_out: list, dp_rank: int, dp_size: int, device: torch.device):
        from dist_llama.train.reward_eval import PairEvaluator

        return PairEvaluator(held_out, self.cfg, dp_rank, dp_size, device)

    def count(self, batch: dict) -> torch.Tensor:
        """The pairs (rows; held-out batches mark their padding rows with weight 0)."""
        if "weight" in batch:
            return batch["weight"].sum().long()
        return torch.tensor(len(batch["tokens"]), device=batch["tokens"].device)

    def rewards(self, step, model: nn.Module, mb: dict) -> torch.Tensor:
        """fp32 [B, 2]: the rewards of each row's chosen and rejected sequence."""
        with step.autocast():
            scores = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"])
        return scores.float().reshape(scores.shape[0], scores.shape[1]).gather(1, mb["ends"])

    def micro_loss(self, step, model: nn.Module, mb: dict) -> torch.Tensor:
        r = self.rewards(step, model, mb)
        with torch.autocast(step.device.type, enabled=False):
            loss = ranking_loss(r[:, 0], r[:, 1], mb["margin"].float())
            weight = mb["weight"].float() if "weight" in mb else torch.ones_like(loss)
            rd = r.detach()
            correct = (rd[:, 0] > rd[:, 1]).float() * weight
            buckets = F.one_hot(mb["rating"].clamp(min=0), len(self.rating_keys)).float() \
                * (mb["rating"] >= 0).float().unsqueeze(1) * weight.unsqueeze(1)
            self.stats += torch.cat([torch.stack([correct.sum(), (rd[:, 0] * weight).sum(), (rd[:, 1] * weight).sum(),
                                                  ((rd[:, 0] - rd[:, 1]) * weight).sum()]),
                                     (buckets * correct.unsqueeze(1)).sum(0), buckets.sum(0)])
            return (loss * weight).sum() * step.scale

    def summarize(self, stats: torch.Tensor, n_items: int) -> dict:
        """Means over the pairs; per rating over that rating's pairs (ratings absent from the batch left out)."""
        n = len(SUMS)
        k = len(self.rating_keys)
        out = dict(zip(SUMS, (stats[:n] / max(n_items, 1)).tolist()))
        correct, pairs = stats[n : n + k].tolist(), stats[n + k :].tolist()
        out.update({f"accuracy/{key}": c / p for key, c, p in zip(self.rating_keys, correct, pairs) if p})
        return out

    def synthetic_batch(self, rows: int, seq: int, device: torch.device) -> dict:
        batch = super().synthetic_batch(rows, seq, device)
        batch.update(ends=torch.zeros(rows, 2, dtype=torch.long, device=device),
                     margin=torch.zeros(rows, device=device), rating=torch.zeros(rows, dtype=torch.long, device=device))
        return batch
