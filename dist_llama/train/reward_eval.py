"""Validation on held-out preference pairs (train.objective=reward with data.eval_sources): every
pair of the held-out dataset, in order, in global batches of the step's shape; the last batch's
missing rows are copies of its first row with weight 0, so they add nothing and do not count.
Forward only through the step strategy (`StepStrategy.evaluate`), as validation of any objective:
the training losses are the same with it on or off."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dist_llama.data.pairs import ScoredPairLoader


class PairEvaluator:
    def __init__(self, sources: list, cfg, dp_rank: int, dp_size: int, device):
        """ValueError (naming the file and line) when a held-out pair does not fit data.seq_len."""
        self.interval, self.total_steps = cfg.train.eval_interval, cfg.train.steps
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device
        self.loaders = [ScoredPairLoader(s.data, cfg.data.seq_len, 1, 0, 1, margin=cfg.train.reward.margin, name=s.name)
                        for s in sources]
        self._batches: dict[int, list[dict]] = {}

    def due(self, step: int) -> bool:
        return bool(self.loaders) and self.interval > 0 and (step % self.interval == 0 or step == self.total_steps)

    def batches(self, global_batch_size: int) -> list[dict]:
        """This rank's rows of every global batch over all held-out pairs (read once)."""
        if global_batch_size not in self._batches:
            local = global_batch_size // self.dp_size
            out = []
            for loader in self.loaders:
                n = loader.n_pairs
                for first in range(0, n, global_batch_size):
                    ids = first + self.dp_rank * local + np.arange(local)
                    rows = [dict(loader.row(int(k) if k < n else first), weight=np.float32(k < n)) for k in ids]
                    out.append({key: torch.from_numpy(np.stack([r[key] for r in rows])).to(self.device)
                                for key in rows[0]})
            self._batches[global_batch_size] = out
        return self._batches[global_batch_size]

    def evaluate(self, step, seq_len: int, global_batch_size: int) -> dict:
        """{val_loss, val_accuracy}: means over every held-out pair. Collective."""
        objective = step.objective
        total, count, correct = 0.0, 0, 0.0
        for batch in self.batches(global_batch_size):
            loss, n = step.evaluate(batch)
            stats = objective.stats.clone()
            dist.all_reduce(stats, group=step.dp_group)  # tensor-parallel ranks hold the same values
            total, count, correct = total + loss, count + n, correct + float(stats[0])
        return {"val_loss": total / max(count, 1), "val_accuracy": correct / max(count, 1)}
