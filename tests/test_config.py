"""Bad configuration → exit code 2 and one line naming the key, before any process group exists."""

import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml

from conftest import ROOT
from dist_llama import config as config_lib
from dist_llama.train.cli import EXIT_CONFIG, main

DEBUG = str(ROOT / "configs" / "debug.yaml")

BAD = [
    # (preset, overrides, world size, key that must be named)
    ("llama3_405b.yaml", ["model.n_heads=7"], 1, "model.n_heads"),
    (DEBUG, ["model.n_kv_heads=3"], 1, "model.n_kv_heads"),
    (DEBUG, ["model.n_heads=12"], 1, "model.n_heads"),
    (DEBUG, ["model.dim=0"], 1, "model.dim"),
    (DEBUG, ["model.foo=1"], 1, "model.foo"),
    (DEBUG, ["--trian.steps=3"], 1, "trian"),
    (DEBUG, ["train.steps=abc"], 1, "train.steps"),
    (DEBUG, ["--train.steps=-4"], 1, "train.steps"),
    (DEBUG, ["train.steps"], 1, "train.steps"),
    (DEBUG, ["model.attn_impl=magic"], 1, "model.attn_impl"),
    (DEBUG, ["model.vocab_size=100"], 1, "model.vocab_size"),
    (DEBUG, ["parallel.dp_shard=3"], 2, "parallel.dp_shard"),
    (DEBUG, ["parallel.dp_replicate=3"], 2, "parallel.dp_shard"),
    (DEBUG, ["parallel.tp=3"], 3, "parallel.tp"),  # does not divide n_kv_heads=4
    (DEBUG, ["parallel.tp=8"], 8, "parallel.tp"),
    (DEBUG, ["parallel.pp=8"], 8, "parallel.pp"),  # more stages than the 4 layers
    (DEBUG, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4"], 2,
     "parallel.pp"),
    (DEBUG, ["parallel.cp=3"], 3, "parallel.cp"),  # 2*cp does not divide seq_len=128
    (DEBUG, ["parallel.cp=2", "data.seq_len=102"], 2, "parallel.cp"),
    (DEBUG, ["parallel.pp=2", "parallel.pp_schedule=zigzag"], 2, "parallel.pp_schedule"),
    (DEBUG, ["parallel.pp=2", "parallel.pp_virtual_stages=2"], 2, "parallel.pp_virtual_stages"),
    (DEBUG, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"], 2, "parallel.pp_virtual_stages"),
    (DEBUG, ["parallel.pp=2", "parallel.pp_layers_per_stage=[1,2]"], 2, "parallel.pp_layers_per_stage"),
    (DEBUG, ["parallel.pp=2", "train.micro_batch_size=8"], 2, "train.micro_batch_size"),  # 1f1b: 1 < pp
    (DEBUG, ["parallel.engine=ddp", "parallel.tp=2"], 2, "parallel.engine"),
    (DEBUG, ["parallel.ac=some"], 1, "parallel.ac"),
    (DEBUG, ["health.nan_action=panic"], 1, "health.nan_action"),
    (DEBUG, ["health.faults=[explode:step=3]"], 1, "health.faults"),
    (DEBUG, ["health.faults=[kill:rank=5:step=3]"], 2, "health.faults"),  # no rank 5 in a 2-rank job
    (DEBUG, ["health.hang_timeout_s=-1"], 1, "health.hang_timeout_s"),
    # Check parameters that would silently switch a check off or make its action impossible.
    (DEBUG, ["health.spike_window=5"], 1, "health.spike_window"),  # < spike_min_history=10
    (DEBUG, ["health.spike_min_history=1"], 1, "health.spike_min_history"),
    (DEBUG, ["health.spike_zscore=0"], 1, "health.spike_zscore"),
    (DEBUG, ["health.grad_norm_max=-1"], 1, "health.grad_norm_max"),
    (DEBUG, ["health.rollback_lr_scale=2"], 1, "health.rollback_lr_scale"),
    (DEBUG, ["health.straggler_factor=1"], 2, "health.straggler_factor"),
    (DEBUG, ["health.sdc_interval=5", "health.sdc_action=skip"], 2, "health.sdc_action"),
    (DEBUG, ["health.nan_action=rollback", "checkpoint.enabled=false"], 1, "health.nan_action"),
    (DEBUG, ["checkpoint.interval_s=-5"], 1, "checkpoint.interval_s"),
    (DEBUG, ["parallel.engine=horovod"], 1, "parallel.engine"),
    (DEBUG, ["train.global_batch_size=7"], 2, "train.global_batch_size"),
    (DEBUG, ["train.micro_batch_size=3"], 1, "train.micro_batch_size"),
    (DEBUG, ["data.seq_len=1024"], 1, "data.seq_len"),
    (DEBUG, ["train.global_batch_size=1024", "data.seq_len=8192", "model.max_seq_len=8192"], 1, "data.seq_len"),
    (DEBUG, ["data.tokenizer=/nonexistent/tokenizer.model"], 1, "data.tokenizer"),
    (DEBUG, ["data.path=/nonexistent/shards"], 1, "data.path"),
    (DEBUG, ["optim.beta2=1.5"], 1, "optim.beta2"),
    (DEBUG, ["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio"),
    (DEBUG, ["train.dtype=fp8"], 1, "train.dtype"),
    (DEBUG, ["logging.wandb_mode=cloud"], 1, "logging.wandb_mode"),
    # Values that trained into NaN and a restart loop, or crashed late with a traceback.
    (DEBUG, ["optim.lr=inf"], 1, "optim.lr"),
    (DEBUG, ["optim.weight_decay=inf"], 1, "optim.weight_decay"),
    (DEBUG, ["model.norm_eps=inf"], 1, "model.norm_eps"),
    (DEBUG, ["health.spike_zscore=nan"], 1, "health.spike_zscore"),
    (DEBUG, ["train.seed=-1"], 1, "train.seed"),
    (DEBUG, ["train.seed=18446744073709551616"], 1, "train.seed"),
    (DEBUG, ["train.steps=${nope.x}"], 1, "train.steps"),
    (DEBUG, ["train.run_dir=/proc/version"], 1, "train.run_dir"),  # a file
    (str(ROOT / "configs" / "nope.yaml"), [], 1, "--config"),
    # float8 and async TP: by the config alone, then by the machine (no CUDA here: device=auto is cpu).
    (DEBUG, ["train.float8=true", "train.device=cpu"], 1, "train.float8"),
    (DEBUG, ["train.float8=true"], 1, "train.float8"),
    (DEBUG, ["train.float8=true", "parallel.tp=2"], 2, "train.float8"),
    (DEBUG, ["train.float8=true", "parallel.engine=deepspeed"], 1, "train.float8"),
    (DEBUG, ["parallel.async_tp=true"], 1, "parallel.async_tp"),  # tp=1
    (DEBUG, ["parallel.async_tp=true", "parallel.tp=2", "train.compile=false"], 2, "parallel.async_tp"),
    (DEBUG, ["parallel.async_tp=true", "parallel.tp=2", "train.device=cpu"], 2, "parallel.async_tp"),
    (DEBUG, ["parallel.async_tp=true", "parallel.tp=2"], 2, "parallel.async_tp"),
    (DEBUG, ["parallel.engine=ddp", "parallel.reduce_every_micro_batch=false"], 2, "parallel.reduce_every_micro_batch"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preset,overrides,world,key", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_exits_2_naming_the_key(preset, overrides, world, key, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--config", preset, f"train.run_dir={tmp_path}/run", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CONFIG
    assert len(err.splitlines()) == 1, err
    assert key in err, err
    assert "Traceback" not in err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists(), "a rejected config must not create the run directory"


@pytest.mark.timeout(120)
def test_cli_process_exits_2_for_405b_with_7_heads():
    """The command a user types, in a fresh process: one line on stderr naming model.n_heads."""
    proc = subprocess.run([sys.executable, "-m", "dist_llama.train", "--config", "configs/llama3_405b.yaml",
                           "model.n_heads=7"], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.n_heads" in lines[0], proc.stderr


def test_overrides_both_syntaxes_and_types():
    cfg = config_lib.to_object(config_lib.load(DEBUG, ["train.steps=7", "--optim.lr=0.5", "--model.n_kv_heads=2"]))
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.n_kv_heads) == (7, 0.5, 2)
    assert cfg.model.dim == 128  # from the preset
    assert cfg.optim.beta2 == 0.95  # schema default


def test_dp_shard_is_filled_from_world_size():
    cfg = config_lib.to_object(config_lib.load(DEBUG, ["parallel.dp_replicate=2"]))
    resolved = config_lib.validate(cfg, world_size=8)
    assert (resolved.parallel.dp_replicate, resolved.parallel.dp_shard) == (2, 4)


@pytest.mark.parametrize("name,layers,dim,heads,kv,ffn,vocab,lr", [
    ("llama2_7b", 32, 4096, 32, 32, 11008, 32000, 3e-4),
    ("llama2_13b", 40, 5120, 40, 40, 13824, 32000, 3e-4),
    ("llama2_34b", 48, 8192, 64, 8, 22016, 32000, 1.5e-4),
    ("llama2_70b", 80, 8192, 64, 8, 28672, 32000, 1.5e-4),
    ("llama3_8b", 32, 4096, 32, 8, 14336, 128256, 3e-4),
    ("llama3_70b", 80, 8192, 64, 8, 28672, 128256, 1.5e-4),
    ("llama3_405b", 126, 16384, 128, 8, 53248, 128256, 8e-5),
])
def test_presets_match_published_dims(name, layers, dim, heads, kv, ffn, vocab, lr):
    """Figures from REFERENCE.md (Llama 2 Table 1, Llama 3 Table 3), not from our own code."""
    from dist_llama.model.llama import ffn_hidden_dim

    cfg = config_lib.to_object(config_lib.load(str(ROOT / "configs" / f"{name}.yaml")))
    m = cfg.model
    assert (m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.vocab_size) == (layers, dim, heads, kv, vocab)
    assert ffn_hidden_dim(m) == ffn
    assert cfg.optim.lr == lr
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == \
        (0.9, 0.95, 1e-5, 0.1, 1.0)
    config_lib.validate_model(m)
    if name.startswith("llama3"):
        assert m.use_scaled_rope and m.rope_theta == 500000.0
    tokens_per_batch = cfg.train.global_batch_size * cfg.data.seq_len
    assert tokens_per_batch == {"llama3_405b": 16 * 2**20}.get(name, 4 * 2**20)


def test_resolved_config_round_trips(tmp_path):
    cfg = config_lib.to_object(config_lib.load(DEBUG, ["train.steps=3"]))
    path = config_lib.save_resolved(config_lib.validate(cfg, 1), tmp_path)
    again = config_lib.to_object(config_lib.load(str(path)))
    assert again.train.steps == 3 and again.parallel.dp_shard == 1
    assert yaml.safe_load(path.read_text())["model"]["dim"] == 128


@pytest.mark.timeout(60)
def test_a_section_that_is_not_a_mapping_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    preset = tmp_path / "bad.yaml"
    preset.write_text("model: 5\ntrain:\n  steps: 3\n")
    assert main(["--config", str(preset), f"train.run_dir={tmp_path}/run"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dist_llama: config error: model:"), err


def test_float8_and_async_tp_against_the_machine():
    """validate_device, the machine-dependent half, for machines this test does not run on."""
    cfg = config_lib.to_object(config_lib.load(DEBUG, ["train.float8=true", "parallel.async_tp=true",
                                                       "parallel.tp=2"]))
    config_lib.validate_device(cfg, "cuda", (9, 0))  # H100 / H200
    config_lib.validate_device(cfg, "cuda", (8, 9))  # L4, RTX 4090
    with pytest.raises(config_lib.ConfigError, match="8.0") as exc:  # A100: no float8 tensor cores
        config_lib.validate_device(cfg, "cuda", (8, 0))
    assert exc.value.key == "train.float8"
    with pytest.raises(config_lib.ConfigError) as exc:
        config_lib.validate_device(cfg, "cpu", None)
    assert exc.value.key == "parallel.async_tp"
