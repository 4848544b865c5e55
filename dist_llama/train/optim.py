"""AdamW with the Llama recipe, linear warmup then cosine decay, and global-norm gradient clipping."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def build_optimizer(model: nn.Module, optim) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings only: decaying norm gains toward 0 only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             foreach=True)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step numbered `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScaledLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose factor is multiplied by `scale` (rollbacks may lower it). The scale is part
    of state_dict(), so a resumed run keeps it."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda):
        self.scale = 1.0
        super().__init__(optimizer, lr_lambda)

    def get_lr(self) -> list[float]:
        return [base_lr * (lmbda(self.last_epoch) * self.scale)
                for lmbda, base_lr in zip(self.lr_lambdas, self.base_lrs)]

    def rescale(self, factor: float) -> None:
        """Multiply the scale by `factor` from the next optimizer step on: the optimizer's LR is set
        now, not at the next scheduler.step(), which would be one step late."""
        self.scale *= factor
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int,
                    anneal_start: Optional[int] = None) -> ScaledLambdaLR:
    """Warmup + cosine; from the (0-based) step `anneal_start` on, linearly from the LR of that step
    to 0 after the last step (data.anneal_tokens: Llama 3's final annealing)."""
    decay_steps = optim.decay_steps or total_steps

    def factor(step: int) -> float:
        if anneal_start is None or step < anneal_start:
            return lr_factor(step, optim.warmup_steps, decay_steps, optim.min_lr_ratio)
        at_start = lr_factor(anneal_start, optim.warmup_steps, decay_steps, optim.min_lr_ratio)
        return at_start * max(0, total_steps - step) / (total_steps - anneal_start)

    return ScaledLambdaLR(optimizer, factor)


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter], pp_group=None) -> torch.Tensor:
    """The L2 norm over all ranks' gradients of `params`.

    With FSDP / TP the gradients are DTensors and full_tensor() reduces over their shards; pipeline
    stages hold disjoint parameters, so their squared norms add up over the pp group.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None:
        norm = norm**2
        dist.all_reduce(norm, group=pp_group)
        norm = norm.sqrt()
    return norm


@torch.no_grad()
def clip_grads_with_norm_(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip to the norm over all ranks' gradients; returns that norm (before clipping)."""
    norm = global_grad_norm(params, pp_group)
    if max_norm > 0:
        clip_grads_with_norm_(params, max_norm, norm)
    return norm


class Schedulers:
    """Every model part's scheduler, saved as one: they step together, so their states are equal."""

    def __init__(self, schedulers: list[ScaledLambdaLR]):
        self.schedulers = schedulers

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state)
