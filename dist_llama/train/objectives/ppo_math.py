"""PPO's arithmetic as Llama 2-Chat was tuned (Llama 2 §3.2.3, InstructGPT's PPO), as pure functions
of fp32 tensors: no model, no process group. Rollouts are right-padded: `mask` [B, T] is 1 on the
response tokens a row generated (its stop token included) and 0 on the padding after them; every
per-token tensor is [B, T] over the responses' positions.

The final reward of a response (Llama 2, eq. 3 and the text around it):

    R(g | p)  = WHITEN(LOGIT(R_c(g | p))) − β · D_KL(π_θ(g | p) ‖ π_0(g | p))
    R_c       = R_s  if the prompt is unsafe or R_s < 0.15,  else R_h

with R_s, R_h the safety and helpfulness models' scores as probabilities (the sigmoid of the score
head's output), the KL penalty taken per token (log π_θ − log π_0 at each sampled token, InstructGPT
and TRL's "k1" estimate) and the whitened score added at the response's last token. Advantages are
GAE (γ, λ) on those per-token rewards and the value model's values; returns are advantages plus
values; advantages are whitened before the PPO epochs.

Means over tokens take an explicit normaliser `n` (default: the mask's sum), so that a caller holding
one shard of the global batch divides by the global count and the sum over ranks is the global mean.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

SAFETY_THRESHOLD = 0.15
"""Llama 2: the safety model's score is used when it is below this (or the prompt is unsafe)."""
LOGIT_EPS = 1e-6
"""Probabilities are clamped to [eps, 1 - eps] before the logit (a score of exactly 0 or 1 is finite)."""
WHITEN_EPS = 1e-8


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, n: Optional[float] = None) -> torch.Tensor:
    """Mean of x over the mask's positions; `n`: the count to divide by (a global one under data parallelism)."""
    return masked_sum(x, mask) / (mask.sum() if n is None else n)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True,
           reduce: Callable[[torch.Tensor], torch.Tensor] = _same) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the mask's positions (all of x without one), the variance
    with Bessel's correction; shift_mean=False adds the mean back (only the scale changes).
    `reduce` sums a tensor over the ranks holding the rest of the batch (an all-reduce), so the
    statistics are the global batch's."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    total = reduce(torch.stack([masked_sum(x, mask), mask.sum()]))
    n = total[1]
    mean = total[0] / n
    var = reduce(masked_sum((x - mean) ** 2, mask)) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask


def combine_rewards(helpful: torch.Tensor, safety: Optional[torch.Tensor] = None,
                    unsafe: Optional[torch.Tensor] = None, threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """R_c [B] from the helpfulness and safety probabilities [B]: the safety score where the prompt is
    unsafe (bool [B]) or the safety score is below `threshold`, else the helpfulness score. Without a
    safety model, the helpfulness score."""
    if safety is None:
        return helpful
    use_safety = safety < threshold
    if unsafe is not None:
        use_safety = use_safety | unsafe.to(torch.bool)
    return torch.where(use_safety, safety, helpful)


def logit(p: torch.Tensor) -> torch.Tensor:
    """The inverse of the sigmoid, log(p / (1 − p)), on p clamped away from 0 and 1."""
    p = p.clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.log(p) - torch.log1p(-p)


def score_rewards(combined: torch.Tensor) -> torch.Tensor:
    """WHITEN(LOGIT(R_c)) over the batch [B] (the whole global batch: whitening is not additive)."""
    return whiten(logit(combined))


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π_θ − log π_0 at each sampled token [B, T] (0 on padding): its sum over a response is an
    unbiased estimate of the sequence KL(π_θ ‖ π_0)."""
    return (logps - ref_logps) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: −β·KL at every response token, plus the response's score [B] at its
    last token (each row's response tokens are one run, anywhere in the row, at least one token)."""
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation: δ_t = r_t + γ·V_{t+1} − V_t
    and A_t = δ_t + γλ·A_{t+1}, with V and A zero past each response's end; returns = A + V.
    Both are 0 on padding."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, n: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate, mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = π_θ/π_old,
    and its statistics as sums over the mask (divide by the token count): ratio, clipped (the
    clipped term was the larger), approx_kl (½(log ρ)², old vs new policy)."""
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, n)
    with torch.no_grad():
        stats = {"ratio": masked_sum(ratio, mask), "clipped": masked_sum((clipped > unclipped).to(mask.dtype), mask),
                 "approx_kl": masked_sum(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, n: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(½ · mean over tokens of max((V − R)², (V_clipped − R)²), the clipped term's count) with
    V_clipped = V_old + clip(V − V_old, −c, c)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask, n)
    return loss, masked_sum((clipped > plain).to(mask.dtype).detach(), mask)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of logits [..., V] at each position [...], in fp32."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)
