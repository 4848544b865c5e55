"""RLHF with PPO (train.objective=ppo), as Llama 2-Chat was tuned (§3.2.3), on the training mesh.

One training step is one PPO iteration over this step's prompts (data/prompts.py):

1. rollout: the policy's full weights are gathered once into a plain copy (parallel/gather.py) and
   it samples a response per prompt (model/batch_generation.py; row seeds from (seed, sample
   number), so a response depends on neither the layout nor a restart);
2. scoring, without gradients, on models sharded like the policy: the policy's own log-probs and
   entropy, the frozen reference's (the starting weights) log-probs, the value model's values, and
   the reward: the helpfulness (and safety) reward models' scores as probabilities, combined by
   Llama 2's rule, or a rule-based train.ppo.reward_fn;
3. Llama 2's reward (whitened logit of the score, minus β·KL per token), GAE, advantage
   whitening over the global batch (ppo_math.py);
4. train.ppo.epochs passes over mini-batches of train.ppo.mini_batch_size rollouts, each one
   optimizer step of the policy and of the value model (each its own AdamW, under the engine).

The last mini-batch's gradients are left to the trainer, so its health checks, recovery and update
apply as for every objective; the loss it checks is the iteration's mean of policy + value loss (a
NaN in either is a NaN). An earlier mini-batch whose gradient norm is not finite is not applied: the
iteration stops there and reports a NaN loss, so no NaN reaches the weights before the checks. The value model is the engine's second part (keys `value_model.*` in the
checkpoint, beside the policy's), so checkpoints hold both models and both optimizers; the
reference and reward models are frozen (no gradients, no optimizer state, never checkpointed).
"""

from __future__ import annotations

import dataclasses
import importlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_llama.model import Transformer
from dist_llama.model.batch_generation import generate_batch
from dist_llama.model.reward import last_token_scores
from dist_llama.parallel.gather import copy_full_weights
from dist_llama.train.objectives import ppo_math as pm
from dist_llama.train.objectives.base import IGNORE_INDEX, BuildContext, Objective
from dist_llama.train.objectives.dpo import freeze, token_logps

STATS = ("rows", "reward_raw", "reward", "kl", "policy_loss", "value_loss", "clipped", "approx_kl", "ratio",
         "ppo_tokens", "response_tokens", "entropy", "rollout_s", "iteration_s")
"""What each rank sums during an iteration (reduced over data parallelism by the step)."""


class ValueModel(nn.Module):
    """The value model under its own name, so that its parameters (`value_model.*`) sit beside the
    policy's in one checkpoint."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.value_model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.value_model(tokens)


def load_reward_fn(spec: str):
    """The function train.ppo.reward_fn names (module:function)."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class PPO(Objective):
    metric_names = ("reward_raw", "reward", "kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "ratio",
                    "response_len", "entropy", "rollout_tokens_per_sec", "rollout_share")

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.ppo = cfg.train.ppo
        self.reference: nn.Module | None = None
        self.rewards: list[nn.Module] = []
        self.reward_fn = None
        self.value: nn.Module | None = None
        self.stop_ids: list[int] = []
        self._rollout: nn.Module | None = None

    # --- building --------------------------------------------------------------------------------
    def loader(self, sources: list, dp_rank: int, dp_size: int):
        from dist_llama.data.prompts import PromptLoader

        cfg = self.cfg
        (source,) = sources
        loader = PromptLoader(source.data, cfg.data.seq_len - self.ppo.max_new_tokens, cfg.train.global_batch_size,
                              dp_rank, dp_size, seed=cfg.train.seed, name=source.name)
        self.stop_ids = loader.stop_ids
        return loader

    def check_inputs(self, tokenizer) -> None:
        """Before any process group (ConfigError, exit 2): the reward function imports; each reward
        model is a reward model of the policy's architecture (it is built and sharded like the
        policy, and so is the value model started from it) with the policy's tokenizer."""
        from dist_llama.train.ppo_check import check_ppo_inputs

        check_ppo_inputs(self.cfg, tokenizer)

    def build_extra(self, ctx: BuildContext) -> None:
        ppo = self.ppo
        self.reward_fn = load_reward_fn(ppo.reward_fn) if ppo.reward_fn else None
        self.reference = freeze(ctx.build_starting_model())
        self.rewards = [freeze(ctx.build_model(path, score_head=True)) for path in (ppo.reward, ppo.reward_safety) if path]
        start = ppo.reward if ppo.value_init == "reward" else self.cfg.checkpoint.init_from
        self.value = ValueModel(ctx.build_model(start, score_head=True))

    def trained_parts(self) -> list[tuple[nn.Module, object]]:
        """The value model, trained beside the policy with its own optimizer (its LR train.ppo.value_lr)."""
        return [(self.value, dataclasses.replace(self.cfg.optim, lr=self.ppo.value_lr))]

    def count(self, batch: dict) -> torch.Tensor:
        """The prompts (rows)."""
        return torch.tensor(len(batch["prompt"]), device=batch["prompt"].device)

    def reset(self, device: torch.device) -> None:
        self.stats = torch.zeros(len(STATS), device=device)

    def _add(self, **values) -> None:
        for key, v in values.items():
            self.stats[STATS.index(key)] += v

    def summarize(self, stats: torch.Tensor, n_items: int) -> dict:
        s = dict(zip(STATS, stats.tolist()))
        rows, tokens, gen = max(s["rows"], 1), max(s["ppo_tokens"], 1), s["response_tokens"]
        return {"reward_raw": s["reward_raw"] / rows, "reward": s["reward"] / rows, "kl": s["kl"] / rows,
                "policy_loss": s["policy_loss"] / tokens, "value_loss": s["value_loss"] / tokens,
                "clip_frac": s["clipped"] / tokens, "approx_kl": s["approx_kl"] / tokens, "ratio": s["ratio"] / tokens,
                "response_len": gen / rows, "entropy": s["entropy"] / max(gen, 1),
                "rollout_tokens_per_sec": gen / max(s["rollout_s"], 1e-9),
                "rollout_share": s["rollout_s"] / max(s["iteration_s"], 1e-9)}

    # --- one iteration ---------------------------------------------------------------------------
    def forward_backward(self, step, batch: dict) -> torch.Tensor:
        t0 = time.perf_counter()
        engine, ppo = step.engine, self.ppo
        policy, value = engine.parts[0], engine.parts[1]
        prompts = [row[: int(n)].tolist() for row, n in zip(batch["prompt"], batch["prompt_len"])]
        completions, rollout_s = self._roll_out(step, policy, prompts, batch["sample"].tolist())
        tokens, labels, lengths = self._sequences(step, prompts, completions)
        mask = (labels != IGNORE_INDEX).float()
        with torch.no_grad():
            old_logps, entropy = self._logps(step, policy, tokens, labels, entropy=True)
            ref_logps, _ = self._logps(step, self.reference, tokens, labels)
            old_values = self._values(step, value, tokens) * mask
            raw, combined = self._scores(step, prompts, completions, tokens, lengths)
        reduce = self._reducer(step)
        scores = self._global_scores(step, combined)
        kl = pm.kl_per_token(old_logps, ref_logps, mask)
        advantages, returns = pm.gae(pm.token_rewards(scores, kl, mask, ppo.kl_coef), old_values, mask, ppo.gamma,
                                     ppo.lam)
        advantages = pm.whiten(advantages, mask, reduce=reduce)
        self._add(rows=len(prompts), reward_raw=raw.sum(), reward=combined.sum(), kl=kl.sum(),
                  response_tokens=mask.sum(), entropy=(entropy * mask).sum())

        rows = ppo.mini_batch_size // step.dp_cp
        n_mini = len(prompts) // rows
        total = torch.zeros((), device=step.device)
        for epoch in range(ppo.epochs):
            for j in range(n_mini):
                sl = slice(j * rows, (j + 1) * rows)
                norm = reduce(mask[sl].sum()) / step.dp_cp  # global tokens / dp: the gradient average divides by dp
                with engine.grad_sync(policy, True):
                    logps, _ = self._logps(step, policy, tokens[sl], labels[sl])
                    values = self._values(step, value, tokens[sl])
                    pl, st = pm.policy_loss(logps, old_logps[sl], advantages[sl], mask[sl], ppo.clip, n=norm)
                    vl, _ = pm.value_loss(values, old_values[sl], returns[sl], mask[sl], ppo.value_clip, n=norm)
                    engine.backward(pl + vl)
                self._add(policy_loss=pl.detach() * norm, value_loss=vl.detach() * norm, clipped=st["clipped"],
                          approx_kl=st["approx_kl"], ratio=st["ratio"], ppo_tokens=mask[sl].sum())
                total += (pl + vl).detach()
                if not (epoch == ppo.epochs - 1 and j == n_mini - 1):  # the last update is the trainer's
                    if not torch.isfinite(engine.grad_norm()):  # global: every rank takes this branch
                        # No update with it: the trainer's health check sees a NaN and acts.
                        engine.discard()
                        return torch.full((), float("nan"), device=step.device)
                    engine.step()
        self._add(rollout_s=rollout_s / step.dp_cp, iteration_s=(time.perf_counter() - t0) / step.dp_cp)
        return total / (ppo.epochs * n_mini)

    def _roll_out(self, step, policy: nn.Module, prompts: list[list[int]], samples: list[int]):
        from dist_llama.data.permutation import mix_key

        t0 = time.perf_counter()
        if self._rollout is None:  # one plain copy, kept: its weights are refreshed every rollout
            args = dataclasses.replace(self.cfg.model, score_head=False, attn_impl="sdpa")
            with torch.device(step.device):
                self._rollout = Transformer(args)
            self._rollout.init_buffers(step.device)
            self._rollout.requires_grad_(False)
        copy_full_weights(step.engine.unwrapped(policy), self._rollout)
        seeds = [mix_key(self.cfg.train.seed, 0x770, k) & (2**63 - 1) for k in samples]
        with step.autocast():
            completions = generate_batch(self._rollout, prompts, self.ppo.max_new_tokens,
                                         temperature=self.ppo.temperature, top_p=self.ppo.top_p, seeds=seeds,
                                         stop_ids=self.stop_ids)
        return completions, time.perf_counter() - t0

    def _sequences(self, step, prompts, completions):
        """tokens [B, W] (prompt + response, right-padded; W a multiple of tp for sequence parallel),
        labels [B, W] (each response token at the position that predicts it, else -100), lengths [B]."""
        seqs = [p + c.ids for p, c in zip(prompts, completions)]
        width = -(-max(len(s) for s in seqs) // step.tp) * step.tp
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            tokens[i, : len(p) + len(c.ids)] = torch.tensor(p + c.ids)
            labels[i, len(p) - 1 : len(p) - 1 + len(c.ids)] = torch.tensor(c.ids)
        return (tokens.to(step.device), labels.to(step.device),
                torch.tensor([len(s) for s in seqs], device=step.device))

    def _logps(self, step, model, tokens, labels, entropy: bool = False):
        with step.autocast():
            logits = model(tokens)
        with torch.autocast(step.device.type, enabled=False):
            lp = token_logps(logits, labels)
            ent = pm.entropy(_plain(logits).detach()) if entropy else None
        return lp, ent

    def _values(self, step, value, tokens) -> torch.Tensor:
        with step.autocast():
            out = value(tokens)
        return _plain(out).float().squeeze(-1)

    def _scores(self, step, prompts, completions, tokens, lengths):
        """(the helpfulness score, the combined score) [B] as probabilities."""
        if self.reward_fn is not None:
            raw = torch.tensor([float(self.reward_fn(p, c.ids)) for p, c in zip(prompts, completions)],
                               device=step.device)
            return raw, raw
        probs = []
        for model in self.rewards:
            with step.autocast():
                out = model(tokens)
            probs.append(torch.sigmoid(last_token_scores(_plain(out), lengths)))
        helpful = probs[0]
        return helpful, pm.combine_rewards(helpful, probs[1] if len(probs) > 1 else None,
                                           threshold=self.ppo.safety_threshold)

    def _reducer(self, step):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, group=step.dp_group)
            return t
        return reduce

    def _global_scores(self, step, combined: torch.Tensor) -> torch.Tensor:
        """WHITEN(LOGIT(R_c)) over the global batch; this rank's rows."""
        gathered = [torch.empty_like(combined) for _ in range(dist.get_world_size(step.dp_group))]
        dist.all_gather(gathered, combined.contiguous(), group=step.dp_group)
        rank = dist.get_rank(step.dp_group)
        return pm.score_rewards(torch.cat(gathered)).view(len(gathered), -1)[rank]
