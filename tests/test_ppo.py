"""RLHF with PPO (train.objective=ppo) on a tiny model, prompts from --format chat data, rewarded by a
rule (train.ppo.reward_fn, tests/ppo_rewards.py: the share of the target word in the response) or by
a reward model (a LlamaForSequenceClassification directory written here):

- one PPO iteration (two mini-batches: one update inside the iteration, one by the trainer) gives the
  same policy and value weights on 1 rank, FSDP-2, tp2 and DDP-2 (≤ 1e-5);
- learns: over 30 iterations the mean reward of the last five is above the first five's by 0.15
  while the KL to the reference stays below 8 nats per response (1 nat a token; β = 0.3);
- a run stopped after iteration 2 and resumed equals the uninterrupted 4-iteration run bit for bit
  (policy, value model, metrics);
- with a reward model: it runs, and a reward model with another tokenizer or architecture (the value
  model starts from it), a language model as reward model, no reward at all, pp, cp or DeepSpeed
  are refused in one line naming the key, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch

from chatdata import copy_prompts, llama3_tokenizer, word_tokenizer, write_conversations
from trainrun import DEBUG
from dist_llama.testing import run_ranks
# imported here, so that forked ranks start with them (the trainer's imports take seconds)
from dist_llama.train.build import build_trainer  # noqa: F401
from dist_llama.train.cli import resolve_config

pytestmark = pytest.mark.timeout(240)
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=-1",
         "data.seq_len=32"]
RULE = ["train.objective=ppo", "train.ppo.reward_fn=ppo_rewards:target_word", "train.ppo.value_init=policy",
        "train.global_batch_size=16", "train.ppo.mini_batch_size=8", "train.ppo.max_new_tokens=8",
        "train.peak_flops=1e12", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "optim.lr=1e-3",
        "train.ppo.value_lr=1e-3", "train.ppo.kl_coef=0.3", "logging.console=false", "logging.wandb_mode=disabled"]
KL_BOUND = 8.0
"""Nats per response (8 tokens at most): the learning run's KL to the reference stays below it."""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from dist_llama.data.prepare import prepare

    d = tmp_path_factory.mktemp("prompts")
    tok = word_tokenizer(d / "tokenizer.json")
    prepare([str(write_conversations(d / "c.jsonl", copy_prompts(64, 0)))], tok, str(d / "data"), fmt="chat",
            progress=False)
    return d, [f"data.tokenizer={tok}", f"data.path={d / 'data'}", *MODEL]


def _run(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.cli import train

    cfg, sources = resolve_config(DEBUG, overrides, world_size)
    trainer = train(cfg, sources)
    params = gather_full_state_dict(trainer.engine.parts)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return trainer.history, (params if rank == 0 else None)


def ppo_run(world_size, overrides):
    return run_ranks(_run, world_size, overrides, world_size, timeout=200)[0]


def test_one_iteration_is_the_same_on_one_rank_fsdp2_tp2_and_ddp2(prompts, tmp_path):
    _, data = prompts
    base = [*data, *RULE, "train.steps=1", "checkpoint.enabled=false"]
    one = ppo_run(1, [*base, f"train.run_dir={tmp_path / 'one'}"])
    fsdp = ppo_run(2, [*base, f"train.run_dir={tmp_path / 'fsdp'}"])
    tp = ppo_run(2, [*base, f"train.run_dir={tmp_path / 'tp'}", "parallel.tp=2"])
    ddp = ppo_run(2, [*base, f"train.run_dir={tmp_path / 'ddp'}", "parallel.engine=ddp"])
    (h1, p1) = one
    assert any(k.startswith("value_model.") for k in p1) and "output.weight" in p1
    assert h1[0]["approx_kl"] > 0  # the second mini-batch ran on weights the first one updated
    for (h, p) in (fsdp, tp, ddp):
        assert h[0]["response_len"] == h1[0]["response_len"] and h[0]["reward_raw"] == pytest.approx(
            h1[0]["reward_raw"], abs=1e-6)  # the same rollouts
        assert h[0]["loss"] == pytest.approx(h1[0]["loss"], rel=1e-5, abs=1e-6)
        assert p.keys() == p1.keys()
        for k in p1:
            err = (p[k] - p1[k]).abs().max() / p1[k].abs().max().clamp(min=1e-12)
            assert err <= 1e-5, (k, err.item())


def test_one_mini_batch_starts_at_ratio_one_and_no_old_new_kl(prompts, tmp_path):
    """The whole batch as one mini-batch: the update's forward is the rollout policy itself."""
    _, data = prompts
    history, _ = ppo_run(1, [*data, *RULE, "train.ppo.mini_batch_size=16", "train.steps=1",
                             "checkpoint.enabled=false", f"train.run_dir={tmp_path / 'run'}"])
    (h,) = history
    assert h["ratio"] == 1.0 and h["approx_kl"] == 0.0 and h["clip_frac"] == 0.0 and h["kl"] == 0.0


def test_learns_the_target_word_with_bounded_kl(prompts, tmp_path):
    _, data = prompts
    history, _ = ppo_run(1, [*data, *RULE, "train.steps=30", "checkpoint.enabled=false",
                             f"train.run_dir={tmp_path / 'run'}"])
    rewards, kls = [h["reward_raw"] for h in history], [h["kl"] for h in history]
    assert history[0]["kl"] == 0  # the first rollout comes from the reference itself
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15, rewards
    assert max(kls) < KL_BOUND, kls
    assert all(0 < h["rollout_share"] < 1 and h["rollout_tokens_per_sec"] > 0 for h in history)


def test_resume_is_bit_exact(prompts, tmp_path):
    _, data = prompts
    base = [*data, *RULE, "checkpoint.interval=2", "checkpoint.async_save=false"]
    full_h, full_p = ppo_run(1, [*base, "train.steps=4", f"train.run_dir={tmp_path / 'full'}"])
    ppo_run(1, [*base, "train.steps=2", f"train.run_dir={tmp_path / 'cut'}"])
    resumed_h, resumed_p = ppo_run(1, [*base, "train.steps=4", f"train.run_dir={tmp_path / 'cut'}"])
    assert [h["step"] for h in resumed_h] == [3, 4]
    for a, b in zip(resumed_h, full_h[2:]):
        for key in ("loss", "reward_raw", "kl", "policy_loss", "value_loss", "response_len", "grad_norm"):
            assert a[key] == b[key], key
    assert resumed_p.keys() == full_p.keys()
    assert all(torch.equal(resumed_p[k], full_p[k]) for k in full_p)


def _nan_run(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.build import build_trainer as build
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.recovery import TrainingExit

    cfg, sources = resolve_config(DEBUG, overrides, world_size)
    trainer = build(cfg, init_distributed(cfg.train.device), sources)
    try:
        trainer.fit()
        code = 0
    except TrainingExit as exc:
        code = exc.code
    finally:
        trainer.close()
    params = gather_full_state_dict(trainer.engine.parts)
    dist.destroy_process_group()
    return code, all(bool(torch.isfinite(v).all()) for v in params.values())


def test_a_nan_reward_stops_the_iteration_before_any_update(prompts, tmp_path):
    """NaN rewards make NaN advantages and returns: the first mini-batch's update is not applied, and
    the trainer's health check (nan_action=abort) stops the run with finite weights."""
    from dist_llama.train.recovery import EXIT_UNRECOVERABLE

    _, data = prompts
    rule = [r.replace("target_word", "not_a_number") for r in RULE]
    code, finite = run_ranks(_nan_run, 1, [*data, *rule, "train.steps=1", "health.nan_action=abort",
                                           "checkpoint.enabled=false", f"train.run_dir={tmp_path / 'run'}"], 1,
                             timeout=200)[0]
    assert code == EXIT_UNRECOVERABLE and finite


def _reward_model(out, tokenizer: str, dim: int = 64, score_head: bool = True):
    """A LlamaForSequenceClassification directory of the tiny model's architecture (with `dim`;
    without score_head a LlamaForCausalLM one)."""
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    from dist_llama.data import build_tokenizer
    from dist_llama.model import Transformer
    from dist_llama.model.args import ModelArgs
    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    tok = build_tokenizer(tokenizer)
    args = ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32,
                     max_seq_len=512, rope_theta=10000.0, score_head=score_head)
    model = Transformer(args)
    model.init_weights(3)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), args).items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(dataclasses.replace(args), torch.float32, tok.bos_id,
                                                          tok.eos_id)))
    shutil.copy(tokenizer, out / "tokenizer.json")
    return out


def test_trains_against_a_reward_model(prompts, tmp_path):
    d, data = prompts
    rm = _reward_model(tmp_path / "rm", str(d / "tokenizer.json"))
    history, params = ppo_run(1, [*data, *RULE[:1], *RULE[3:], f"train.ppo.reward={rm}", "train.steps=2",
                                  "checkpoint.enabled=false", f"train.run_dir={tmp_path / 'run'}"])
    assert all(0 < h["reward_raw"] < 1 and h["reward"] == h["reward_raw"] for h in history)
    assert "value_model.score.weight" in params


@pytest.mark.parametrize("key", ["parallel.pp", "parallel.cp"])
def test_pipeline_and_context_parallel_are_refused_naming_the_key(prompts, tmp_path, key):
    from dist_llama.config import ConfigError

    _, data = prompts
    with pytest.raises(ConfigError) as exc:
        resolve_config(DEBUG, [*data, *RULE, f"{key}=2", f"train.run_dir={tmp_path / 'run'}"], 2)
    assert exc.value.key == key
    assert not (tmp_path / "run").exists()


WHAT = {"no_reward": "needs a reward model", "tokenizer": "another tokenizer", "engine": "not deepspeed",
        "architecture": "config has 64 for model.dim", "language_model": "not a reward model"}


@pytest.mark.parametrize("case", ["no_reward", "tokenizer", "architecture", "language_model", "engine"])
def test_bad_inputs_exit_2_naming_the_key(prompts, tmp_path, case, capsys):
    from dist_llama.train.cli import main

    d, data = prompts
    run_dir = tmp_path / "run"
    rule = [*RULE]
    if case == "no_reward":
        rule = [r for r in RULE if "reward_fn" not in r]
        key = "train.ppo.reward"
    elif case == "engine":
        rule += ["parallel.engine=deepspeed"]
        key = "parallel.engine"
    else:
        tok = str(d / "tokenizer.json")
        if case == "tokenizer":
            rm = _reward_model(tmp_path / "rm", llama3_tokenizer(tmp_path / "other.json"))
        else:
            rm = _reward_model(tmp_path / "rm", tok, dim=32 if case == "architecture" else 64,
                               score_head=case != "language_model")
        rule = [r for r in RULE if "reward_fn" not in r and "value_init" not in r] + [f"train.ppo.reward={rm}"]
        key = "train.ppo.reward"
    code = main(["--config", DEBUG, *data, *rule, f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and f"{key}:" in err[0], err
    assert WHAT[case] in err[0], err
    assert not run_dir.exists()


@pytest.mark.parametrize("override, key", [
    ("train.ppo.mini_batch_size=5", "train.ppo.mini_batch_size"),
    ("train.ppo.clip=0", "train.ppo.clip"),
    ("train.ppo.lam=1.5", "train.ppo.lam"),
    ("train.ppo.max_new_tokens=32", "train.ppo.max_new_tokens"),
    ("train.ppo.reward_fn=no_colon", "train.ppo.reward_fn"),
    ("train.ppo.reward_fn=ppo_rewards:missing", "train.ppo.reward_fn"),
    ("train.ppo.value_init=reward", "train.ppo.value_init"),
    ("train.ppo.value_init=other", "train.ppo.value_init"),
])
def test_settings_are_validated_naming_the_key(prompts, tmp_path, override, key):
    from dist_llama.config import ConfigError

    _, data = prompts
    with pytest.raises(ConfigError) as exc:
        resolve_config(DEBUG, [*data, *RULE, override, f"train.run_dir={tmp_path / 'run'}"], 1)
    assert exc.value.key == key, exc.value
