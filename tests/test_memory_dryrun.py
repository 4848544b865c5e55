"""The planner's memory dry run (the real step on fake tensors over a fake process group) against
the same step on real tensors in gloo ranks, and the live-bytes tracker against torch's own
MemTracker."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dist_llama.testing import run_ranks

DEBUG = str(ROOT / "configs" / "debug.yaml")
# trainrun.TINY's model with a small batch: every layout's step runs in a second or two.
TINY = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=258",
        "data.seq_len=64", "train.global_batch_size=4"]


def _resolved(overrides, world):
    from dist_llama.plan.cli import resolved_config

    return resolved_config(DEBUG, [*TINY, *overrides], world)


def _tracked_rank(overrides, world):
    from dist_llama.plan.memory import tracked_memory_on_gloo

    return tracked_memory_on_gloo(_resolved(overrides, world))


def _fake_rank(overrides, world, ranks=None):
    # One process per fake run: DTensor and the pipeline cache process-group names that die with
    # the fake group.
    from dist_llama.plan.memory import fake_memory

    rank = int(os.environ["RANK"])
    return fake_memory(_resolved(overrides, world), world, ranks[rank] if ranks else rank, "cpu")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world, overrides", [
    (2, []),                                                              # fsdp2
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2"]),
    (2, ["parallel.cp=2"]),
], ids=["fsdp2", "tp2", "pp2", "cp2"])
def test_fake_step_peak_matches_the_tracked_real_step(world, overrides):
    real = run_ranks(_tracked_rank, world, overrides, world, timeout=100)
    fakes = run_ranks(_fake_rank, world, overrides, world, timeout=100)
    for rank, fake in enumerate(fakes):
        assert fake["peak"] == pytest.approx(real[rank]["peak"], rel=0.05), (rank, fake, real[rank])
        assert fake["moment"]["phase"] == real[rank]["moment"]["phase"], (rank, fake, real[rank])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, overrides, ranks", [
    (8, ["model.n_layers=2", "parallel.dp_shard=2", "parallel.tp=2", "parallel.pp=2"], [0, 2, 4, 6]),
    (4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
         "train.micro_batch_size=1", "train.global_batch_size=8"], [0, 2]),
], ids=["dp2_tp2_pp2", "cp2_pp2_interleaved"])
def test_fake_step_matches_the_tracked_real_step_kind_by_kind(world, overrides, ranks):
    """FSDP with uneven shards on the second dp rank, TP with sequence parallelism and 1F1B together;
    CP under the interleaved schedule, whose sends are waited only at the end of the step (8
    micro-batches, V=2). Fake steps for one rank per (pp, dp) coordinate (its tp and cp peers have
    the same shapes), to save time."""
    real = run_ranks(_tracked_rank, world, overrides, world, timeout=110)
    fakes = run_ranks(_fake_rank, len(ranks), overrides, world, ranks, timeout=110)
    for rank, fake in zip(ranks, fakes):
        assert fake["peak"] == pytest.approx(real[rank]["peak"], rel=0.05), (rank, fake, real[rank])
        assert fake["moment"]["phase"] == real[rank]["moment"]["phase"], (rank, fake, real[rank])
        for kind, n in real[rank]["by_kind"].items():  # the same storages, not errors that cancel
            assert fake["by_kind"][kind] == pytest.approx(n, abs=0.01 * real[rank]["peak"]), (rank, kind, fake, real[rank])


@pytest.mark.timeout(60)
def test_tracker_peak_equals_torch_memtracker_on_one_step():
    """An independent count: torch.distributed._tools.mem_tracker.MemTracker over the same single
    process step (one micro-batch, plain AdamW: what MemTracker can follow)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from dist_llama.model import Transformer
    from dist_llama.plan.memtrack import MemoryTracker

    cfg = _resolved([], 1)
    torch.manual_seed(0)
    peaks = []
    for tracker_cls in (MemoryTracker, MemTracker):
        model = Transformer(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 258, (2, 64))
        if tracker_cls is MemoryTracker:
            tracker = MemoryTracker([model], [opt])
            tracker.register(tokens)
        else:
            tracker = MemTracker()
            tracker.track_external(model, opt, tokens)
        with tracker:
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks.append(tracker.report.peak if tracker_cls is MemoryTracker
                     else max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values()))
        del model, opt, loss
    assert peaks[0] == peaks[1], peaks


@pytest.mark.timeout(90)
def test_cli_memory_dry_run_json():
    # In a process of its own, as the command always runs: the fake process group leaves names in
    # torch's process-global caches (DeviceMesh, DTensor) that later fork-started real ranks of the
    # test session would inherit and resolve to their own groups.
    args = ["--config", DEBUG, "--gpus", "2", "--rank", "1", "--hardware", "cpu", *TINY, "--dry-run", "--memory",
            "--json"]
    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout)["memory"]
    assert mem["peak"] == sum(mem["by_kind"].values())
    # AdamW's exp_avg and exp_avg_sq, plus a scalar step counter per parameter.
    assert mem["by_kind"]["optimizer"] == pytest.approx(2 * mem["by_kind"]["params"], rel=1e-3)
    assert mem["moment"]["step"] == 1 and mem["moment"]["phase"] in ("forward", "backward", "optimizer")


def test_cli_memory_needs_dry_run(capsys):
    from dist_llama.plan.cli import main

    assert main(["--config", DEBUG, "--gpus", "2", *TINY, "--memory"]) == 2
    assert "--memory" in capsys.readouterr().err
