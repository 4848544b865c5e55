"""Validation on held-out data: the split keeps training and held-out documents apart; val_loss is
the plain-PyTorch mean over the held-out windows and the same on every layout (≤ 1e-5), the
pipeline's forward-only schedule included; training computes the same losses, bit for bit, with
validation on or off; bad settings exit 2 naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainrun import DEBUG, TINY
from dist_llama.config import ConfigError
from dist_llama.data.heldout import SliceSource, eval_batches, split_held_out
from dist_llama.data.loader import PackedLoader
from dist_llama.testing import run_ranks

STEPS = 2
# 2048 tokens = 32 windows of 64: two full global batches of 12 and one of 8 plus 4 padding rows.
EVAL = ["data.eval_fraction=0.01", "train.eval_tokens=2048", "checkpoint.enabled=false", f"train.steps={STEPS}"]


def _run_rank(overrides, world_size, reference=False):
    import torch.distributed as dist

    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.cli import resolve_config, train

    cfg, sources = resolve_config(DEBUG, [*TINY, *EVAL, *overrides], world_size)
    trainer = train(cfg, sources)
    out = {"losses": [h["loss"] for h in trainer.history],
           "val": [(h["step"], h["val_loss"], h["val_loss_by_source"]) for h in trainer.history if "val_loss" in h]}
    params = gather_full_state_dict(trainer.engine.parts) if reference else None
    if reference and dist.get_rank() == 0:
        out["reference"] = _reference_loss(cfg, params, sources.held_out[0].data, cfg.train.eval_tokens)
    dist.destroy_process_group()
    return out


def _reference_loss(cfg, params, held_out: SliceSource, eval_tokens: int) -> float:
    """Plain PyTorch: the model's mean cross-entropy over the first held-out windows, read straight
    from the dataset, each token's position counted from its document's start or the window's."""
    from dist_llama.model import Transformer

    model = Transformer(cfg.model)
    model.load_state_dict(params)
    ds, L = held_out.data, cfg.data.seq_len
    rows = []
    for i in range(eval_tokens // L):
        first = held_out.start + i * L
        tokens = torch.from_numpy(ds.tokens(first, first + L + 1))
        doc = torch.from_numpy(ds.doc_ids(first, first + L))
        pos = torch.arange(L) - torch.searchsorted(doc, doc)  # index of the document's first token here
        rows.append((tokens, doc, pos))
    tokens, doc, pos = (torch.stack(t) for t in zip(*rows))
    with torch.no_grad():
        logits = model(tokens[:, :-1], doc_ids=doc, positions=pos)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


def run(world_size: int, *overrides: str, reference: bool = False) -> dict:
    return run_ranks(_run_rank, world_size, list(overrides), world_size, reference, timeout=240)[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(1, f"train.run_dir={tmp_path_factory.mktemp('single')}", "train.eval_interval=1", reference=True)


@pytest.mark.timeout(120)
def test_val_loss_is_the_plain_mean_over_the_held_out_windows(single):
    steps = [step for step, _, _ in single["val"]]
    assert steps == list(range(1, STEPS + 1))
    step, val_loss, by_source = single["val"][-1]
    assert by_source == {"kjv": val_loss}
    assert abs(val_loss - single["reference"]) <= 1e-5 * single["reference"], (val_loss, single["reference"])


@pytest.mark.timeout(120)
def test_validation_changes_no_training_loss(single, tmp_path):
    off = run(1, f"train.run_dir={tmp_path}", "train.eval_interval=0")
    assert off["val"] == []
    assert off["losses"] == single["losses"]  # bit for bit


LAYOUTS = [
    # name, world size, overrides; every layout's val_loss equals the single process's
    ("pp2_interleaved", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                            "parallel.pp_virtual_stages=2", "train.micro_batch_size=4"]),
    ("dp2_tp2_pp2", 8, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"]),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,world,overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_val_loss_matches_single_process(single, tmp_path, name, world, overrides):
    on = run(world, f"train.run_dir={tmp_path}/on", "train.eval_interval=1", *overrides)
    assert [s for s, _, _ in on["val"]] == [s for s, _, _ in single["val"]]
    for (_, got, _), (_, want, _) in zip(on["val"], single["val"]):
        assert abs(got - want) <= 1e-5 * want, (name, on["val"], single["val"])
    for got, want in zip(on["losses"], single["losses"]):
        assert abs(got - want) <= 1e-5 * want
    if name.startswith("pp2"):  # the schedule switches between eval and step: training unchanged
        off = run(world, f"train.run_dir={tmp_path}/off", "train.eval_interval=0", *overrides)
        assert off["losses"] == on["losses"]


class _Doc:
    """An in-memory token source of documents of uneven length (token value = document id), that
    records every token it is asked for."""

    fingerprint = "docs"

    def __init__(self, lengths):
        self.starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        self.ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)
        self.read: set[int] = set()

    def __len__(self):
        return len(self.ids)

    def tokens(self, start, stop):
        self.read.update(range(start, stop))
        return self.ids[start:stop].copy()

    def doc_starts_in(self, start, stop):
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        return self.starts[first:max(last, first + 1)]


@pytest.mark.timeout(60)
def test_training_and_held_out_documents_are_disjoint():
    data = _Doc(np.random.default_rng(0).integers(5, 60, size=80))
    head, tail = split_held_out(data, 0.2)
    assert head.stop == tail.start and tail.stop == len(data) and data.starts.tolist().count(tail.start) == 1
    assert 0.2 * len(data) - 60 < len(tail) <= 0.2 * len(data)
    loader = PackedLoader(head, seq_len=16, global_batch_size=8, dp_rank=0, dp_size=1)
    for _ in range(3 * PackedLoader.num_windows_for(head, 16) // 8):  # three epochs: every window
        loader.next_batch()
    trained = set(data.ids[sorted(data.read)])
    data.read.clear()
    for rank in range(2):
        eval_batches(tail, 16, 8, rank, 2, tokens=len(tail))
    evaluated = set(data.ids[sorted(data.read)])
    assert trained and evaluated and not trained & evaluated


@pytest.mark.timeout(60)
def test_kjv_split_cuts_at_a_document_start():
    from dist_llama.train.cli import resolve_config

    cfg, sources = resolve_config(DEBUG, [*TINY, "data.eval_fraction=0.01"], 1)
    (train,), (held_out,) = sources, sources.held_out
    ds = held_out.data.data
    assert train.data.stop == held_out.data.start and ds.doc_starts.tolist().count(held_out.data.start) == 1
    assert ds.doc_ids(train.data.stop - 1, train.data.stop)[0] < ds.doc_ids(held_out.data.start,
                                                                            held_out.data.start + 1)[0]
    assert train.data.fingerprint != ds.fingerprint  # resuming a run without the split is refused


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides,key", [
    (["data.eval_fraction=1.0"], "data.eval_fraction"),
    (["data.eval_fraction=-0.1"], "data.eval_fraction"),
    (["data.eval_fraction=0.0000001", "train.eval_interval=5"], "data.eval_fraction"),  # no document in the tail
    (["train.eval_interval=-1"], "train.eval_interval"),
    (["train.eval_interval=5", "data.eval_fraction=0"], "train.eval_interval"),  # nothing held out
    (["data.eval_fraction=0.1", "train.eval_tokens=0"], "train.eval_tokens"),
    (["data.eval_sources=[{name: a, path: /nonexistent}]"], "data.eval_sources[0].path"),
    (["data.eval_sources=[{name: a, path: kjv}, {name: a, path: kjv}]"], "data.eval_sources[0].name"),
])
def test_config_errors_name_the_key(overrides, key, capsys):
    from dist_llama.train.cli import main, resolve_config

    with pytest.raises(ConfigError) as exc:
        resolve_config(DEBUG, [*TINY, *overrides], 1)
    assert exc.value.key == key
    assert main(["--config", DEBUG, *TINY, *overrides]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_val_loss_on_the_console_and_per_source_in_wandb(tmp_path, capsys):
    from types import SimpleNamespace

    from dist_llama.train.metrics import MetricsLogger, _wandb_fields

    logger = MetricsLogger(tmp_path, 0, 10, SimpleNamespace(console=True, wandb_mode="disabled"), {})
    record = {"step": 2, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 10.0, "mfu": 0.1,
              "val_loss": 2.25, "val_loss_by_source": {"a": 2.0, "b": 2.5}}
    logger.log_step(record, eta_s=1.0)
    assert "loss 2.5000  val 2.2500" in capsys.readouterr().out
    assert '"val_loss_by_source": {"a": 2.0, "b": 2.5}' in (tmp_path / "metrics.jsonl").read_text()
    fields = _wandb_fields(record)
    assert fields["val_loss"] == 2.25 and fields["val_loss/a"] == 2.0 and fields["val_loss/b"] == 2.5
    assert "step" not in fields and "val_loss_by_source" not in fields
