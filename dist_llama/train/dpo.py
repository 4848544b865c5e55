"""Direct preference optimisation (train.objective=dpo): the step strategy and its loss.

Each row of a batch is one preference pair (dist_llama.data.pairs): the chosen sequence (doc_ids
0), then the rejected one (doc_ids 1); labels are -100 except on the responses' tokens. Per pair,

    loss = -log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
           + nll_coef · (−log π(y_w|x) / |y_w|)

with sequence log-probabilities summed over the counted response tokens; the step's loss is the
mean over the global batch's pairs (layout-invariant as the token mean of pretraining: the ranks
agree on the pair count, and each pair's loss is scaled by dp / pairs). The reference π_ref is a
frozen copy of the starting weights (checkpoint.init_from, or the seed's initialisation), built
and sharded like the policy, with no gradients, no optimizer state, and never checkpointed; or,
with train.dpo_reference=precomputed, no model at all: the batch carries the reference's log-probs
of each pair (``ref_logps`` [B, 2], computed once before training: train/dpo_reference.py).

Under tensor parallelism the logits are vocab-sharded DTensors: the per-token cross-entropy runs
under loss parallel (no vocab all-gather) and yields a replicated DTensor, of which each rank takes
its (identical) local copy; the backward through that copy is the replicated gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.parallel.tensor import loss_parallel_context
from dist_llama.train.step import IGNORE_INDEX, Batch, MicroBatchStep

CHOSEN, REJECTED = 0, 1
"""doc_ids of a row's two sequences (dist_llama.data.pairs)."""
METRICS = ("reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of each position [B, S] in fp32, 0 where the label is IGNORE_INDEX; for plain
    logits or vocab-sharded DTensor logits (inside `loss_parallel()`, backward too)."""
    B, S = labels.shape
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    if isinstance(nll, DTensor):  # replicated: every tensor-parallel rank holds the same values
        nll = nll.to_local()
    return -nll.view(B, S)


def pair_logps(logits: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence log-probabilities [B, 2], counted tokens [B, 2]) of each row's chosen and rejected response."""
    lp = token_logps(logits, labels)
    counted = labels != IGNORE_INDEX
    sides = [(doc_ids == side) & counted for side in (CHOSEN, REJECTED)]
    return (torch.stack([(lp * m).sum(1) for m in sides], 1),
            torch.stack([m.sum(1) for m in sides], 1).to(lp.dtype))


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
             nll_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss [B], per-pair rewards [B, 2]) from sequence log-probabilities [B, 2]."""
    rewards = beta * (policy - reference)
    loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    if nll_coef:
        loss = loss - nll_coef * policy[:, 0] / counts[:, 0].clamp(min=1)
    return loss, rewards.detach()


class DPOStep(MicroBatchStep):
    """Micro-batches of pairs through the frozen reference (no grad; or its log-probs from the
    batch when `reference` is None) and the policy; the loss is the mean over the global batch's
    pairs. `metrics` holds the last step's reward statistics (means over the global batch), reduced
    with the loss."""

    def __init__(self, *args, micro_batch_size: int = -1, reference: nn.Module | None, beta: float,
                 nll_coef: float = 0.0):
        super().__init__(*args, micro_batch_size=micro_batch_size)
        self.reference, self.beta, self.nll_coef = reference, beta, nll_coef
        self._stats = torch.zeros(len(METRICS), device=self.device)
        self.metrics: dict[str, float] = {}

    def count_tokens(self, batch: Batch) -> torch.Tensor:
        """The global number of pairs (rows): the loss is their mean."""
        count = torch.tensor(len(batch["tokens"]), device=batch["tokens"].device)
        dist.all_reduce(count, group=self.dp_group)
        return count

    def _pairs(self, model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"])
        with torch.autocast(self.device.type, enabled=False):
            return pair_logps(logits, mb["labels"], mb["doc_ids"])

    @torch.no_grad()
    def sequence_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """[B, 2] log-probabilities of each row's chosen and rejected response under `model`,
        computed as the step computes the reference's (micro-batches, autocast, loss parallel)."""
        with loss_parallel_context(self.tp > 1):
            return torch.cat([self._pairs(model, mb)[0] for mb in self._micro_batches(batch)])

    def _micro_loss(self, model: nn.Module, mb: Batch) -> torch.Tensor:
        if self.reference is None:
            ref = mb["ref_logps"]
        else:
            with torch.no_grad():
                ref, _ = self._pairs(self.reference, mb)
        policy, counts = self._pairs(model, mb)
        loss, rewards = dpo_loss(policy, ref, counts, self.beta, self.nll_coef)
        margin = rewards[:, 0] - rewards[:, 1]
        self._stats += torch.stack([(margin > 0).float().sum(), rewards[:, 0].sum(), rewards[:, 1].sum(),
                                    margin.sum()])
        return loss.sum() * self.scale

    def _run(self, batch: Batch) -> torch.Tensor:
        self._stats.zero_()
        return super()._run(batch)

    def _forward(self, batch: Batch) -> torch.Tensor:
        self._stats.zero_()
        return super()._forward(batch)

    def global_loss(self, local: torch.Tensor, n_tokens: int) -> torch.Tensor:
        stats = self._stats.clone()
        dist.all_reduce(stats, group=self.dp_group)  # tensor-parallel ranks hold the same values
        self.metrics = dict(zip(METRICS, (stats / max(n_tokens, 1)).tolist()))
        return super().global_loss(local, n_tokens)


def freeze(reference: nn.Module) -> nn.Module:
    """The reference model: no gradients (so no optimizer state) and eval mode."""
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference.eval()
