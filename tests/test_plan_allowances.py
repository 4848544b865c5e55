"""Device allowances (plan/allowances.py): what a CUDA rank holds beyond its tensors, each figure
checked against its formula written out here from the documented defaults (NCCL's buffer sizes,
torch's cuBLAS workspace sizes), and the planner's use of them: the table's lines, the JSON's device
total, `fits`, and --search's memory cap."""

import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from dist_llama.config import ParallelConfig, resolve_parallel
from dist_llama.plan.allowances import device_allowances
from dist_llama.plan.cli import format_table, main, resolved_config
from dist_llama.plan.estimate import Memory, estimate
from dist_llama.plan.hardware import hardware_preset

pytestmark = pytest.mark.timeout(60)

KiB, MiB, GiB = 2**10, 2**20, 2**30
# NCCL's defaults: NCCL_BUFFSIZE (Simple) 4 MiB; LL 8 lines x 512 threads x 8 steps x 16 B;
# LL128 120 elements x 640 threads x 8 steps x 8 B (src/init.cc, src/include/device.h).
SIMPLE, LL, LL128 = 4 * MiB, 8 * 512 * 8 * 16, 120 * 640 * 8 * 8
RECEIVE = SIMPLE + LL + LL128  # one connection's buffers, ~9.19 MiB
SEND_OVER_NET = SIMPLE + LL128  # staged in the sender's device memory (GPUDirect RDMA)
NVLS_PER_HEAD = 16 * 2 * 128 * KiB * 8  # sm90: 16 channels x 2 x NCCL_NVLS_CHUNKSIZE x 8 steps
P2P_OVER_NET_PER_PEER = 2 * 2 * 128 * KiB * 8  # 2 channels per net peer x 128 KiB chunks x 8 steps, both ends


def parallel(gpus, **degrees):
    return resolve_parallel(ParallelConfig(**degrees), gpus)


def test_405b_layout_on_16k_h100s():
    """tp8 x pp16 x dp128 (FSDP): six communicators. The world (8 of its ranks on a node) and tp
    (all 8 on the node) have 16 channels with a ring and a tree connection each; the world
    carries no bulk traffic, tp adds NVLink SHARP with 8 heads; pp and the three data-parallel
    groups have one rank per node, so every connection leaves the node; pp adds send/recv to its
    two neighbour stages."""
    p = parallel(16384, tp=8, pp=16, pp_schedule="interleaved_1f1b", pp_virtual_stages=7)
    assert (p.tp, p.pp, p.dp_shard, p.cp, p.dp_replicate) == (8, 16, 128, 1, 1)
    world = 16 * 2 * (RECEIVE + SEND_OVER_NET / 8)
    tp = 16 * 2 * RECEIVE + 8 * NVLS_PER_HEAD
    across = 16 * 2 * (RECEIVE + SEND_OVER_NET)
    pp = across + 2 * P2P_OVER_NET_PER_PEER
    peak = 70 * GiB
    a = device_allowances(p, hardware_preset("h100"), peak)
    assert a.communicators == 6  # world, tp, pp, dp_shard x cp, dp, dp x cp
    assert a.nccl == pytest.approx(world + tp + pp + 3 * across)
    assert a.cuda_context == 512 * MiB
    assert a.workspaces == 2 * 4096 * KiB * 8  # Hopper: :4096:8 per handle; forward and backward threads
    assert a.fragmentation == pytest.approx(0.05 * peak)
    assert a.total == pytest.approx(512 * MiB + 64 * MiB + a.nccl + 0.05 * peak)
    fixed = device_allowances(p, hardware_preset("h100"), peak, expandable_segments=False)
    assert fixed.fragmentation == pytest.approx(0.15 * peak) and fixed.nccl == a.nccl


def test_two_rank_groups_and_other_hardware():
    # Two ranks: ring and tree share the one peer, one connection per channel.
    p = parallel(2, tp=2)
    a = device_allowances(p, hardware_preset("h100"), 0.0)
    assert a.communicators == 2  # world and tp (the same ranks, two communicators)
    assert a.nccl == pytest.approx(16 * RECEIVE + 16 * RECEIVE + 2 * NVLS_PER_HEAD)
    # A100: 24 channels, no NVLink SHARP, torch's default workspace :4096:2:16:8.
    a100 = device_allowances(p, hardware_preset("a100"), 0.0)
    assert a100.nccl == pytest.approx(2 * 24 * RECEIVE)
    assert a100.workspaces == 2 * (4096 * KiB * 2 + 16 * KiB * 8)
    # DDP shards nothing: its groups are the world, dp and dp x cp only (8 ranks of one node).
    ddp = device_allowances(parallel(8, engine="ddp"), hardware_preset("h100"), 0.0)
    dp8 = 16 * 2 * RECEIVE + 8 * NVLS_PER_HEAD
    assert ddp.communicators == 3 and ddp.nccl == pytest.approx(16 * 2 * RECEIVE + 2 * dp8)
    # pp2 x dp4 on one node: the pipeline pair sends to its one neighbour over NVLink, 16 channels
    # of 512 KiB x 8 steps (NCCL_P2P_NVL_CHUNKSIZE); FSDP's shard group, dp and dp x cp have 4 ranks.
    piped = device_allowances(parallel(8, pp=2), hardware_preset("h100"), 0.0)
    pp2 = 16 * RECEIVE + 16 * 512 * KiB * 8
    dp4 = 16 * 2 * RECEIVE + 4 * NVLS_PER_HEAD
    assert piped.communicators == 5 and piped.nccl == pytest.approx(16 * 2 * RECEIVE + pp2 + 3 * dp4)


def test_cpu_ranks_have_no_allowances():
    a = device_allowances(parallel(8, tp=2, pp=2), hardware_preset("cpu", ranks=8), 123.0)
    assert a.total == 0 and a.communicators == 0


def test_the_module_imports_no_torch():
    code = "import sys, dist_llama.plan.allowances; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_table_and_json_add_the_allowances_to_the_tensors(capsys):
    args = ["--config", "configs/llama3_405b.yaml", "--gpus", "16384"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for line in ("cuda context", "cublas workspaces", "nccl buffers", "(6 communicators)",
                 "fragmentation", "(expandable_segments, 5% of the tensors)", "device total"):
        assert line in table
    assert main([*args, "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    mem, allow = est["memory"], est["allowances"]
    # Memory.total stays the tensors: every byte field of Memory (host memory and counts aside).
    tensors = sum(mem[f.name] for f in dataclasses.fields(Memory)
                  if f.name not in ("in_flight_microbatches", "activation_per_layer_microbatch", "host"))
    assert mem["total"] == pytest.approx(tensors)
    parts = allow["cuda_context"] + allow["workspaces"] + allow["nccl"] + allow["fragmentation"]
    assert allow["total"] == pytest.approx(parts)
    assert est["device_total"] == pytest.approx(tensors + parts)
    assert allow["fragmentation"] == pytest.approx(0.05 * tensors)
    assert est["fits"] == (tensors + parts <= hardware_preset("h100").memory_bytes)
    assert main([*args, "--json", "--no-expandable-segments"]) == 0
    fixed = json.loads(capsys.readouterr().out)["estimate"]["allowances"]
    assert fixed["fragmentation"] == pytest.approx(0.15 * tensors) and not fixed["expandable_segments"]


def test_a_layout_that_fits_by_tensors_alone_does_not_fit():
    cfg = resolved_config("configs/llama3_8b.yaml", ["parallel.tp=2", "train.global_batch_size=8"], 8)
    est = estimate(cfg, hardware_preset("h100"))
    between = (est.memory.total + est.memory.total + est.allowances.total) / 2
    hw = dataclasses.replace(hardware_preset("h100"), memory_bytes=between)
    tight = estimate(cfg, hw)
    assert tight.memory.total < hw.memory_bytes and not tight.fits
    table = format_table(tight, cfg, hw).splitlines()
    assert "DOES NOT FIT" in next(line for line in table if "device total" in line)
    assert not any("DOES NOT FIT" in line for line in table if "(tensors)" in line)


def test_search_drops_a_layout_over_the_cap_with_its_allowances(capsys):
    """The best layout under a roomy cap, given a cap between its tensors and its device total,
    is no longer listed; every layout listed has its device total under the cap."""
    args = ["--config", "configs/llama3_8b.yaml", "--gpus", "64", "--search", "--fast", "--top", "200", "--json"]
    assert main(args) == 0
    best = json.loads(capsys.readouterr().out)[0]
    tensors, device = best["estimate"]["memory"]["total"], best["estimate"]["device_total"]
    assert device - tensors > 1 * GiB
    cap = (tensors + device) / 2
    assert main([*args, "--memory-cap", str(cap / GiB)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found and best["parallel"] not in [layout["parallel"] for layout in found]
    for layout in found:
        assert layout["estimate"]["device_total"] <= cap
        assert layout["estimate"]["device_total"] == pytest.approx(
            layout["estimate"]["memory"]["total"] + layout["estimate"]["allowances"]["total"])


@pytest.mark.timeout(120)
def test_fake_step_peak_plus_allowances():
    """--dry-run --memory on a CUDA target: the fake step's peak plus the allowances of a tp2 pair
    (two 2-rank communicators on one node, 5% of that peak for fragmentation). In a process of its
    own: a fake step in the test process leaves DTensor's caches filled from fake tp2 ops, which
    later fork-started tp2 ranks inherit (two tp2 init_from tests then failed in the full suite)."""
    tiny = ["--config", "configs/debug.yaml", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.vocab_size=258", "data.seq_len=64", "train.global_batch_size=2",
            "parallel.tp=2", "--gpus", "2", "--hardware", "h100"]
    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", *tiny, "--dry-run", "--memory", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout)["memory"]
    nccl = 2 * 16 * RECEIVE + 2 * NVLS_PER_HEAD
    expected = 512 * MiB + 2 * 32 * MiB + nccl + 0.05 * mem["peak"]
    assert mem["device_peak"] == pytest.approx(mem["peak"] + expected)


@pytest.mark.timeout(120)
def test_confirm_drops_a_layout_whose_stepped_peak_fits_only_without_allowances():
    """--confirm on a CUDA target: dp2 of a tiny model, stepped on fake tensors, fits a cap one
    byte over its peak by tensors but not with its allowances (the world, FSDP's shard group, dp
    and dp x cp: four 2-rank communicators, three with NVLink SHARP)."""
    from dist_llama.plan.search import confirm, format_search, search

    cfg = resolved_config("configs/debug.yaml", ["model.dim=64", "model.n_layers=2", "model.n_heads=4",
                                                 "model.n_kv_heads=2", "model.vocab_size=258", "data.seq_len=64",
                                                 "train.global_batch_size=2"], 2, layout=False)
    hw = hardware_preset("h100")
    flat = next(r for r in search(cfg, 2, hw, 2**40, top=100) if r[0].parallel.dp == 2 and r[0].parallel.ac == "none")
    (roomy,) = confirm([flat], 2, hw, 2**40, 1, "cuda")
    nccl = 16 * RECEIVE + 3 * (16 * RECEIVE + 2 * NVLS_PER_HEAD)
    allowances = 512 * MiB + 2 * 32 * MiB + nccl + 0.05 * roomy["peak"]
    assert roomy["fits"] and roomy["device_peak"] == pytest.approx(roomy["peak"] + allowances)
    cap = roomy["peak"] + 1
    (tight,) = confirm([flat], 2, hw, cap, 1, "cuda")
    assert tight["peak"] == roomy["peak"] and not tight["fits"]
    ranking, _, dropped = format_search([flat], cap, [tight]).partition("\ndropped")
    assert "rank 0" in dropped and "rank 0" not in ranking
