"""Direct preference optimisation (train.objective=dpo): its loss, data and frozen reference.

Each row of a batch is one preference pair (dist_llama.data.pairs): the chosen sequence (doc_ids
0), then the rejected one (doc_ids 1); labels are -100 except on the responses' tokens. Per pair,

    loss = -log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
           + nll_coef · (−log π(y_w|x) / |y_w|)

with sequence log-probabilities summed over the counted response tokens; the step's loss is the
mean over the global batch's pairs (layout-invariant as the token mean of pretraining: the ranks
agree on the pair count, and each pair's loss is scaled by dp / pairs). The reference π_ref is a
frozen copy of the starting weights (checkpoint.init_from, or the seed's initialisation), built
and sharded like the policy, with no gradients, no optimizer state, and never checkpointed; or,
with train.dpo.reference=precomputed, no model at all: the batch carries the reference's log-probs
of each pair (``ref_logps`` [B, 2], computed once before training: train/dpo_reference.py).

Under tensor parallelism the logits are vocab-sharded DTensors: the per-token cross-entropy runs
under loss parallel (no vocab all-gather) and yields a replicated DTensor, of which each rank takes
its (identical) local copy; the backward through that copy is the replicated gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.parallel.tensor import loss_parallel_context
from dist_llama.train.objectives.base import IGNORE_INDEX, BuildContext, Objective, StartContext

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


class DPO(Objective):
    """Micro-batches of pairs through the frozen reference (no grad; or its log-probs from the
    batch, train.dpo.reference=precomputed) and the policy; the loss is the mean over the global
    batch's pairs, and the metrics are reward statistics (means over the global batch's pairs)."""

    metric_names = METRICS

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        settings = cfg.train.dpo
        self.beta, self.nll_coef, self.precomputed = settings.beta, settings.nll_coef, settings.reference == "precomputed"
        self.reference: nn.Module | None = None

    def loader(self, sources: list, dp_rank: int, dp_size: int):
        from dist_llama.data.pairs import PairLoader

        cfg = self.cfg
        (source,) = sources
        return PairLoader(source.data, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size,
                          seed=cfg.train.seed, mask_special=cfg.train.dpo.mask_special, name=source.name)

    def build_extra(self, ctx: BuildContext) -> None:
        if not self.precomputed:
            self.reference = freeze(ctx.build_starting_model())

    def start(self, ctx: StartContext) -> None:
        if not self.precomputed:
            return
        from dist_llama.train.dpo_reference import reference_table

        # Before a resume is loaded the policy holds the starting weights: it is the reference.
        start = (lambda: ctx.step.engine.parts[0]) if not ctx.resumed else (lambda: freeze(ctx.build_starting_model()))
        ctx.loader.reference = reference_table(self.cfg, ctx.step, self, ctx.loader, ctx.run_dir, ctx.rank, start,
                                               ctx.logger)

    def count(self, batch: dict) -> torch.Tensor:
        """The pairs (rows): the loss is their mean."""
        return torch.tensor(len(batch["tokens"]), device=batch["tokens"].device)

    def _pairs(self, step, model: nn.Module, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with step.autocast():
            logits = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"])
        with torch.autocast(step.device.type, enabled=False):
            return pair_logps(logits, mb["labels"], mb["doc_ids"])

    @torch.no_grad()
    def sequence_logps(self, step, model: nn.Module, batch: dict) -> torch.Tensor:
        """[B, 2] log-probabilities of each row's chosen and rejected response under `model`,
        computed as the step computes the reference's (micro-batches, autocast, loss parallel)."""
        with loss_parallel_context(step.tp > 1):
            return torch.cat([self._pairs(step, model, mb)[0] for mb in step.micro_batches(batch)])

    def micro_loss(self, step, model: nn.Module, mb: dict) -> torch.Tensor:
        if self.reference is None:
            ref = mb["ref_logps"]
        else:
            with torch.no_grad():
                ref, _ = self._pairs(step, self.reference, mb)
        policy, counts = self._pairs(step, model, mb)
        loss, rewards = dpo_loss(policy, ref, counts, self.beta, self.nll_coef)
        margin = rewards[:, 0] - rewards[:, 1]
        self.stats += torch.stack([(margin > 0).float().sum(), rewards[:, 0].sum(), rewards[:, 1].sum(),
                                   margin.sum()])
        return loss.sum() * step.scale

    def synthetic_batch(self, rows: int, seq: int, device: torch.device) -> dict:
        batch = super().synthetic_batch(rows, seq, device)
        if self.precomputed:
            batch["ref_logps"] = torch.zeros(rows, 2, device=device)  # what the loader adds to each pair
        return batch


def freeze(reference: nn.Module) -> nn.Module:
    """The reference model: no gradients (so no optimizer state) and eval mode."""
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference.eval()
