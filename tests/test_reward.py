"""Reward models (train.objective=reward): a scalar head on the Llama backbone, Llama 2's ranking
loss with margins, accuracy per rating, export as transformers' LlamaForSequenceClassification.

- Preference records carry Llama 2's rating or a numeric margin, and Llama 3's ranked rows give
  every ordered pair; each pair remembers its file and line for errors.
- The first step's loss equals transformers' LlamaForSequenceClassification with the same weights
  scoring each sequence alone, through the formula written out here (Llama 2's large margins) and
  through TRL's RewardTrainer.compute_loss, on 1 rank, FSDP-2 and tp2.
- Learns: responses with the target word are preferred; held-out accuracy rises above 0.9, and with
  margins the learned separation is ordered by rating.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatdata import COLOURS, FILLERS, word_tokenizer
from conftest import ROOT
from trainrun import DEBUG, TINY, train
from dist_llama.testing import run_ranks
# imported here, so that forked ranks start with them (the trainer's imports take seconds)
from dist_llama.train.build import build_trainer  # noqa: F401
from dist_llama.train.cli import resolve_config

CHAIN = ("please", "now", "then", "just", "it")
"""Responses start with one of these, each preferred to the next: by a rating that weakens along the
chain (significantly better, ..., negligibly better). Every word but the ends is pushed up by one
rating and down by another, so where it settles depends on the margins."""
LARGE = {0: 3.0, 1: 2.0, 2: 1.0, 3: 0.0}
"""Llama 2's Table 27, large-margin variant, by rating (significantly better ... negligibly better)."""
RATINGS = ["significantly better", "better", "slightly better", "negligibly better / unsure"]


def write_rated(path, n: int, seed: int = 0):
    """Pairs of neighbours of CHAIN, rated by their place in it."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            b, colour = rng.randrange(4), rng.choice(COLOURS)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {colour}"}],
                                "chosen": f"{CHAIN[b]} {colour}", "rejected": f"{CHAIN[b + 1]} {colour}",
                                "rating": RATINGS[b]}) + "\n")
    return path


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    from dist_llama.data.prepare import prepare

    d = tmp_path_factory.mktemp("rated")
    tok = word_tokenizer(d / "tokenizer.json")
    prepare([str(write_rated(d / "train.jsonl", 240))], tok, str(d / "train"), fmt="preference", progress=False)
    prepare([str(write_rated(d / "heldout.jsonl", 64, seed=1))], tok, str(d / "heldout"), fmt="preference",
            progress=False)
    overrides = [f"data.tokenizer={tok}", f"data.path={d / 'train'}", "train.objective=reward", "model.vocab_size=-1",
                 "data.seq_len=32", "data.eval_fraction=0", "train.global_batch_size=8", "train.reward.margin=large"]
    return SimpleNamespace(dir=d, tok=tok, overrides=overrides)


def test_preference_records_carry_ratings_ranked_rows_and_their_origin(tmp_path):
    from dist_llama.data.dataset import TokenDataset
    from dist_llama.data.pairs import ScoredPairLoader
    from dist_llama.data.prepare import prepare

    tok = word_tokenizer(tmp_path / "tok.json")
    p = [{"role": "user", "content": "say red"}]
    records = [{"prompt": p, "chosen": "red", "rejected": "blue", "rating": "Slightly Better"},
               {"prompt": p, "responses": ["red", "rose", "blue"]},  # Llama 3: edited > chosen > rejected
               {"prompt": p, "chosen": "red", "rejected": "gold", "margin": 0.25}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare([str(tmp_path / "p.jsonl")], tok, str(tmp_path / "d"), fmt="preference", progress=False)
    data = TokenDataset.open(tmp_path / "d")
    assert data.n_docs == 2 * 5  # 1 + every ordered pair of 3 + 1
    labels = np.load(tmp_path / "d" / "pairs.npy")
    assert labels[:, 1].tolist() == [1, 2, 2, 2, 3]  # the line of each pair's record
    assert labels[:, 2].tolist() == [2, -1, -1, -1, -1]  # "slightly better", then no rating
    assert np.isnan(labels[:4, 3]).all() and labels[4, 3] == 0.25
    words = [tok_text(data, doc) for doc in range(data.n_docs)]
    assert [(words[2 * k], words[2 * k + 1]) for k in range(1, 4)] == [("red", "rose"), ("red", "blue"), ("rose", "blue")]
    with pytest.raises(ValueError, match=r"p.jsonl:1: no numeric 'margin'"):
        ScoredPairLoader(data, 32, 1, 0, 1, margin="record")
    with pytest.raises(ValueError, match=r"p.jsonl:2: no 'rating'"):
        ScoredPairLoader(data, 32, 1, 0, 1, margin="small")
    loader = ScoredPairLoader(data, 32, 1, 0, 1, margin="none")
    row = loader.row(0)
    chosen_end, rejected_end = row["ends"]
    eot = data.meta["vocab_size"] - 1  # <|eot_id|>, the word tokenizer's last special token
    assert row["tokens"][chosen_end] == eot and row["tokens"][rejected_end] == eot
    assert row["doc_ids"][chosen_end] == 0 and row["doc_ids"][rejected_end] == 1
    assert row["doc_ids"][rejected_end + 1] == 2  # padding after the pair


def tok_text(data, doc: int) -> str:
    """The final answer's words of a preference document (its mask's response tokens)."""
    start = int(data.doc_starts[doc])
    stop = int(data.doc_starts[doc + 1]) if doc + 1 < data.n_docs else len(data)
    ids, mask = data.tokens(start, stop), data.loss_mask(start, stop)
    words = ["<unk>", "system", "user", "assistant", *FILLERS, *COLOURS]  # word_tokenizer's ids
    return " ".join(words[i] for i in ids[mask == 1])


def _hf_reward_model(cfg):
    """transformers' LlamaForSequenceClassification holding the run's initial weights."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dist_llama.model import Transformer
    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    ours = Transformer(cfg.model)
    ours.init_weights(cfg.train.seed)
    hf = LlamaForSequenceClassification(LlamaConfig(**hf_config(cfg.model, torch.float32, None, None)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.model), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def _first_batch_reference(rated):
    """The first step's loss from transformers' scores: the formula written out, and TRL's."""
    from trl import RewardTrainer

    from dist_llama.data.dataset import TokenDataset
    from dist_llama.data.pairs import PairLoader

    cfg, _ = resolve_config(DEBUG, [*TINY, *rated.overrides, "checkpoint.enabled=false"], 1)
    hf = _hf_reward_model(cfg)
    data = TokenDataset.open(rated.dir / "train")
    labels = np.load(rated.dir / "train" / "pairs.npy")
    order = PairLoader(data, cfg.data.seq_len, 8, 0, 1, seed=cfg.train.seed)
    pairs = [order._pair(k) for k in range(8)]

    def seq(doc):
        start = int(data.doc_starts[doc])
        stop = int(data.doc_starts[doc + 1]) if doc + 1 < data.n_docs else len(data)
        return torch.from_numpy(data.tokens(start, stop).astype(np.int64))

    chosen = [seq(2 * k) for k in pairs]
    rejected = [seq(2 * k + 1) for k in pairs]
    margin = torch.tensor([LARGE[int(labels[k, 2])] for k in pairs])
    with torch.no_grad():
        r_c = torch.stack([hf(s[None]).logits[0, 0] for s in chosen])
        r_r = torch.stack([hf(s[None]).logits[0, 0] for s in rejected])
        formula = -torch.log(torch.sigmoid(r_c - r_r - margin)).mean()
        # TRL's RewardTrainer loss on one right-padded batch, chosen rows then rejected rows
        seqs = chosen + rejected
        width = max(len(s) for s in seqs)
        pad = hf.config.pad_token_id
        ids = torch.stack([F.pad(s, (0, width - len(s)), value=pad) for s in seqs])
        mask = torch.stack([torch.arange(width) < len(s) for s in seqs]).long()
        identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
        trainer = SimpleNamespace(model=hf, args=SimpleNamespace(center_rewards_coefficient=None),
                                  accelerator=identity, _metrics={"eval": defaultdict(list)}, _total_train_tokens=0,
                                  _tp_size=1)
        trl = RewardTrainer.compute_loss(trainer, hf, {"input_ids": ids, "attention_mask": mask, "margin": margin})
    return formula.item(), trl.item(), (r_c - r_r).mean().item(), (r_c > r_r).float().mean().item()


@pytest.fixture(scope="module")
def reference(rated):
    return _first_batch_reference(rated)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("layout", [(1,), (2, "parallel.dp_shard=2"), (2, "parallel.tp=2", "parallel.dp_shard=1"),
                                    (2, "parallel.engine=ddp", "parallel.dp_replicate=2", "parallel.dp_shard=1"),
                                    (2, "parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.dp_shard=2")],
                         ids=["1rank", "fsdp2", "tp2", "ddp2", "zero2"])
def test_first_step_loss_equals_transformers_and_trl(rated, reference, layout, tmp_path):
    formula, trl, mean_margin, accuracy = reference
    assert trl == pytest.approx(formula, rel=1e-6)  # the two references agree
    world, *extra = layout
    losses, _ = train(world, *rated.overrides, *extra, "train.steps=1", "checkpoint.enabled=false",
                      f"train.run_dir={tmp_path}")
    assert losses[0] == pytest.approx(formula, rel=1e-5), (losses[0], formula)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["reward_margin"] == pytest.approx(mean_margin, abs=1e-5)
    assert record["accuracy"] == accuracy
    assert record["reward_margin"] == pytest.approx(record["reward_chosen"] - record["reward_rejected"], abs=1e-6)
    assert set(k for k in record if k.startswith("accuracy/")) <= {
        "accuracy/significantly_better", "accuracy/better", "accuracy/slightly_better", "accuracy/negligibly_better"}


def _scores_by_bucket(cfg, params, data_dir):
    """Mean r_c − r_r per rating, and the accuracy, of every held-out pair under the trained weights."""
    from dist_llama.data.dataset import TokenDataset
    from dist_llama.model import Transformer
    from dist_llama.model.reward import score_sequences

    model = Transformer(cfg.model)
    model.load_state_dict(params, strict=False)
    model.init_buffers()
    data = TokenDataset.open(data_dir)
    labels = np.load(data_dir / "pairs.npy")
    docs = []
    for doc in range(data.n_docs):
        start = int(data.doc_starts[doc])
        stop = int(data.doc_starts[doc + 1]) if doc + 1 < data.n_docs else len(data)
        docs.append(data.tokens(start, stop).tolist())
    with torch.no_grad():
        scores = score_sequences(model, docs).view(-1, 2)
    gap = scores[:, 0] - scores[:, 1]
    by_bucket = [gap[torch.from_numpy(labels[:, 2] == b)].mean().item() for b in range(4)]
    return by_bucket, (gap > 0).float().mean().item()


def _learn(rated, run_dir, margin: str):
    """(held-out accuracy at each validation, mean gap per rating) of 80 steps on 2 ranks."""
    overrides = [*rated.overrides, "train.steps=80", "checkpoint.enabled=false", "optim.lr=3e-3",
                 f"data.eval_sources=[{{name: heldout, path: {rated.dir / 'heldout'}}}]", "train.eval_interval=40",
                 "parallel.dp_shard=2", f"train.run_dir={run_dir}", f"train.reward.margin={margin}"]
    _, params = train(2, *overrides)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    val = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    cfg, _ = resolve_config(DEBUG, [*TINY, *overrides], 2)
    by_bucket, accuracy = _scores_by_bucket(cfg, params, rated.dir / "heldout")
    assert accuracy == pytest.approx(val[-1])  # validation in the loop scores what the weights score
    return val, by_bucket


@pytest.mark.timeout(300)
def test_reward_model_learns_and_margins_order_the_ratings(rated, tmp_path):
    val, by_bucket = _learn(rated, tmp_path / "large", "large")
    assert len(val) == 2 and val[-1] > 0.9, val
    assert by_bucket == sorted(by_bucket, reverse=True), by_bucket  # significantly better separated most
    _, plain = _learn(rated, tmp_path / "none", "none")  # the same pairs without margins: no such order
    assert by_bucket[0] - by_bucket[3] > 2 + abs(plain[0] - plain[3]), (by_bucket, plain)


def test_reward_refuses_pipeline_and_context_parallel_naming_the_key(rated):
    from dist_llama.config import ConfigError

    for key in ("parallel.pp", "parallel.cp"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve_config(DEBUG, [*TINY, *rated.overrides, f"{key}=2", "parallel.dp_shard=1"], 2)
    with pytest.raises(ConfigError, match="train.reward.margin"):
        resolve_config(DEBUG, [*TINY, *rated.overrides, "train.reward.margin=huge"], 1)
    with pytest.raises(ConfigError, match="train.eval_interval"):  # validation needs held-out pairs
        resolve_config(DEBUG, [*TINY, *rated.overrides, "train.eval_interval=5"], 1)


def _held_out_sequences(rated) -> list[list[int]]:
    from dist_llama.data.dataset import TokenDataset

    data = TokenDataset.open(rated.dir / "heldout")
    bounds = [*map(int, data.doc_starts), len(data)]
    return [data.tokens(bounds[d], bounds[d + 1]).tolist() for d in range(data.n_docs)]


def _score_cli(argv, capsys) -> tuple[int, list[dict]]:
    from dist_llama.score import main

    code = main(argv)
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


@pytest.mark.timeout(240)
def test_reward_run_from_a_language_model_scores_exports_and_reads_back(rated, tmp_path, capsys):
    """LM run → reward run (init_from: a new head) → dist-llama-score → HF export: transformers'
    AutoModelForSequenceClassification scores what dist_llama scores; init_from of the export too."""
    from transformers import AutoModelForSequenceClassification

    from dist_llama.model import Transformer
    from dist_llama.model.reward import score_sequences
    from dist_llama.weights import open_weights
    from dist_llama.weights.export import main as export
    from dist_llama.weights.load import load_into

    base = [*TINY, *rated.overrides]
    lm = tmp_path / "lm"
    train(1, *base, "train.objective=pretrain", "train.steps=2", f"train.run_dir={lm}")
    run = tmp_path / "reward"
    train(2, *base, "parallel.dp_shard=2", "train.steps=6", f"checkpoint.init_from={lm}", f"train.run_dir={run}")
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    assert [e["path"] for e in events if e["event"] == "score_head_initialised"] == [str(lm / "checkpoints" / "step-00000002")]

    code, lines = _score_cli(["--checkpoint", str(run), "--input", str(rated.dir / "heldout.jsonl"), "--json"], capsys)
    assert code == 0 and len(lines) == 65
    *records, summary = lines
    assert summary["pairs"] == 64
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 64

    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dist_llama.score", "--checkpoint", str(run), "--input", str(rated.dir / "heldout.jsonl"),
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0 and [json.loads(line) for line in two.stdout.splitlines()] == lines, two.stderr[-2000:]

    out = tmp_path / "hf"
    assert export(["--checkpoint", str(run), "--out", str(out)]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    seqs = _held_out_sequences(rated)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [hf.config.pad_token_id] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].view(-1, 2)
    ours = torch.tensor([[r["chosen"], r["rejected"]] for r in records])
    assert (theirs - ours).abs().max() <= 1e-5, (theirs - ours).abs().max()

    source = open_weights(out)  # what checkpoint.init_from reads
    assert source.args.score_head
    model = Transformer(source.args)
    model.init_weights(99)  # nothing of it may survive the load
    load_into(model, source)
    again = score_sequences(model.eval(), seqs).view(-1, 2)
    assert (again - ours).abs().max() <= 1e-5


@pytest.mark.timeout(120)
def test_score_bad_inputs_are_one_line_exit_2(rated, tmp_path, capsys):
    from dist_llama.score import main

    lm = tmp_path / "lm"
    train(1, *TINY, *rated.overrides, "train.objective=pretrain", "train.steps=1", f"train.run_dir={lm}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "say red"}], "chosen": "red"}) + "\n")
    cases = [(["--checkpoint", str(lm), "--input", str(bad)], "is a language model, not a reward model"),
             (["--checkpoint", str(tmp_path / "nope"), "--input", str(bad)], "--checkpoint: no such file")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_pair_longer_than_seq_len_names_its_file_and_line(rated):
    from dist_llama.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.seq_len: .*train\.jsonl:1: the preference pair has \d+ tokens"):
        resolve_config(DEBUG, [*TINY, *rated.overrides, "data.seq_len=16"], 1)


@pytest.mark.timeout(200)
def test_reward_run_resumes_bit_exact(rated, tmp_path):
    """Stopped after the step-2 checkpoint and restarted: the same losses and weights as without a stop."""
    import shutil

    args = [*rated.overrides, "parallel.dp_shard=2", "train.steps=4", "checkpoint.interval=2",
            "checkpoint.async_save=false"]
    whole = tmp_path / "whole"
    losses, params = train(2, *args, f"train.run_dir={whole}")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    resumed_losses, resumed = train(2, *args, f"train.run_dir={cut}")
    assert resumed_losses == losses[2:]
    assert all(torch.equal(resumed[k], params[k]) for k in params)
