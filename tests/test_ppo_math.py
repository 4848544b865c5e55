"""PPO's arithmetic (train/objectives/ppo_math.py) against an independent implementation written out
here row by row in plain Python floats (Llama 2 §3.2.3's reward, InstructGPT/TRL's GAE and clipped
losses), and TRL's entropy where TRL has one; fp32, ≤ 1e-6."""

import math

import pytest
import torch

from dist_llama.train.objectives import ppo_math as pm

pytestmark = pytest.mark.timeout(60)
TOL = dict(rtol=1e-6, atol=1e-6)


def rollouts(seed=0, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [T, 3, 1, 5][:B]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    r = lambda: torch.randn(B, T, generator=g)
    return dict(mask=mask, lengths=lengths, logps=r() - 2, ref=r() - 2, old=r() - 2, values=r(), adv=r(), ret=r(),
                old_values=r(), probs=torch.rand(B, generator=g), safety=torch.rand(B, generator=g))


def ref_whiten(xs):
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


def ref_reward_chain(helpful, safety, unsafe, logps, ref, lengths, beta, gamma, lam, values):
    """Llama 2's reward per token, then GAE with a Python loop per row."""
    combined = [s if (u or s < 0.15) else h for h, s, u in zip(helpful, safety, unsafe)]
    scores = ref_whiten([math.log(c / (1 - c)) for c in combined])
    advs, rets = [], []
    for i, n in enumerate(lengths):
        rew = [-beta * (logps[i][t] - ref[i][t]) for t in range(n)]
        rew[-1] += scores[i]
        a, last, row = 0.0, 0.0, [0.0] * n
        for t in reversed(range(n)):
            nxt = values[i][t + 1] if t + 1 < n else 0.0
            delta = rew[t] + gamma * nxt - values[i][t]
            last = delta + gamma * lam * last
            row[t] = last
        advs.append(row)
        rets.append([row[t] + values[i][t] for t in range(n)])
    return combined, scores, advs, rets


def test_reward_kl_gae_returns_equal_a_loop_per_row():
    d = rollouts()
    unsafe = torch.tensor([False, True, False, False])
    beta, gamma, lam = 0.01, 0.99, 0.95
    combined = pm.combine_rewards(d["probs"], d["safety"], unsafe)
    scores = pm.score_rewards(combined)
    kl = pm.kl_per_token(d["logps"], d["ref"], d["mask"])
    rewards = pm.token_rewards(scores, kl, d["mask"], beta)
    adv, ret = pm.gae(rewards, d["values"], d["mask"], gamma, lam)
    c_ref, s_ref, a_ref, r_ref = ref_reward_chain(d["probs"].tolist(), d["safety"].tolist(), unsafe.tolist(),
                                                  d["logps"].tolist(), d["ref"].tolist(), d["lengths"], beta, gamma,
                                                  lam, d["values"].tolist())
    torch.testing.assert_close(combined, torch.tensor(c_ref), **TOL)
    torch.testing.assert_close(scores, torch.tensor(s_ref), **TOL)
    for i, n in enumerate(d["lengths"]):
        torch.testing.assert_close(adv[i, :n], torch.tensor(a_ref[i]), **TOL)
        torch.testing.assert_close(ret[i, :n], torch.tensor(r_ref[i]), **TOL)
        assert not adv[i, n:].any() and not ret[i, n:].any()  # nothing on padding


def test_safety_rule_picks_safety_below_threshold_or_for_unsafe_prompts():
    helpful, safety = torch.tensor([0.9, 0.9, 0.9]), torch.tensor([0.5, 0.1, 0.5])
    assert pm.combine_rewards(helpful, safety, torch.tensor([False, False, True])).tolist() == pytest.approx(
        [0.9, 0.1, 0.5])
    assert pm.combine_rewards(helpful) is helpful


def test_advantage_whitening_is_over_response_tokens_only():
    d = rollouts(1)
    out = pm.whiten(d["adv"], d["mask"])
    xs = [d["adv"][i, t].item() for i, n in enumerate(d["lengths"]) for t in range(n)]
    expect = iter(ref_whiten(xs))
    for i, n in enumerate(d["lengths"]):
        for t in range(n):
            assert out[i, t].item() == pytest.approx(next(expect), abs=1e-6)
    assert not out[d["mask"] == 0].any()


def test_clipped_surrogate_and_value_loss_equal_the_formulas():
    d = rollouts(2)
    clip, vclip, n = 0.2, 0.2, 11.0
    loss, stats = pm.policy_loss(d["logps"], d["old"], d["adv"], d["mask"], clip, n=n)
    vloss, vclipped = pm.value_loss(d["values"], d["old_values"], d["ret"], d["mask"], vclip, n=n)
    total = ratio_sum = clipped = akl = vtot = vc = 0.0
    for i, L in enumerate(d["lengths"]):
        for t in range(L):
            lr = d["logps"][i, t].item() - d["old"][i, t].item()
            rho, a = math.exp(lr), d["adv"][i, t].item()
            u, c = -a * rho, -a * min(max(rho, 1 - clip), 1 + clip)
            total += max(u, c)
            ratio_sum += rho
            clipped += c > u
            akl += 0.5 * lr * lr
            v, vo, R = d["values"][i, t].item(), d["old_values"][i, t].item(), d["ret"][i, t].item()
            vcl = vo + min(max(v - vo, -vclip), vclip)
            vtot += max((v - R) ** 2, (vcl - R) ** 2)
            vc += (vcl - R) ** 2 > (v - R) ** 2
    assert loss.item() == pytest.approx(total / n, abs=1e-6)
    assert stats["ratio"].item() == pytest.approx(ratio_sum, abs=1e-5)
    assert stats["clipped"].item() == clipped and clipped > 0
    assert stats["approx_kl"].item() == pytest.approx(akl, abs=1e-6)
    assert vloss.item() == pytest.approx(0.5 * vtot / n, abs=1e-6)
    assert vclipped.item() == vc and vc > 0


def test_first_minibatch_has_ratio_one_and_no_old_new_kl():
    d = rollouts(3)
    logps = d["logps"].clone().requires_grad_(True)
    loss, stats = pm.policy_loss(logps, d["logps"], d["adv"], d["mask"], 0.2)
    count = d["mask"].sum()
    assert stats["ratio"].item() == count.item() and stats["approx_kl"].item() == 0 and stats["clipped"].item() == 0
    # at ρ = 1 the surrogate's gradient is −A/n at every response token
    loss.backward()
    torch.testing.assert_close(logps.grad, -d["adv"] * d["mask"] / count, **TOL)


def test_entropy_equals_trl():
    import trl.trainer.utils as trl_utils  # a test dependency: a missing install must fail, not skip
    logits = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(4)) * 3
    torch.testing.assert_close(pm.entropy(logits), trl_utils.entropy_from_logits(logits), **TOL)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(pm.entropy(logits), -(p * p.log()).sum(-1), **TOL)


def test_logit_inverts_the_sigmoid_and_stays_finite_at_the_ends():
    x = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(pm.logit(torch.sigmoid(x)), x, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(pm.logit(torch.tensor([0.0, 1.0]))).all()


def test_responses_after_a_prompt_give_the_same_values_shifted():
    """In a rollout's [prompt | response] row the response starts after the prompt: the same
    rewards, advantages and returns, shifted."""
    d = rollouts(5)
    shift = 3
    pad = lambda x: torch.cat([torch.zeros(x.shape[0], shift), x], 1)
    scores = torch.randn(4, generator=torch.Generator().manual_seed(6))
    kl = pm.kl_per_token(d["logps"], d["ref"], d["mask"])
    a, r = pm.gae(pm.token_rewards(scores, kl, d["mask"], 0.05), d["values"], d["mask"], 0.9, 0.8)
    m2 = pad(d["mask"])
    kl2 = pm.kl_per_token(pad(d["logps"]), pad(d["ref"]), m2)
    a2, r2 = pm.gae(pm.token_rewards(scores, kl2, m2, 0.05), pad(d["values"]), m2, 0.9, 0.8)
    torch.testing.assert_close(a2[:, shift:], a, **TOL)
    torch.testing.assert_close(r2[:, shift:], r, **TOL)
    assert not a2[:, :shift].any()
