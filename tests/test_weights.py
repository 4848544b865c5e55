"""Weights in: checkpoint.init_from from a Hugging Face directory (sharded safetensors), a Meta
original directory (one file, or two model-parallel shards) and a dist_llama checkpoint, into every
layout; checked against transformers' own loss on the same batch, and every bad input exits 2
naming the key or file before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from dist_llama.testing import run_ranks
from sharp import randomize_
from trainrun import DEBUG, TINY

# The tiny model of the layout tests, with Llama 3.1 RoPE scaling (an original context of 32 so that
# the 64-token sequences go beyond it) and the byte tokenizer's vocabulary.
MODEL = ["model.use_scaled_rope=true", "model.rope_old_context_len=32", "model.rope_theta=10000"]


def hf_llama():
    import transformers

    from dist_llama.model import ModelArgs, ffn_hidden_dim

    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=ffn_hidden_dim(ModelArgs(dim=64, multiple_of=32)),
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="eager",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    return randomize_(transformers.LlamaForCausalLM(config).float().eval(), seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_llama().save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()  # sharded: the index is read
    return path


def hf_loss(hf_dir, batch) -> float:
    """transformers' mean cross-entropy on a packed batch: its own model, loaded by itself, with
    the same document mask (a 4-D additive mask) and positions."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    doc = batch["doc_ids"]
    seq = doc.shape[1]
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"], attention_mask=mask[:, None], position_ids=batch["positions"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100).item()


def _first_loss(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.data import PackedLoader
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, dataset = resolve_config(DEBUG, [*TINY, *MODEL, *overrides], world_size)
    trainer = build_trainer(cfg, init_distributed("cpu"), dataset)
    loss, _ = trainer.compute_gradients(trainer.parts.loader.next_batch())
    events = [e["event"] for e in trainer.logger.events] if hasattr(trainer.logger, "events") else None
    trainer.close()
    full = PackedLoader(dataset, cfg.data.seq_len, cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed).next_batch()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return loss.item(), full if rank == 0 else None, events


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,layout", [
    (1, []),
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"]),
    (2, ["parallel.dp_shard=2", "train.meta_init=true"]),
    (4, ["parallel.dp_shard=2", "parallel.tp=2", "train.meta_init=true"]),
    (2, ["parallel.engine=ddp"]),
    (2, ["parallel.cp=2", "parallel.dp_shard=1"]),
    (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
], ids=["1rank", "fsdp2", "tp2", "pp2", "fsdp2_meta", "fsdp2_tp2_meta", "ddp2", "cp2", "zero3_2"])
def test_init_from_hugging_face_gives_transformers_loss(hf_dir, tmp_path, world, layout):
    results = run_ranks(_first_loss, world, [f"train.run_dir={tmp_path}", f"checkpoint.init_from={hf_dir}",
                                             "checkpoint.enabled=false", *layout], world, timeout=200)
    loss, batch, _ = results[0]
    reference = hf_loss(hf_dir, batch)
    for rank_loss, _, _ in results:
        assert rank_loss == pytest.approx(reference, rel=1e-5), (rank_loss, reference)


def _train_from(overrides, world_size):
    import torch.distributed as dist

    from dist_llama.train.cli import resolve_config, train

    cfg, dataset = resolve_config(DEBUG, [*TINY, *MODEL, *overrides], world_size)
    trainer = train(cfg, dataset)
    dist.destroy_process_group()
    return [h["loss"] for h in trainer.history]


def our_logits(path, tokens):
    """dist_llama's logits from a checkpoint, one process: the reference the export must match."""
    from dist_llama.model import Transformer
    from dist_llama.weights import open_weights

    source = open_weights(path)
    model = Transformer(source.args).eval()
    model.load_state_dict({name: source.read(name) for name in source.names()}, strict=True)
    with torch.no_grad():
        return model(tokens)


@pytest.mark.timeout(300)
def test_train_from_hugging_face_then_export_loads_in_transformers(hf_dir, tmp_path):
    """init_from a HF directory under FSDP-2, 5 steps, export the run (sharded safetensors): the
    export loads in transformers as it is and gives dist_llama's logits; the weights did change."""
    import transformers

    from dist_llama.weights.export import main as export

    run = tmp_path / "run"
    losses = run_ranks(_train_from, 2, [f"train.run_dir={run}", f"checkpoint.init_from={hf_dir}", "train.steps=5",
                                        "checkpoint.interval=0"], 2, timeout=200)[0]
    assert len(losses) == 5
    out = tmp_path / "export"
    # The default is fp32: the master weights, exactly.
    assert export(["--checkpoint", str(run), "--out", str(out), "--max-shard-gb", "0.0002"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["num_key_value_heads"] == 2
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    tokens = torch.randint(0, 258, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = exported(input_ids=tokens).logits
        before = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")(input_ids=tokens).logits
    ours = our_logits(run, tokens)
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= 1e-5
    assert (theirs - before).abs().max() > 1e-3  # trained: not the initial weights passed through
    # bf16 export: half the bytes, same model within bf16 rounding.
    out16 = tmp_path / "export16"
    assert export(["--checkpoint", str(run), "--out", str(out16), "--dtype", "bf16"]) == 0
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert 0.45 < size(out16) / size(out) < 0.55


def _meta_dir(hf_dir, path, shards: int):
    """Meta's original format of the HF weights: params.json and `shards` model-parallel files, split
    as Meta's fairscale layers split them (Llama 2: the embedding along dim)."""
    from dist_llama.weights import open_weights

    source = open_weights(hf_dir)
    a = source.args
    path.mkdir()
    (path / "params.json").write_text(json.dumps({
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.kv_heads,
        # Llama 2's params.json leaves the vocabulary to the weights.
        "vocab_size": a.vocab_size if shards == 1 else -1, "multiple_of": a.multiple_of,
        "ffn_dim_multiplier": a.ffn_dim_multiplier,
        "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope}))
    column = ("wq", "wk", "wv", "w1", "w3", "output")
    row = ("wo", "w2", "tok_embeddings")
    files = [{} for _ in range(shards)]
    for name in source.names():
        t = source.read(name)
        module = name.split(".")[-2]
        dim = 0 if module in column else 1 if module in row else None
        for i in range(shards):
            files[i][name] = t.chunk(shards, dim)[i].clone() if dim is not None else t.clone()
    for i, sd in enumerate(files):
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shards", [1, 2])
def test_meta_import_equals_hugging_face_import(hf_dir, tmp_path, shards):
    from dist_llama.weights import open_weights

    # Our (no-RoPE-scaling-constant) params.json: Meta's records only use_scaled_rope, with the
    # reference's fixed constants; this model's original context is 32, so compare the tensors.
    meta = open_weights(_meta_dir(hf_dir, tmp_path / "meta", shards))
    hf = open_weights(hf_dir)
    assert sorted(meta.names()) == sorted(hf.names())
    for name in hf.names():
        assert meta.shape(name) == hf.shape(name), name
        assert torch.equal(meta.read(name), hf.read(name)), name
        # a slice (what a sharded rank reads) across the shard boundary
        rows = hf.shape(name)[0]
        box = (slice(rows // 4, 3 * rows // 4),)
        assert torch.equal(meta.read(name, box), hf.read(name)[box]), name


def _bad_hf_dirs(hf_dir, tmp_path):
    """Copies of the HF directory each broken in one way, with the word the error must name."""
    from safetensors.torch import load_file, save_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    cases = {}
    for case in ("missing", "shape", "extra", "truncated", "corrupt"):
        d = tmp_path / case
        shutil.copytree(hf_dir, d)
        tensors = load_file(d / victim)
        if case == "missing":
            del tensors["model.layers.1.mlp.down_proj.weight"]
        elif case == "shape":
            tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
        elif case == "extra":
            tensors["model.layers.1.mlp.gate_bias.weight"] = torch.zeros(3)
        if case in ("missing", "shape", "extra"):
            save_file(tensors, d / victim, metadata={"format": "pt"})
        elif case == "truncated":
            data = (d / victim).read_bytes()
            (d / victim).write_bytes(data[: len(data) - 100])
        else:
            (d / victim).write_bytes(b"\x00garbage" * 10)
        cases[case] = (d, {"missing": "layers.1.feed_forward.w2.weight is missing",
                           "shape": "layers.1.feed_forward.w2.weight has shape",
                           "extra": "model.layers.1.mlp.gate_bias.weight",
                           "truncated": victim, "corrupt": victim}[case])
    return cases


@pytest.mark.timeout(120)
def test_bad_initial_weights_exit_2_naming_the_key_or_file(hf_dir, tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    from dist_llama.config import EXIT_CONFIG
    from dist_llama.train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    cases = [(["checkpoint.init_from=" + str(hf_dir), "model.n_kv_heads=4"],
              "model.n_kv_heads: checkpoint has 2, config has 4"),
             (["checkpoint.init_from=" + str(hf_dir), "model.rope_old_context_len=64"],
              "model.rope_old_context_len: checkpoint has 32, config has 64"),
             ([f"checkpoint.init_from={tmp_path}/nowhere"], "nowhere")]
    cases += [([f"checkpoint.init_from={d}"], expect) for d, expect in _bad_hf_dirs(hf_dir, tmp_path).values()]
    for overrides, expect in cases:
        run = tmp_path / "run"
        code = main(["--config", DEBUG, f"train.run_dir={run}", *TINY, *MODEL, *overrides])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_CONFIG, (overrides, err)
        assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, (expect, err)
        assert "checkpoint.init_from" in err or "model." in err, err
        assert not run.exists() and not dist.is_initialized()


def _plain_loss(path, batch) -> float:
    """One process, no dist_llama training code: the model from the checkpoint on the whole batch."""
    from dist_llama.model import Transformer
    from dist_llama.weights import open_weights

    source = open_weights(path)
    model = Transformer(source.args).eval()
    model.load_state_dict({name: source.read(name) for name in source.names()}, strict=True)
    with torch.no_grad():
        logits = model(batch["tokens"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


@pytest.mark.timeout(300)
def test_init_from_a_dist_llama_run_into_other_layouts_and_resume_wins(hf_dir, tmp_path):
    """A run saved under FSDP-2 starts runs under tp2 and pp2 (DCP reads the chunks each shard
    needs); a run directory with a checkpoint of its own resumes it and says init_from was not used."""
    from rundir import events

    first = tmp_path / "first"
    run_ranks(_train_from, 2, [f"train.run_dir={first}", f"checkpoint.init_from={hf_dir}", "train.steps=2",
                               "checkpoint.interval=0"], 2, timeout=200)
    for layout in (["parallel.tp=2", "parallel.dp_shard=1"],
                   ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"]):
        results = run_ranks(_first_loss, 2, [f"train.run_dir={tmp_path}/{layout[0]}", f"checkpoint.init_from={first}",
                                             "checkpoint.enabled=false", *layout], 2, timeout=200)
        loss, batch, _ = results[0]
        assert loss == pytest.approx(_plain_loss(first, batch), rel=1e-5), layout
    # The first run's own directory: resume (step 2 → 3), not a fresh start from init_from.
    losses = run_ranks(_train_from, 2, [f"train.run_dir={first}", f"checkpoint.init_from={hf_dir}", "train.steps=3",
                                        "checkpoint.interval=0"], 2, timeout=200)[0]
    assert len(losses) == 1
    ignored = [e for e in events(first) if e["event"] == "init_from_ignored"]
    assert len(ignored) == 1 and "step-00000002" in ignored[0]["resume"]
    assert [e["event"] for e in events(first)].count("init_from") == 1


@pytest.mark.timeout(120)
def test_fields_the_config_leaves_unset_come_from_the_checkpoint(tmp_path):
    """A transformers save with its own defaults (rms_norm_eps 1e-6, a larger vocabulary): the debug
    preset does not set those, so they are taken from the checkpoint; what it sets must agree."""
    import transformers

    from dist_llama.train.cli import resolve_config

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    cfg, _ = resolve_config(DEBUG, [f"checkpoint.init_from={tmp_path / 'hf'}", f"train.run_dir={tmp_path / 'run'}"], 1)
    assert (cfg.model.norm_eps, cfg.model.vocab_size, cfg.model.dim) == (1e-6, 300, 128)


class _Published:
    """A checkpoint's architecture as published, with exactly the tensors such a model has."""

    def __init__(self, args):
        from dist_llama.weights import expected_shapes

        self.args, self.path, self._shapes = args, "published", expected_shapes(args)

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]


# Hugging Face config.json and Meta params.json values of the published checkpoints.
_HF = dict(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
PUBLISHED_HF = {
    "llama2_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama2_13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama2_70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=_LLAMA31_ROPE),
    "llama3_70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                       rope_scaling=_LLAMA31_ROPE),
    "llama3_405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling=_LLAMA31_ROPE),
}
PUBLISHED_META = {  # (params.json, vocabulary of the output layer)
    "llama2_7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                   "vocab_size": -1}, 32000),
    "llama2_70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                    "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 32000),
    "llama3_8b": ({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                   "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                   "vocab_size": 128256}, 128256),
    "llama3_405b": ({"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128,
                     "n_kv_heads": 8, "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True, "vocab_size": 128256}, 128256),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_HF))
def test_presets_take_the_published_checkpoints_as_they_are(preset):
    from pathlib import Path
    from types import SimpleNamespace

    from dist_llama import config as config_lib
    from dist_llama.model.hf import args_from_hf_config
    from dist_llama.weights.load import check_source
    from dist_llama.weights.sources import _args_from_meta_params

    model = config_lib.to_object(config_lib.load(f"{preset}.yaml")).model
    check_source(_Published(args_from_hf_config(SimpleNamespace(**_HF, **PUBLISHED_HF[preset]))), model)
    if preset in PUBLISHED_META:
        params, vocab = PUBLISHED_META[preset]
        check_source(_Published(_args_from_meta_params(params, model.max_seq_len, Path("params.json"), vocab)), model)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_run_is_read_as_weights(hf_dir, tmp_path, stage):
    """A run saved by DeepSpeed ZeRO-2/3 on 2 ranks: its fp32 master weights equal what DeepSpeed's
    own zero_to_fp32 reassembles, and it starts an FSDP run at the plain model's loss."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dist_llama.weights import open_weights

    run = tmp_path / "ds"
    run_ranks(_train_from, 2, [f"train.run_dir={run}", f"checkpoint.init_from={hf_dir}", "train.steps=2",
                               "checkpoint.interval=0", "parallel.engine=deepspeed",
                               f"parallel.zero_stage={stage}"], 2, timeout=250)
    source = open_weights(run)
    step_dir = next((run / "checkpoints").iterdir())
    # The reference unpickles DeepSpeed's files: fine here, this test wrote them.
    reference = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    assert sorted(source.names()) == sorted(k for k in reference if k.endswith(".weight"))
    for name in source.names():
        assert torch.equal(source.read(name), reference[name].float()), name
    loss, batch, _ = run_ranks(_first_loss, 2, [f"train.run_dir={tmp_path}/fsdp", f"checkpoint.init_from={run}",
                                                "checkpoint.enabled=false"], 2, timeout=200)[0]
    assert loss == pytest.approx(_plain_loss(run, batch), rel=1e-5)
