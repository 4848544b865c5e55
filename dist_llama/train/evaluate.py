"""Validation: the loss on held-out data, per source and overall, every `train.eval_interval` steps.

The batches are the first windows of each held-out source (dist_llama.data.heldout), laid out in
the shape of the step just trained (its seq_len and global batch, this rank's rows of each); the
step strategy runs them forward only (`StepStrategy.evaluate`), so every layout, the pipeline
included, computes the same sums. Nothing here touches the training loader, the RNG or the
gradients: a run computes the same training losses with validation on or off.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dist_llama.data.heldout import eval_batches
from dist_llama.data.loader import Source


class Evaluator:
    def __init__(self, sources: Sequence[Source] = (), interval: int = 0, total_steps: int = 0, tokens: int = 0,
                 reset_positions: bool = True, dp_rank: int = 0, dp_size: int = 1,
                 device: torch.device = torch.device("cpu"), loss_mask: bool = False):
        """sources: the held-out sources (none: never due); interval: steps between validations
        (0: never); tokens: input tokens read per source per validation; loss_mask: count the
        assistant tokens of chat data only (sft)."""
        self.sources = list(sources)
        self.interval, self.total_steps, self.tokens = interval, total_steps, tokens
        self.reset_positions, self.loss_mask = reset_positions, loss_mask
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device
        self._batches: dict[tuple[str, int, int], list[dict]] = {}
        """This rank's batches by (source, seq_len, global batch): read once, the same every time."""

    def due(self, step: int) -> bool:
        """Whether to validate after `step` (every interval, and at the last step)."""
        return bool(self.sources) and self.interval > 0 and (step % self.interval == 0 or step == self.total_steps)

    def batches(self, source: Source, seq_len: int, global_batch_size: int) -> list[dict]:
        key = (source.name, seq_len, global_batch_size)
        if key not in self._batches:
            self._batches[key] = [{k: v.to(self.device) for k, v in b.items()} for b in eval_batches(
                source.data, seq_len, global_batch_size, self.dp_rank, self.dp_size, self.tokens,
                self.reset_positions, self.loss_mask)]
        return self._batches[key]

    def evaluate(self, step, seq_len: int, global_batch_size: int) -> dict:
        """step: the StepStrategy (train/step.py; not imported: objectives choose their evaluator).
        {val_loss: mean over every counted held-out token, val_loss_by_source: {name: mean}}. Collective."""
        sums = {}
        for source in self.sources:
            loss, count = 0.0, 0
            for batch in self.batches(source, seq_len, global_batch_size):
                batch_loss, batch_count = step.evaluate(batch)
                loss, count = loss + batch_loss, count + batch_count
            sums[source.name] = (loss, count)
        total, counted = sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())
        return {"val_loss": total / max(counted, 1),
                "val_loss_by_source": {name: loss / max(count, 1) for name, (loss, count) in sums.items()}}
