"""The interface of training objectives: what an objective decides, and nothing else. The step strategy
runs the micro-batches and the engine the gradients; an objective says what data it reads (its
loader), what else it needs built (a frozen reference model), what one micro-batch's loss is and
what the loss is averaged over, which metrics it reports, and the batch the planner steps with.

The loss of a step is the mean of per-item losses (tokens, or pairs) over the global batch: the
ranks agree on the count of items first (`count`, summed over the data-parallel group by the step),
and `micro_loss` returns its micro-batch's summed loss times `step.scale` (dp x cp / count)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

IGNORE_INDEX = -100
"""Labels with this value are not predicted (prompt tokens, padding): they add no loss and don't count."""


@dataclass
class BuildContext:
    """What an objective may use while the trainer is built (train/build.py makes it)."""

    device: torch.device
    build_starting_model: Callable[[], nn.Module]
    """A new copy of the starting weights (checkpoint.init_from, or the seed's initialisation),
    parallelised and sharded like the policy."""
    fake_mode: Any = None
    """The planner's FakeTensorMode, when building for its memory dry run."""
    build_model: Optional[Callable[..., nn.Module]] = None
    """build_model(init_from, **model_args): a model built and sharded like the policy, with those
    ModelArgs fields changed (score_head=True: a reward or value model), from the weights at
    init_from (a path; empty: the seed's initialisation)."""


@dataclass
class StartContext:
    """What an objective may use once the engine, step and loader exist, before the first step."""

    step: Any
    loader: Any
    run_dir: Any
    rank: int
    logger: Any
    resumed: bool
    """Whether a checkpoint will be loaded: the policy then no longer holds the starting weights."""
    build_starting_model: Callable[[], nn.Module]


class Objective:
    """Pretraining's choices; other objectives override what differs."""

    metric_names: tuple[str, ...] = ()
    """Metrics the objective adds to each step record (means over the global batch's items)."""
    loss_mask: bool = False
    """Whether labels of prompt tokens are ignored (chat data's mask)."""

    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec
        self.stats: Optional[torch.Tensor] = None
        """Sums of metric_names over this rank's items of the step (filled by micro_loss)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def loader(self, sources: list, dp_rank: int, dp_size: int):
        """This data-parallel rank's loader of the sources (a BatchLoader)."""
        from dist_llama.config.data_plan import stages_of
        from dist_llama.data.loader import PackedLoader, Stage

        cfg = self.cfg
        stages = [Stage(st.seq_len, st.global_batch_size, st.weights, st.until_tokens) for st in stages_of(cfg)]
        return PackedLoader(sources, cfg.data.seq_len, cfg.train.global_batch_size, dp_rank, dp_size,
                            seed=cfg.train.seed, reset_positions=cfg.data.reset_positions, stages=stages,
                            loss_mask=self.loss_mask)

    def check_inputs(self, tokenizer) -> None:
        """Checks of its own inputs before any process group (ConfigError naming the key: exit 2)."""

    def build_extra(self, ctx: BuildContext) -> None:
        """Build model parts beside the policy (before it, so its seeding is unchanged)."""

    def start(self, ctx: StartContext) -> None:
        """Work before the first step (after the loader exists)."""

    def trained_parts(self) -> list[tuple[nn.Module, Any]]:
        """Models build_extra made that train beside the policy, each with the optim settings of its
        own optimizer: the engine holds them after the policy (checkpointed with it)."""
        return []

    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        """The step's gradients into the engine (the step strategy's micro-batches through
        micro_loss); returns this rank's scaled loss share. An objective with a loop of its own
        (PPO's iteration) replaces it."""
        return step._run(batch)

    def count(self, batch: dict) -> torch.Tensor:
        """This rank's number of items the loss is averaged over: counted label tokens."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def micro_loss(self, step, model: nn.Module, mb: dict) -> torch.Tensor:
        """One micro-batch's scaled summed loss (the step's token loss: chunked, loss parallel)."""
        with step.autocast():
            out = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"], **step.model_kwargs())
        return step.loss(out, mb["labels"])

    def summarize(self, stats: torch.Tensor, n_items: int) -> dict:
        """The step's metrics from the global sums of metric_names: their means over the items."""
        return dict(zip(self.metric_names, (stats / max(n_items, 1)).tolist()))

    def evaluator(self, held_out: list, dp_rank: int, dp_size: int, device: torch.device):
        """Validation on the held-out sources (train/evaluate.py: the loss on their first windows)."""
        from dist_llama.train.evaluate import Evaluator

        cfg = self.cfg
        return Evaluator(held_out, cfg.train.eval_interval, cfg.train.steps, cfg.train.eval_tokens,
                         cfg.data.reset_positions, dp_rank, dp_size, device, loss_mask=self.loss_mask)

    def reset(self, device: torch.device) -> None:
        """A new step (or evaluation) begins: its metric sums start at zero."""
        if self.metric_names:
            self.stats = torch.zeros(len(self.metric_names), device=device)

    def synthetic_batch(self, rows: int, seq: int, device: torch.device) -> dict:
        """A batch of this shape for the planner's memory dry run (memory depends on shapes only)."""
        zeros = torch.zeros(rows, seq, dtype=torch.long, device=device)
        return {"tokens": zeros, "labels": zeros.clone(), "doc_ids": zeros.clone(),
                "positions": torch.arange(seq, device=device).expand(rows, seq).contiguous()}
