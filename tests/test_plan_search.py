"""dist-llama-plan --search searches: the preset's own layout (all GPUs data parallel) is not
validated first; every layout whose data-parallel degree divides the global batch is a candidate,
and when none exists the command says so in one line and exits 2."""

from __future__ import annotations

import json

import pytest

from dist_llama.plan.cli import main


@pytest.mark.timeout(60)
def test_search_finds_layouts_where_the_presets_default_does_not_divide_the_batch(capsys):
    # The preset alone: dp = 1024 does not divide 512 sequences.
    assert main(["--config", "configs/llama3_70b.yaml", "--gpus", "1024"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err
    assert main(["--config", "configs/llama3_70b.yaml", "--gpus", "1024", "--search", "--top", "50", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 50
    for layout in found:
        p = layout["parallel"]
        dp = p["dp_replicate"] * p["dp_shard"]
        assert p["tp"] * p["cp"] * p["pp"] * dp == 1024
        assert 512 % dp == 0 and dp < 1024
    mfus = [layout["estimate"]["mfu"] for layout in found]
    assert mfus == sorted(mfus, reverse=True)


@pytest.mark.timeout(60)
def test_search_says_plainly_when_no_layout_exists(capsys):
    # 6 GPUs: tp, cp, pp are powers of two, so dp is 6 or 3, and neither divides 4 sequences.
    assert main(["--config", "configs/llama3_8b.yaml", "--gpus", "6", "--search", "train.global_batch_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no layout of 6 GPUs exists for train.global_batch_size=4" in err and "[6, 3]" in err
