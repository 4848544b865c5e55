"""dist-llama-plan --search searches: the preset's own layout (all GPUs data parallel) is not
validated first; every layout whose data-parallel degree divides the global batch is a candidate,
and when none exists the command says so in one line and exits 2."""

from __future__ import annotations

import json

import pytest

from dist_llama.plan.cli import main


@pytest.mark.timeout(60)
def test_search_finds_layouts_where_the_presets_default_does_not_divide_the_batch(capsys):
    # The preset with all GPUs data parallel: dp = 1024 does not divide 512 sequences.
    assert main(["--config", "configs/llama3_70b.yaml", "--gpus", "1024", "parallel.tp=1"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err
    assert main(["--config", "configs/llama3_70b.yaml", "--gpus", "1024", "parallel.tp=1", "--search", "--fast",
                 "--top", "50", "--json"]) == 0
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


# The debug model as tests/test_memory_dryrun.py steps it: a fake-tensor step takes a second or two.
DEBUG_TINY = ["--config", "configs/debug.yaml", "--hardware", "cpu", "model.dim=64", "model.n_layers=4",
              "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=258", "data.seq_len=64",
              "train.global_batch_size=4"]


@pytest.mark.timeout(120)
def test_search_confirm_steps_the_peak_ranks_and_drops_layouts_over_the_cap():
    """The ranks --confirm steps (one of each of the two pipeline ranks the estimate puts highest:
    here both) hold the highest fake-tensor peak of all the layout's ranks; a layout whose peak is
    over the cap leaves the ranking for the dropped list."""
    from dist_llama.plan.cli import resolved_config
    from dist_llama.plan.hardware import hardware_preset
    from dist_llama.plan.memory import fake_memories
    from dist_llama.plan.search import confirm, format_search, search

    cfg = resolved_config(DEBUG_TINY[1], DEBUG_TINY[4:], 4, layout=False)
    hw = hardware_preset("cpu", ranks=4)
    found = search(cfg, 4, hw, memory_cap=2**40, top=100)
    flat = next(r for r in found if r[0].parallel.pp == 1 and r[0].parallel.ac == "none")
    piped = next(r for r in found if r[0].parallel.pp == 2 and r[0].parallel.pp_schedule == "1f1b"
                 and r[0].parallel.ac == "none")  # dp 2: ranks 0, 1 on stage 0; 2, 3 on stage 1
    every = [mem["peak"] for _, mem in fake_memories([(piped[0], 4, r) for r in range(4)], "cpu")]
    cap = max(every) - 1  # the pipeline layout is one byte over
    confirmed = confirm([flat, piped], 4, hw, cap, 2, "cpu")
    assert [r["rank"] for r in confirmed[0]["ranks"]] == [0]
    assert [r["rank"] for r in confirmed[1]["ranks"]] == [0, 2]
    assert confirmed[1]["peak"] == max(every) and not confirmed[1]["fits"]
    assert confirmed[0]["fits"] == (confirmed[0]["peak"] <= cap)

    ranking, _, dropped = format_search([flat, piped], cap, confirmed).partition("\ndropped")
    assert "1f1b v1" in dropped and "1f1b v1" not in ranking
    assert (f"rank {confirmed[0]['peak_rank']}" in ranking) == confirmed[0]["fits"]

    # Asked for one fitting layout, confirm walks past the best one when its peak is over the cap,
    # and stops at the first that fits.
    (big, big_peak), (small, small_peak) = sorted(((piped, confirmed[1]["peak"]), (flat, confirmed[0]["peak"])),
                                                  key=lambda pair: -pair[1])
    assert big_peak > small_peak
    walked = confirm([big, small], 4, hw, big_peak - 1, 1, "cpu")
    assert [r["fits"] for r in walked] == [False, True]
    assert [r["fits"] for r in confirm([small, big], 4, hw, big_peak - 1, 1, "cpu")] == [True]


@pytest.mark.timeout(60)
def test_search_confirm_on_the_command_line(capsys):
    assert main([*DEBUG_TINY, "--gpus", "4", "--confirm", "1"]) == 2
    assert "--confirm" in capsys.readouterr().err
    assert main([*DEBUG_TINY, "--gpus", "4", "--search", "--top", "2", "--confirm", "1", "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert "confirm" not in second
    (only,) = first["confirm"]["ranks"]  # the best layout has no pipeline: rank 0 stands for all
    assert first["parallel"]["pp"] == 1 and only["rank"] == 0
    assert first["confirm"]["peak"] == only["peak"] == sum(only["by_kind"].values())
    assert only["estimate"] == first["estimate"]["memory"]["total"]
    from dist_llama.plan.hardware import hardware_preset
    assert first["confirm"]["fits"] == (only["peak"] <= hardware_preset("cpu", ranks=4).memory_bytes)


@pytest.mark.timeout(60)
def test_search_steps_the_top_three_unless_fast(capsys):
    assert main([*DEBUG_TINY, "--gpus", "4", "--search", "--fast", "--confirm", "1"]) == 2
    assert "--fast" in capsys.readouterr().err
    assert main([*DEBUG_TINY, "--gpus", "4", "--search", "--fast", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert "--fast: estimate only" in out and "stepped on fake tensors" not in out
    assert main([*DEBUG_TINY, "--gpus", "4", "--search", "--top", "4", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    assert ["confirm" in layout for layout in layouts] == [True, True, True, False][:len(layouts)]
