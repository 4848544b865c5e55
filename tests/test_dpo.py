"""Direct preference optimisation (train.objective=dpo) against a frozen reference model.

- the first-step loss is ln 2 (the policy is the reference); after a perturbation of the policy,
  the loss (with Llama 3's NLL term and masking) and every gradient equal a plain PyTorch
  implementation written here, which scores each chosen and rejected sequence on its own, read
  from the dataset's documents; the loss with the reference's log-probs precomputed
  (train.dpo.reference=precomputed) equals the loss with the reference model (one rank);
- tp2 (model reference) and FSDP-2 (precomputed reference) train like one rank (losses and
  weights); the tp2 run's reward accuracy on synthetic preferences rises from 0 to above 0.9 in 4
  steps;
- the precomputed reference lives in the run directory: a restart reads it and holds no reference
  model; a resume without it computes it again from the starting weights, bit-exact with the
  uninterrupted run;
- layouts DPO does not support are rejected naming the key.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatdata import llama3_tokenizer, write_preferences
from trainrun import DEBUG, TINY, assert_same_run, train
from dist_llama.testing import run_ranks
# imported here, so that forked ranks start with them (the trainer's imports take seconds)
from dist_llama.train.build import build_trainer
from dist_llama.train.cli import resolve_config

BETA, NLL = 0.5, 0.2


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """Overrides that train DPO on 200 synthetic pairs with a Llama 3-style tokenizer."""
    from dist_llama.data.prepare import prepare

    d = tmp_path_factory.mktemp("prefs")
    tok = llama3_tokenizer(d / "tokenizer.json")
    prepare([str(write_preferences(d / "p.jsonl", 200))], tok, str(d / "data"), fmt="preference", progress=False)
    return [f"data.tokenizer={tok}", f"data.path={d / 'data'}", "train.objective=dpo", "model.vocab_size=-1",
            "data.seq_len=80", "data.eval_fraction=0", "train.global_batch_size=8", f"train.dpo.beta={BETA}",
            "train.peak_flops=1e12"]  # no matmul timing per trainer for an MFU nobody reads here


OPTIONS = [f"train.dpo.nll_coef={NLL}", "train.dpo.mask_special=true"]
"""Llama 3's choices: an NLL term on the chosen responses, end-of-turn tokens left out."""
STEPS = [*OPTIONS, "train.steps=4", "optim.decay_steps=4"]
"""The runs the layout, learning and resume tests share."""


def _perturb(named_params, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(named_params):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _reference_dpo(model, ref, data, pairs) -> torch.Tensor:
    """Each pair's chosen and rejected sequence alone, log-probs of the assistant content summed."""
    losses = []
    for k in pairs:
        sides = []
        for doc in (2 * k, 2 * k + 1):
            start, stop = int(data.doc_starts[doc]), int(data.doc_starts[doc + 1]) if doc + 1 < data.n_docs else len(data)
            ids = torch.from_numpy(data.tokens(start, stop))[None]
            content = torch.from_numpy(data.loss_mask(start, stop)[1:] == 1)
            out = []
            for m in (model, ref):
                lp = torch.log_softmax(m(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                out.append(lp[content].sum())
            sides.append((*out, content.sum()))
        (pc, rc, nc), (pr, rr, _) = sides
        losses.append(-F.logsigmoid(BETA * ((pc - rc.detach()) - (pr - rr.detach()))) - NLL * pc / nc)
    return torch.stack(losses).mean()


def _one_rank(prefs):
    from dist_llama.model import Transformer
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.dpo_reference import compute_table

    cfg, sources = resolve_config(DEBUG, [*TINY, *prefs, *OPTIONS, "checkpoint.enabled=false"], 1)
    trainer = build_trainer(cfg, init_distributed("cpu"), sources)
    (policy,) = trainer.engine.parts
    batch = trainer.parts.loader.next_batch()
    first, _ = trainer.compute_gradients(batch)
    trainer.engine.discard()
    trainer.parts.step.objective.nll_coef = 0.0  # the DPO term alone
    dpo_only, _ = trainer.compute_gradients(batch)
    trainer.engine.discard()
    trainer.parts.step.objective.nll_coef = NLL
    _perturb(policy.named_parameters())
    loss, _ = trainer.compute_gradients(batch)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    metrics = dict(trainer.parts.step.metrics)
    trainer.engine.discard()
    # train.dpo.reference=precomputed: the reference's log-probs of every pair from one pass, then
    # the same batch again with them in it, and no reference model
    loader, step, objective = trainer.parts.loader, trainer.parts.step, trainer.parts.step.objective
    loader.reference, loader.consumed = compute_table(step, objective, objective.reference, loader), 0
    again = loader.next_batch()
    assert torch.equal(again["tokens"], batch["tokens"])
    objective.reference = None
    precomputed, _ = trainer.compute_gradients(again)
    trainer.close()

    ref = Transformer(cfg.model)
    ref.init_weights(cfg.train.seed)
    model = Transformer(cfg.model)
    model.load_state_dict(ref.state_dict())
    _perturb(model.named_parameters())
    expected = _reference_dpo(model, ref, sources[0].data, [trainer.parts.loader._pair(k) for k in range(8)])
    expected.backward()
    return (dpo_only.item(), first.item(), loss.item(), precomputed.item(), expected.item(), grads,
            {n: p.grad for n, p in model.named_parameters()}, metrics)


@pytest.mark.timeout(120)
def test_dpo_loss_and_gradients_equal_a_plain_implementation(prefs):
    dpo_only, first, loss, precomputed, expected, grads, expected_grads, metrics = run_ranks(_one_rank, 1, prefs,
                                                                                             timeout=100)[0]
    assert dpo_only == pytest.approx(math.log(2), rel=1e-6)  # -log σ(0): the policy is the reference
    assert abs(loss - first) > 1e-3  # the perturbation matters
    assert loss == pytest.approx(expected, rel=1e-5)
    assert precomputed == pytest.approx(loss, rel=1e-6)  # train.dpo.reference=precomputed
    for name, g in expected_grads.items():
        err = (grads[name] - g).abs().max() / g.abs().max()
        assert err <= 1e-4, (name, err.item())
    assert 0 <= metrics["reward_accuracy"] <= 1
    assert metrics["reward_margin"] == pytest.approx(metrics["reward_chosen"] - metrics["reward_rejected"], abs=1e-6)


@pytest.fixture(scope="module")
def one_rank_run(prefs):
    return train(1, *prefs, *STEPS, "checkpoint.enabled=false")


@pytest.mark.timeout(120)
def test_dpo_tp2_trains_like_one_rank_and_learns(prefs, one_rank_run, tmp_path):
    run = train(2, *prefs, *STEPS, "checkpoint.enabled=false", "parallel.tp=2", "parallel.dp_shard=1",
                f"train.run_dir={tmp_path}")
    assert_same_run(one_rank_run, run, steps=4)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # at the first step the sharded policy is the sharded reference bit for bit: every margin is 0
    assert records[0]["reward_accuracy"] == 0.0 and records[0]["reward_margin"] == 0.0
    assert records[-1]["reward_accuracy"] > 0.9, [r["reward_accuracy"] for r in records]


PRECOMPUTED = [*STEPS, "train.dpo.reference=precomputed", "parallel.dp_shard=2", "checkpoint.interval=2",
               "checkpoint.async_save=false"]


def _events(run_dir) -> list[str]:
    return [json.loads(line)["event"] for line in open(run_dir / "events.jsonl")]


def _resumed_trainer(prefs, run_dir):
    """A one-rank trainer built in a run directory with checkpoints: (its reference table, whether
    it holds a reference model)."""
    from dist_llama.parallel.env import init_distributed

    cfg, sources = resolve_config(DEBUG, [*TINY, *prefs, *PRECOMPUTED, "parallel.dp_shard=1",
                                          f"train.run_dir={run_dir}"], 1)
    trainer = build_trainer(cfg, init_distributed("cpu"), sources)
    trainer.close()
    return trainer.parts.loader.reference, trainer.parts.step.objective.reference is not None


@pytest.mark.timeout(240)
def test_dpo_fsdp2_precomputed_reference_trains_like_one_rank_and_resumes_bit_exact(prefs, one_rank_run, tmp_path):
    """The reference's log-probs computed before training (one pass, gathered over the two ranks)
    and kept in the run directory: FSDP-2 trains like one rank with the model reference; a restart
    reads the file and holds no reference model; a resume whose file is gone computes it again
    from the starting weights, bit-exact with the uninterrupted run."""
    from safetensors.numpy import load_file

    whole = tmp_path / "whole"
    losses, params = train(2, *prefs, *PRECOMPUTED, f"train.run_dir={whole}")
    assert_same_run(one_rank_run, (losses, params), steps=4)
    table = load_file(whole / "dpo_reference.safetensors")["logps"]
    assert table.shape == (200, 2) and (table < 0).all() and _events(whole).count("dpo_reference_computed") == 1

    shutil.copytree(whole, tmp_path / "again")
    read, holds_reference = run_ranks(_resumed_trainer, 1, prefs, tmp_path / "again", timeout=100)[0]
    assert np.array_equal(read, table) and not holds_reference and "dpo_reference_loaded" in _events(tmp_path / "again")

    cut = tmp_path / "cut"  # as if stopped after the step-2 checkpoint, and the file lost
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "dpo_reference.safetensors").unlink()
    resumed_losses, resumed = train(2, *prefs, *PRECOMPUTED, f"train.run_dir={cut}")
    assert np.array_equal(load_file(cut / "dpo_reference.safetensors")["logps"], table)
    assert resumed_losses == losses[2:]
    assert all(torch.equal(resumed[k], params[k]) for k in params)


def test_dpo_rejects_pipeline_and_context_parallel_naming_the_key(prefs):
    from dist_llama.config import ConfigError

    for layout, key in ((["parallel.pp=2", "parallel.dp_shard=1"], "parallel.pp"),
                        (["parallel.cp=2", "parallel.dp_shard=1"], "parallel.cp"),
                        (["data.seq_len=16"], "data.seq_len"),
                        (["train.dpo.reference=cached"], "train.dpo.reference")):
        with pytest.raises(ConfigError, match=key):
            resolve_config(DEBUG, [*TINY, *prefs, *layout], 2)
    with pytest.raises(ConfigError, match="data.path"):  # preference data, not text
        resolve_config(DEBUG, [*TINY, *prefs, "data.path=kjv", "data.tokenizer=byte"], 1)


def _multiturn_prefs(d, n: int):
    """Preference records whose prompt has an earlier assistant turn (the audit's shape): [user
    "say X", assistant "X X X X X X X X", user "now say Y"], chosen "Y", rejected Y reversed."""
    import random

    from chatdata import WORDS

    rng = random.Random(1)
    path = d / "multiturn.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            x, y = rng.choice(WORDS), rng.choice(WORDS)
            prompt = [{"role": "user", "content": f"say {x}"}, {"role": "assistant", "content": " ".join([x] * 8)},
                      {"role": "user", "content": f"now say {y}"}]
            f.write(json.dumps({"prompt": prompt, "chosen": y, "rejected": y[::-1]}) + "\n")
    return path


@pytest.mark.timeout(60)
def test_preference_response_is_the_final_answer_only(tmp_path):
    """The audit's repro: prompt [user "Say A", assistant "A A A A A A A A", user "Now say B"], chosen
    "B". The counted chosen labels decode to "B" (they were "A A A A A A A AB"); SFT on the same
    conversation still trains every assistant turn."""
    from dist_llama.data import build_tokenizer, open_dataset
    from dist_llama.data.loader import PackedLoader, Source
    from dist_llama.data.pairs import PairLoader
    from dist_llama.data.prepare import prepare

    tok_path = llama3_tokenizer(tmp_path / "tokenizer.json")
    tok = build_tokenizer(tok_path)
    turns = [{"role": "user", "content": "Say A"}, {"role": "assistant", "content": "A A A A A A A A"},
             {"role": "user", "content": "Now say B"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": turns, "chosen": "B", "rejected": "C"}) + "\n")
    prepare([str(tmp_path / "p.jsonl")], tok, str(tmp_path / "pref"), fmt="preference", progress=False)
    data = open_dataset(str(tmp_path / "pref"), tok_path)
    for mask_special, end in ((True, ""), (False, "<|eot_id|>")):
        row = PairLoader(data, 256, 1, 0, 1, mask_special=mask_special).row(0)
        counted = row["labels"] != -100
        for side, answer in ((0, "B"), (1, "C")):
            assert tok.decode(row["labels"][counted & (row["doc_ids"] == side)].tolist()) == answer + end

    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": turns + [{"role": "assistant", "content": "B"}]}) + "\n")
    prepare([str(tmp_path / "c.jsonl")], tok, str(tmp_path / "chat"), fmt="chat", progress=False)
    chat = open_dataset(str(tmp_path / "chat"), tok_path)
    batch = PackedLoader([Source("chat", chat)], len(chat) - 1, 1, 0, 1, loss_mask=True).next_batch()
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100].tolist()) == "A A A A A A A A<|eot_id|>B<|eot_id|>"


def _final_answer(ids: list[int], tok) -> slice:
    """The final assistant answer's content tokens, found from the template's header tokens alone."""
    header = [tok.special_id("<|start_header_id|>"), *tok.encode("assistant"), tok.special_id("<|end_header_id|>"),
              *tok.encode("\n\n")]
    starts = [i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert ids[-1] == tok.special_id("<|eot_id|>")
    return slice(starts[-1], len(ids) - 1)


def _multiturn_one_rank(overrides, tok_path, run_dir):
    """DPO loss, gradient-free metrics and a plain implementation that scores only each pair's
    final answer, on the first batch after a perturbation of the policy."""
    from dist_llama.data import build_tokenizer
    from dist_llama.model import Transformer
    from dist_llama.parallel.env import init_distributed

    cfg, sources = resolve_config(DEBUG, [*TINY, *overrides, *OPTIONS, "checkpoint.enabled=false",
                                          f"train.run_dir={run_dir}"], 1)
    trainer = build_trainer(cfg, init_distributed("cpu"), sources)
    (policy,) = trainer.engine.parts
    _perturb(policy.named_parameters())
    batch = trainer.parts.loader.next_batch()
    loss, _ = trainer.compute_gradients(batch)
    metrics = dict(trainer.parts.step.metrics)
    trainer.close()

    tok = build_tokenizer(tok_path)
    ref = Transformer(cfg.model)
    ref.init_weights(cfg.train.seed)
    model = Transformer(cfg.model)
    model.load_state_dict(ref.state_dict())
    _perturb(model.named_parameters())
    data = sources[0].data
    losses, rewards = [], []
    with torch.no_grad():
        for k in [trainer.parts.loader._pair(i) for i in range(8)]:
            sides = []
            for doc in (2 * k, 2 * k + 1):
                start = int(data.doc_starts[doc])
                stop = int(data.doc_starts[doc + 1]) if doc + 1 < data.n_docs else len(data)
                ids = data.tokens(start, stop).tolist()
                span = _final_answer(ids, tok)
                x = torch.tensor(ids)[None]
                target = torch.tensor(ids[span])
                scored = []
                for m in (model, ref):
                    lp = torch.log_softmax(m(x)[0].float(), -1)[span.start - 1:span.stop - 1]
                    scored.append(lp.gather(1, target[:, None])[:, 0].sum())
                sides.append((*scored, len(target)))
            (pc, rc, nc), (pr, rr, _) = sides
            losses.append(-F.logsigmoid(BETA * ((pc - rc) - (pr - rr))) - NLL * pc / nc)
            rewards.append([BETA * (pc - rc), BETA * (pr - rr)])
    r = torch.tensor(rewards)
    return loss.item(), metrics, torch.stack(losses).mean().item(), r[:, 0].mean().item(), r[:, 1].mean().item()


@pytest.mark.timeout(120)
def test_dpo_multiturn_prompt_scores_only_the_final_answer(tmp_path):
    """Multi-turn prompts: the loss with Llama 3's NLL term and the logged rewards equal a plain
    implementation that scores only the final answer (the old code counted the prompt's earlier
    assistant turn too: loss and rewards were off)."""
    from dist_llama.data.prepare import prepare

    tok = llama3_tokenizer(tmp_path / "tokenizer.json")
    prepare([str(_multiturn_prefs(tmp_path, 16))], tok, str(tmp_path / "data"), fmt="preference", progress=False)
    overrides = [f"data.tokenizer={tok}", f"data.path={tmp_path / 'data'}", "train.objective=dpo", "model.vocab_size=-1",
                 "data.seq_len=256", "data.eval_fraction=0", "train.global_batch_size=8",
                 f"train.dpo.beta={BETA}", "train.peak_flops=1e12"]
    loss, metrics, expected, chosen, rejected = run_ranks(_multiturn_one_rank, 1, overrides, tok, tmp_path / "run", timeout=100)[0]
    assert loss == pytest.approx(expected, rel=1e-5)
    assert metrics["reward_chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-6)
    assert metrics["reward_rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-6)
