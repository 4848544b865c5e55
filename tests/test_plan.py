"""Planner: the estimator against the published MFU rows (one calibration for all), the CLI,
and the goodput simulator against its closed form."""

import dataclasses
import json

import pytest

from dist_llama.config import Config, DataConfig, ParallelConfig, TrainConfig, resolve_parallel
from dist_llama.model.flops import count_params
from dist_llama.model.llama import ModelArgs
from dist_llama.plan.cli import main
from dist_llama.plan.estimate import activation_bytes_per_layer, estimate
from dist_llama.plan.hardware import hardware_preset

pytestmark = pytest.mark.timeout(120)

LLAMA3_405B = ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                        multiple_of=4096, vocab_size=128256, max_seq_len=131072)
# Megatron-LM README models (H100, seq 4096, DP 48). The README gives sizes only; these are
# GPT-like dims (MHA; SwiGLU FFN of ~8/3 dim, which has the parameters of a 4*dim GELU MLP) in Llama
# form that land on the published sizes.
MEGATRON_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=1024, vocab_size=64000,
                        max_seq_len=4096)  # 7.05 B
MEGATRON_70B = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                         multiple_of=4096, vocab_size=51200, max_seq_len=4096)  # Llama-2-70B dims, 69.3 B
MEGATRON_462B = ModelArgs(dim=19968, n_layers=96, n_heads=156, multiple_of=256, vocab_size=51200,
                          max_seq_len=4096)  # 461.4 B


def layout(model, gpus, tp, cp, pp, seq, global_batch, virtual=1, micro=1, lighter_ends=False):
    """FSDP keeping weights after forward (Llama 3 §3.3.2) and reducing gradients once per step (as
    Megatron's distributed optimizer does), no activation checkpointing, interleaved 1F1B when
    virtual > 1."""
    parallel = ParallelConfig(tp=tp, cp=cp, pp=pp, pp_virtual_stages=virtual,
                              pp_schedule="interleaved_1f1b" if virtual > 1 else "1f1b",
                              pp_lighter_ends=lighter_ends, reshard_after_forward=False,
                              reduce_every_micro_batch=False)
    return Config(model=model, parallel=resolve_parallel(parallel, gpus), data=DataConfig(seq_len=seq),
                  train=TrainConfig(global_batch_size=global_batch, micro_batch_size=micro))


# Llama 3 Table 4: 16M tokens per batch, interleaved schedule; V=7 virtual stages per rank (the
# paper tunes it but does not print it; 112 stages of 1-2 layers with lighter ends). Row 3 with DP 8.
LLAMA3_ROWS = [
    pytest.param(layout(LLAMA3_405B, 8192, 8, 1, 16, 8192, 2048, virtual=7, lighter_ends=True), 0.43, id="405B-8k-gpus"),
    pytest.param(layout(LLAMA3_405B, 16384, 8, 1, 16, 8192, 2048, virtual=7, lighter_ends=True), 0.41, id="405B-16k-gpus"),
    pytest.param(layout(LLAMA3_405B, 16384, 8, 16, 16, 131072, 128, virtual=7, lighter_ends=True), 0.38, id="405B-cp16"),
]
# Megatron-LM README: DP 48, global batch 1536 sequences (32 per DP rank; the README's plot does not
# print batch sizes), micro-batch 1 (2 for the 7.1B), 462B interleaved with 1 layer per virtual stage.
MEGATRON_ROWS = [
    pytest.param(layout(MEGATRON_7B, 96, 2, 1, 1, 4096, 1536, micro=2), 0.47, id="7.1B-tp2"),
    pytest.param(layout(MEGATRON_70B, 768, 8, 1, 2, 4096, 1536), 0.42, id="70B-tp8-pp2"),
    pytest.param(layout(MEGATRON_462B, 6144, 8, 1, 16, 4096, 1536, virtual=6), 0.47, id="462B-tp8-pp16"),
]


def test_megatron_model_sizes():
    for args, size in ((MEGATRON_7B, 7.1e9), (MEGATRON_70B, 70e9), (MEGATRON_462B, 462e9)):
        assert count_params(args)[0] == pytest.approx(size, rel=0.02)


@pytest.mark.parametrize("cfg,published", LLAMA3_ROWS)
def test_llama3_table4_mfu(cfg, published):
    assert abs(estimate(cfg, hardware_preset("h100")).mfu - published) <= 0.03


@pytest.mark.parametrize("cfg,published", MEGATRON_ROWS)
def test_megatron_mfu(cfg, published):
    assert abs(estimate(cfg, hardware_preset("h100")).mfu - published) <= 0.05


def test_more_data_parallel_ranks_with_the_same_batch_lower_mfu():
    """Halving the per-rank batch doubles the relative bubble (Table 4 rows 1 -> 2)."""
    hw = hardware_preset("h100")
    assert estimate(LLAMA3_ROWS[1].values[0], hw).mfu < estimate(LLAMA3_ROWS[0].values[0], hw).mfu


def test_memory_follows_zero3_and_schedule():
    hw = hardware_preset("h100")
    cfg = layout(LLAMA3_405B, 8192, 8, 1, 16, 8192, 2048, virtual=1)
    first, last = estimate(cfg, hw, rank=0), estimate(cfg, hw, rank=8191)
    # Parameters and AdamW states: 12 bytes per parameter over the dp_shard*cp shard (ZeRO-3's 16Ψ/N
    # without the gradients). The gradients are whole, in fp32: torch's pipeline stages reduce-scatter
    # them only after the last of the 32 micro-batches, and the first stage's steady state (its
    # 17th forward follows its first backward) holds them beside its peak activations; the
    # embedding's, Replicate under TP until FSDP reduces it, over the whole vocabulary in FSDP's
    # fp32 accumulator, and, while the stage's backward runs, in bf16 too.
    m = first.memory
    assert m.params + m.optimizer + m.master == pytest.approx(12 * first.params_rank / 64)
    vocab_dim = LLAMA3_405B.vocab_size * LLAMA3_405B.dim
    assert m.grads == pytest.approx(4 * first.params_rank - 4 * vocab_dim / 8 + 4 * vocab_dim)
    assert m.working == pytest.approx(2 * vocab_dim)
    # Without a pipeline, reducing after every micro-batch: ZeRO-3's 16Ψ/N; reducing once per step,
    # the whole fp32 gradient instead of its shard.
    flat = layout(LLAMA3_405B, 8192, 8, 1, 1, 8192, 2048)
    every = estimate(dataclasses.replace(flat, parallel=dataclasses.replace(flat.parallel, reduce_every_micro_batch=True)),
                     hw, rank=0)
    assert every.memory.model_states == pytest.approx(16 * every.params_rank / 1024)
    once = estimate(flat, hw, rank=0).memory
    assert once.params + once.optimizer == pytest.approx(12 * every.params_rank / 1024)
    assert once.grads == pytest.approx(4 * every.params_rank)
    # 1F1B: the first stage holds pp micro-batches, the last one.
    assert (first.memory.in_flight_microbatches, last.memory.in_flight_microbatches) == (16, 1)
    assert last.memory.logits > 0 == first.memory.logits
    full = estimate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ac="full")), hw, rank=0)
    # Full recompute keeps each block's input (2 bytes x tokens x dim / tp), and the stage its
    # output, per micro-batch in flight, plus the one block being recomputed.
    per_layer = activation_bytes_per_layer(LLAMA3_405B, 8192, 8, "none", 2, cuda=True)
    hidden = 2 * 8192 * 16384 / 8
    assert full.memory.activations == pytest.approx(16 * (first.layers + 1) * hidden + per_layer)
    assert full.hardware_flops_rank > first.hardware_flops_rank


def test_cli_table_and_json(capsys):
    argv = ["--config", "llama3_405b.yaml", "--gpus", "8192", "parallel.tp=8", "parallel.pp=16",
            "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=7", "train.micro_batch_size=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "fsdp all-gather/reduce-scatter" in out
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.3 < report["estimate"]["mfu"] < 0.6
    assert report["estimate"]["memory"]["total"] > 0


def test_cli_bad_layout_exits_2(capsys):
    assert main(["--config", "llama3_405b.yaml", "--gpus", "100", "parallel.tp=8"]) == 2
    assert "parallel.dp_shard" in capsys.readouterr().err


# --- goodput ---------------------------------------------------------------------------------------

from dist_llama.plan.goodput import (GoodputConfig, best_interval, expected_ettr, simulate,  # noqa: E402
                                     young_daly_interval)


def test_goodput_llama3_defaults_near_90_percent():
    result = simulate(GoodputConfig(), runs=100, seed=1)
    assert abs(result.ettr_monte_carlo - 0.90) <= 0.02
    # Monte Carlo agrees with the closed form (the run's unsaved tail biases it slightly low).
    assert abs(result.ettr_monte_carlo - result.ettr_expected) <= 0.003
    assert result.failures_per_run == pytest.approx(419, rel=0.1)


def test_goodput_seeded_and_interval_matters():
    cfg = GoodputConfig(interval_s=1800, run_days=10)
    a, b = simulate(cfg, runs=50, seed=3), simulate(cfg, runs=50, seed=3)
    assert a == b
    assert abs(a.ettr_monte_carlo - expected_ettr(cfg, 1800)) <= 0.005
    assert a.ettr_monte_carlo < simulate(GoodputConfig(run_days=10), runs=50, seed=3).ettr_monte_carlo


def test_best_interval_close_to_young_daly():
    for block in (6.3, 148.8):
        cfg = GoodputConfig(checkpoint_block_s=block)
        best, yd = best_interval(cfg), young_daly_interval(cfg)
        assert best == pytest.approx(yd, rel=0.15)
        assert expected_ettr(cfg, best) >= expected_ettr(cfg, yd)


def test_cli_goodput(capsys):
    assert main(["--config", "llama3_8b.yaml", "--gpus", "8", "--goodput"]) == 0
    out = capsys.readouterr().out
    assert "Young/Daly" in out and "Llama 3 figures" in out and "dist_llama measured, scaled" in out


def test_goodput_llama3_figures_beside_dist_llama_measured_ones_at_405b():
    """Llama 3's own figures give its published ~90% on the 405B job; dist_llama's measured
    checkpoint blocking and restart, scaled to that job's per-rank checkpoint, lose far less."""
    from dist_llama import config as config_lib
    from dist_llama.plan.scenarios import MEASURED, checkpoint_bytes_per_rank, compare, dist_llama_scenario

    cfg = config_lib.to_object(config_lib.load("configs/llama3_405b.yaml"))
    cfg = dataclasses.replace(cfg, parallel=resolve_parallel(cfg.parallel, 16384))
    rank_bytes = checkpoint_bytes_per_rank(cfg, hardware_preset("h100"))
    # fp32 weights + Adam m, v of 405 B parameters over 16,384 GPUs: about 0.3 GB per rank.
    assert rank_bytes == pytest.approx(12 * count_params(LLAMA3_405B)[0] / 16384, rel=0.1)
    scaled = dist_llama_scenario(rank_bytes)
    assert scaled.checkpoint_block_s == pytest.approx(
        MEASURED.checkpoint_block_s * rank_bytes / MEASURED.checkpoint_rank_bytes)
    assert scaled.restart_s > MEASURED.restart_s and scaled.detection_s >= MEASURED.detection_s
    reports = compare(rank_bytes, 16384, runs=50, seed=2)
    assert abs(reports["llama3"]["ettr_monte_carlo"] - 0.90) <= 0.02
    assert reports["dist_llama"]["ettr_monte_carlo"] > reports["llama3"]["ettr_monte_carlo"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("config,gpus,layout,rank", [
    ("llama3_405b", 16384, ["parallel.tp=8", "parallel.pp=16", "parallel.dp_shard=128"], 5),
    ("llama3_405b", 16384, ["parallel.tp=8", "parallel.pp=16", "parallel.dp_shard=128"], 16383),  # uneven vocab shard
    ("llama3_70b", 512, ["parallel.tp=8", "parallel.cp=2", "parallel.pp=4", "parallel.dp_replicate=2",
                         "parallel.dp_shard=4", "parallel.pp_schedule=interleaved_1f1b",
                         "parallel.pp_virtual_stages=2"], 300),
])
def test_dry_run_of_one_rank_agrees_with_the_estimator(config, gpus, layout, rank):
    """The real build (pipeline split, TP, CP, FSDP/HSDP) of one rank on a fake process group of the
    full world: its allocated parameters are within 2% of the estimator's, in well under 60 s."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", "--config", f"configs/{config}.yaml",
                           "--gpus", str(gpus), *layout, "--hardware", "h100", "--dry-run", "--rank", str(rank),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dry = json.loads(proc.stdout)["dry_run"]
    assert abs(dry["relative_error"]) <= 0.02, dry
    assert dry["seconds"] < 60


def test_search_lists_valid_layouts_under_the_cap_best_first():
    from dist_llama import config as config_lib
    from dist_llama.plan.search import search

    cfg = config_lib.to_object(config_lib.load("configs/llama3_8b.yaml"))
    hw = hardware_preset("h100")
    roomy = search(cfg, 64, hw, memory_cap=80 * 2**30, top=50)
    tight = search(cfg, 64, hw, memory_cap=20 * 2**30, top=50)
    assert roomy and tight
    mfus = [e.mfu for _, e in roomy]
    assert mfus == sorted(mfus, reverse=True)
    for c, e in roomy + tight:
        p = c.parallel
        assert p.tp * p.cp * p.pp * p.dp_replicate * p.dp_shard == 64
        assert cfg.model.n_kv_heads % p.tp == 0
    assert all(e.memory.total <= 20 * 2**30 for _, e in tight)
    # A tighter cap can only remove layouts, so the best one cannot get better.
    assert tight[0][1].mfu <= roomy[0][1].mfu
    assert any(e.memory.total > 20 * 2**30 for _, e in roomy)


def test_search_png_chart(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    png = tmp_path / "plan.png"
    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", "--config", "configs/llama3_8b.yaml",
                           "--gpus", "64", "--hardware", "h100", "--search", "--fast", "--top", "5", "--png", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 2 + 5  # title, header, 5 layouts
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# --- ZeRO (engine=deepspeed) against the ZeRO paper -----------------------------------------------

def _zero_parallel(stage, n, **kw):
    return resolve_parallel(ParallelConfig(engine="deepspeed", zero_stage=stage, **kw), n)


@pytest.mark.parametrize("stage,paper_gb", [(1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_model_states_match_the_paper(stage, paper_gb):
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5 B parameters, Nd = 64, mixed-precision Adam
    (K = 12): P_os (2+2+K/Nd)Ψ = 31.4 GB, P_os+g (2+(2+K)/Nd)Ψ = 16.6 GB, P_os+g+p (2+2+K)Ψ/Nd = 1.9 GB."""
    from dist_llama.plan.engine_costs import model_states

    psi, nd, k = 7.5e9, 64, 12
    formula = {1: (2 + 2 + k / nd) * psi, 2: (2 + (2 + k) / nd) * psi, 3: (2 + 2 + k) * psi / nd}[stage]
    s = model_states(_zero_parallel(stage, nd), psi, block_params=psi / 32, c=2)
    assert s["params"] + s["master"] + s["grads"] + s["optimizer"] == pytest.approx(formula)
    assert formula / 1e9 == pytest.approx(paper_gb, abs=0.05)
    # Baseline data parallelism, (2+2+K)Ψ = 120 GB, is ZeRO-1 on one rank.
    one = model_states(_zero_parallel(stage, 1), psi, psi / 32, c=2)
    assert one["params"] + one["master"] + one["grads"] + one["optimizer"] == pytest.approx(120e9)


def _zero_config(stage, n=64, **kw):
    return Config(model=MEGATRON_7B, parallel=_zero_parallel(stage, n, **kw), data=DataConfig(seq_len=4096),
                  train=TrainConfig(global_batch_size=n))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_estimate_memory_offload_and_traffic(stage):
    """The whole estimate of a 7 B model on 64 H100s under DeepSpeed: model states by the paper's
    formula, offload moving the optimizer (and ZeRO-3 weight) partitions to the host, and traffic
    of 2Ψ elements per step for ZeRO-1/2 (as plain data parallelism) and 3Ψ for ZeRO-3 (paper §7.2),
    gradients in fp32 as dist_llama's ds_config communicates them, weights in bf16."""
    hw, n = hardware_preset("h100"), 64
    e = estimate(_zero_config(stage), hw)
    psi = count_params(MEGATRON_7B)[0]
    assert e.params_rank == psi
    formula = {1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    assert e.memory.model_states == pytest.approx(formula)
    assert e.params_shard == pytest.approx(psi / n if stage == 3 else psi)
    assert e.memory.buffers == 2 * 5e8  # DeepSpeed's default reduce bucket, bf16
    assert (e.memory.gathered > 0) == (stage == 3)
    traffic = sum(c.bytes_per_step for c in e.collectives if c.name.startswith("zero"))
    weights_bytes = {1: 2, 2: 2, 3: 4}[stage]  # one bf16 all-gather after the step; two per step for ZeRO-3
    assert traffic == pytest.approx((4 + weights_bytes) * psi * (n - 1) / n)

    off = estimate(_zero_config(stage, offload_optimizer=True, offload_params=stage == 3), hw)
    moved = 12 * psi / n + (2 * psi / n if stage == 3 else 0)
    assert off.memory.model_states == pytest.approx(formula - moved)
    assert off.memory.host == pytest.approx(moved + 4 * psi / n)  # + the fp32 gradients CPU Adam steps with
    assert any("offload" in c.name for c in off.collectives)
    assert off.step_seconds > e.step_seconds


def test_cli_reports_zero_engine(capsys):
    assert main(["--config", "llama3_8b.yaml", "--gpus", "64", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                 "parallel.offload_optimizer=true"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed ZeRO-2 (offload optimizer)" in out and "host (ZeRO offload)" in out
    assert "zero-2 reduce-scatter grads" in out


# --- the cpu preset and a real build ---------------------------------------------------------------

def test_cpu_preset_is_measured_and_shares_the_cores():
    from dist_llama.plan.calibrate import cores
    from dist_llama.plan.hardware import CPU_GLOO

    two, eight = hardware_preset("cpu", ranks=2), hardware_preset("cpu", ranks=8)
    assert (two.collective_latency_s, two.inter_node_bw) == CPU_GLOO[2]
    assert (eight.collective_latency_s, eight.inter_node_bw) == CPU_GLOO[8]
    assert two.link_efficiency == 1.0 and two.host_bw == 0
    if cores() <= 2:  # 8 ranks get a quarter of a core each (peaks are measured, so only roughly)
        assert eight.peak_flops < two.peak_flops


def _fsdp_step_states():
    import tempfile

    import torch.distributed as dist

    from conftest import ROOT
    from dist_llama.parallel.env import init_distributed
    from dist_llama.plan.measure import StateProbe
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config(str(ROOT / "configs" / "debug.yaml"),
                                  ["train.steps=1", "checkpoint.enabled=false", "logging.console=false",
                                   f"train.run_dir={tempfile.mkdtemp()}"], 2)
    env = init_distributed("cpu")
    trainer = build_trainer(cfg, env, dataset)
    probe = StateProbe(trainer.engine.parts, trainer.engine.optimizers)
    trainer.fit()
    dist.destroy_process_group()
    return cfg, env.rank, probe.bytes


def test_estimated_model_states_match_a_real_fsdp_build():
    """configs/debug.yaml on 2 fork-started gloo ranks under FSDP: the bytes of the parameter,
    gradient and AdamW-state tensors each rank really holds at the step are the estimator's."""
    from dist_llama.testing import run_ranks

    for cfg, rank, measured in run_ranks(_fsdp_step_states, 2, timeout=100):
        m = estimate(cfg, hardware_preset("cpu", ranks=2), rank=rank).memory
        assert m.master == 0
        for kind, est in (("params", m.params), ("grads", m.grads), ("optimizer", m.optimizer)):
            assert est == pytest.approx(measured[kind], rel=0.02), (kind, est, measured)


@pytest.mark.timeout(120)
def test_selective_checkpointing_counts_over_the_ranks_blocks():
    """Llama 3 405B's rank 0 holds 7 one- or two-block stages (interleaved, V=7): selective
    checkpointing every 2nd block recomputes 4 of its 7 blocks (its 1st, 3rd, 5th and 7th), as the
    estimator counts, not the first block of each of its 7 stages."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", "--config", "configs/llama3_405b.yaml",
                           "--gpus", "16384", "parallel.ac=selective", "parallel.ac_every=2", "--dry-run", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    dry, est = report["dry_run"], report["estimate"]
    assert dry["blocks"] == est["layers"] == 7
    assert dry["recomputed_blocks"] == -(-7 // 2)
