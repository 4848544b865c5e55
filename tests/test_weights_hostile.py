"""Weight sources that lie (issue 25 items 2, 6, 8, 15, 16 and item 12's weight inputs): crafted
safetensors headers, non-finite weights, malformed config.json / params.json, a missing shard, Meta
shards that disagree, a tokenizer that is not the checkpoint's. Every one is refused with exit 2 and
one line naming the file and the key or tensor, by the reader, `dist-llama-export`,
`dist-llama-generate` and `checkpoint.init_from` alike, before a byte of the lie is used.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from trainrun import DEBUG, TINY

# TINY's architecture with the byte tokenizer's 258 ids.
ARCH = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=258, multiple_of=32, max_seq_len=512,
            rope_theta=10000.0)
VICTIM = "model.layers.1.post_attention_layernorm.weight"  # ours: layers.1.ffn_norm.weight
PROMPT = ["--prompt", "In the beginning", "--max-new-tokens", "4"]


def _args():
    from dist_llama.model import ModelArgs

    return ModelArgs(**ARCH)


def _state():
    """Random weights of the model, in our names (an independent writer: no dist_llama reader)."""
    from dist_llama.weights import expected_shapes

    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in expected_shapes(_args()).items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face directory written with the safetensors library and export's config.json."""
    from safetensors.torch import save_file

    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    path = tmp_path_factory.mktemp("hf") / "hf"
    path.mkdir()
    save_file(to_hf_state_dict(_state(), _args()), path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(_args(), torch.float32, 256, 257)))
    return path


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, header_len=None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + body


def _crafted(hf_dir, tmp_path, case: str):
    """A copy of the HF directory whose model.safetensors is crafted one way; the tensor it names."""
    d = tmp_path / case
    shutil.copytree(hf_dir, d)
    header, body = _split((d / "model.safetensors").read_bytes())
    entry = header[VICTIM]
    begin, end = entry["data_offsets"]
    named = VICTIM
    if case == "overlapping_offsets":  # 4 bytes of the tensor before it
        entry["data_offsets"] = [begin - 4, end - 4]
    elif case == "offsets_past_eof":
        entry["data_offsets"] = [len(body), len(body) + end - begin]
    elif case == "size_mismatch":
        entry["data_offsets"] = [begin, end - 4]
    elif case == "huge_shape_small_file":  # the probe's 4.7 KB directory that exported 2.3 GB
        entry["shape"] = [1 << 20, 1 << 10]
        entry["data_offsets"] = [begin, begin + (4 << 30)]
    elif case == "negative_shape":
        entry["shape"] = [-64]
    elif case == "unknown_dtype":
        entry["dtype"] = "F8_E4M3"
    elif case == "bytes_no_tensor_claims":  # a polyglot tail
        body += b"#!/bin/sh\nrm -rf\n"
        named = None
    elif case == "header_length_past_eof":
        (d / "model.safetensors").write_bytes(_join(header, body, header_len=len(body) + 10 ** 6))
        return d, None
    elif case == "header_is_a_list":
        (d / "model.safetensors").write_bytes(_join([1, 2, 3], body))
        return d, None
    elif case == "duplicate_tensor":
        blob = json.dumps(header).encode()
        blob = blob[:-1] + b', "' + VICTIM.encode() + b'": ' + json.dumps(entry).encode() + b"}"
        (d / "model.safetensors").write_bytes(_join(blob, body))
        return d, VICTIM
    (d / "model.safetensors").write_bytes(_join(header, body))
    return d, named


SAFETENSORS_CASES = ["overlapping_offsets", "offsets_past_eof", "size_mismatch", "huge_shape_small_file",
                     "negative_shape", "unknown_dtype", "bytes_no_tensor_claims", "header_length_past_eof",
                     "header_is_a_list", "duplicate_tensor"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _export(d, out, capsys) -> tuple[int, str]:
    from dist_llama.weights.export import main as export

    code = export(["--checkpoint", str(d), "--out", str(out)])
    return code, _one_line(capsys)


def _generate(d, capsys) -> tuple[int, str]:
    from dist_llama.generate import main as generate

    code = generate(["--checkpoint", str(d), "--tokenizer", "byte", *PROMPT])
    return code, _one_line(capsys)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_a_crafted_safetensors_header_is_refused_naming_file_and_tensor(hf_dir, tmp_path, case, capsys):
    from dist_llama.weights import WeightsError, open_weights

    d, tensor = _crafted(hf_dir, tmp_path, case)
    expect = [str(d / "model.safetensors")] + ([tensor] if tensor else [])
    with pytest.raises(WeightsError) as info:
        open_weights(d)
    assert all(e in str(info.value) for e in expect), str(info.value)
    code, err = _export(d, tmp_path / "out", capsys)
    assert code == 2 and all(e in err for e in expect), err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    code, err = _generate(d, capsys)
    assert code == 2 and all(e in err for e in expect), err


@pytest.mark.timeout(60)
def test_the_untouched_file_still_reads_exactly(hf_dir):
    """The checks refuse nothing the safetensors library writes: every tensor equals what was saved."""
    from dist_llama.weights import open_weights

    source = open_weights(hf_dir)
    for name, value in _state().items():
        assert torch.equal(source.read(name), value), name


def _train_main(overrides, monkeypatch, capsys, tmp_path) -> tuple[int, str]:
    import torch.distributed as dist

    from dist_llama.train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    run = tmp_path / "run"
    code = main(["--config", DEBUG, f"train.run_dir={run}", *TINY, "checkpoint.enabled=false", "train.steps=1",
                 *overrides])
    assert not dist.is_initialized()
    return code, _one_line(capsys)


@pytest.mark.timeout(120)
def test_init_from_a_crafted_header_exits_2_before_any_process_group(hf_dir, tmp_path, monkeypatch, capsys):
    d, tensor = _crafted(hf_dir, tmp_path, "overlapping_offsets")
    code, err = _train_main([f"checkpoint.init_from={d}"], monkeypatch, capsys, tmp_path)
    assert code == 2 and "checkpoint.init_from" in err and str(d / "model.safetensors") in err and tensor in err, err
    assert not (tmp_path / "run").exists()


def test_export_module_command_exits_2(hf_dir, tmp_path):
    """`python -m dist_llama.weights.export` on the probe's huge-shape file: exit 2 at once, nothing written."""
    d, tensor = _crafted(hf_dir, tmp_path, "huge_shape_small_file")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dist_llama.weights.export", "--checkpoint", str(d), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and tensor in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- non-finite weights (item 6)
def _poisoned(hf_dir, tmp_path, value: float):
    """The HF directory with one element of VICTIM set to `value` (the file stays valid)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / f"poisoned_{value}"
    shutil.copytree(hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    tensors[VICTIM][17] = value
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_exit_2_naming_file_and_tensor(hf_dir, tmp_path, value, capsys):
    from dist_llama.weights import WeightsError, open_weights

    d = _poisoned(hf_dir, tmp_path, value)
    expect = [str(d / "model.safetensors"), f"tensor {VICTIM}"]
    with pytest.raises(WeightsError) as info:
        open_weights(d).read("layers.1.ffn_norm.weight")
    assert all(e in str(info.value) for e in expect) and "1 NaN or infinite" in str(info.value), str(info.value)
    for code, err in (_export(d, tmp_path / "out", capsys), _generate(d, capsys)):
        assert code == 2 and all(e in err for e in expect), err


@pytest.mark.timeout(180)
def test_init_from_non_finite_weights_exits_2_not_a_crash_loop(hf_dir, tmp_path, monkeypatch, capsys):
    """The check is made where each rank reads its part (a full read before training would read the
    whole model on every rank); exit 2, named, instead of the probe's exit 3 after NaN steps."""
    d = _poisoned(hf_dir, tmp_path, float("nan"))
    code, err = _train_main([f"checkpoint.init_from={d}"], monkeypatch, capsys, tmp_path)
    assert code == 2 and "checkpoint.init_from" in err and VICTIM in err and str(d / "model.safetensors") in err, err


def _start_from(overrides, world_size):
    """One rank of a run started from init_from: (exit code, reason) of the TrainingExit it stopped with."""
    import torch.distributed as dist

    from dist_llama.train.cli import resolve_config, train
    from dist_llama.train.recovery import TrainingExit

    cfg, sources = resolve_config(DEBUG, [*TINY, *overrides], world_size)
    try:
        train(cfg, sources)
        outcome = (0, "")
    except TrainingExit as exc:
        outcome = (exc.code, exc.reason)
    if dist.is_initialized():
        dist.destroy_process_group()
    return outcome


@pytest.mark.timeout(180)
def test_a_nan_only_one_rank_reads_stops_every_rank_with_exit_2(hf_dir, tmp_path):
    """FSDP-2 over 2 ranks: row 0 of the embedding is rank 0's shard only; both ranks stop with exit 2
    naming the tensor (no rank trains on, none waits for the other)."""
    from safetensors.torch import load_file, save_file

    from dist_llama.testing import run_ranks

    d = tmp_path / "nan_row0"
    shutil.copytree(hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.embed_tokens.weight"][0, 3] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    results = run_ranks(_start_from, 2, [f"train.run_dir={tmp_path}/run", f"checkpoint.init_from={d}",
                                         "checkpoint.enabled=false", "train.steps=1", "parallel.dp_shard=2"], 2,
                        timeout=150)
    for code, reason in results:
        assert code == 2 and "model.embed_tokens.weight" in reason and str(d / "model.safetensors") in reason, reason


@pytest.mark.timeout(60)
def test_a_meta_shard_with_inf_is_named(hf_dir, tmp_path, capsys):
    d = _meta_dir(tmp_path / "meta", {"layers.2.attention.wo.weight": float("inf")})
    code, err = _export(d, tmp_path / "out", capsys)
    assert code == 2 and str(d / "consolidated.01.pth") in err and "tensor layers.2.attention.wo.weight" in err, err


def test_finiteness_is_checked_in_bounded_pieces():
    from dist_llama.weights.validate import WeightsError, check_finite

    t = torch.zeros(3, 5)
    assert check_finite(t, "f", "t") is t
    assert check_finite(torch.tensor(1.0), "f", "t").item() == 1.0
    t[2, 4] = float("nan")
    with pytest.raises(WeightsError, match="f: tensor t holds 1 NaN"):
        check_finite(t[:, 1:], "f", "t")  # a strided slice: checked without a copy of the whole


# ------------------------------------------------------------ malformed configs and directories (items 12, 15)
def _meta_dir(path, poison=None, params=None, shards=2, mutate=None):
    """Meta's format of the state: params.json and `shards` files split as fairscale splits them."""
    a = _args()
    path.mkdir(parents=True)
    p = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.kv_heads, "vocab_size": -1,
         "multiple_of": a.multiple_of, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0}
    (path / "params.json").write_text(json.dumps(params if params is not None else p))
    files = [{} for _ in range(shards)]
    for name, t in _state().items():
        if poison and name in poison:
            t[-1, -1] = poison[name]
        module = name.split(".")[-2]
        dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}.get(module)
        for i in range(shards):
            files[i][name] = t.chunk(shards, dim)[i].clone() if dim is not None else t.clone()
    if mutate:
        mutate(files)
    for i, sd in enumerate(files):
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    return path


def _hf_config_case(key, value):
    def edit(config):
        if key == "<whole>":
            return value
        target = config
        *parents, leaf = key.split(".")
        for k in parents:
            target = target[k]
        target[leaf] = value
        return config
    return edit


HF_CONFIG_CASES = {  # case: (edit of config.json, the key the message names)
    "hidden_size_a_string": (_hf_config_case("hidden_size", "128"), "hidden_size"),
    "hidden_size_a_list": (_hf_config_case("hidden_size", [64]), "hidden_size"),
    "heads_0": (_hf_config_case("num_attention_heads", 0), "num_attention_heads"),
    "kv_3_does_not_divide_heads": (_hf_config_case("num_key_value_heads", 3), "num_key_value_heads"),
    "heads_do_not_divide_hidden": (_hf_config_case("num_attention_heads", 5), "num_attention_heads"),
    "rms_norm_eps_0": (_hf_config_case("rms_norm_eps", 0), "rms_norm_eps"),
    "rms_norm_eps_negative": (_hf_config_case("rms_norm_eps", -1), "rms_norm_eps"),
    "rms_norm_eps_nan": (_hf_config_case("rms_norm_eps", float("nan")), "rms_norm_eps"),
    "max_position_embeddings_0": (_hf_config_case("max_position_embeddings", 0), "max_position_embeddings"),
    "max_position_embeddings_negative": (_hf_config_case("max_position_embeddings", -5), "max_position_embeddings"),
    "max_position_embeddings_1e12": (_hf_config_case("max_position_embeddings", 1e12), "max_position_embeddings"),
    "max_position_embeddings_10**12": (_hf_config_case("max_position_embeddings", 10 ** 12), "max_position_embeddings"),
    "vocab_size_true": (_hf_config_case("vocab_size", True), "vocab_size"),
    "rope_theta_inf": (_hf_config_case("rope_theta", float("inf")), "rope_theta"),
    "rope_factors_equal": (_hf_config_case("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                            "high_freq_factor": 4.0}), "rope_scaling.low_freq_factor"),
    "rope_scaling_a_string": (_hf_config_case("rope_scaling", "llama3"), "rope_scaling"),
    "config_a_list": (_hf_config_case("<whole>", [1, 2]), "must be a JSON object"),
    "num_hidden_layers_missing": (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"},
                                  "num_hidden_layers is missing"),
}

META_PARAMS_CASES = {
    "dim_a_string": ({"dim": "64"}, "dim"),
    "n_heads_0": ({"n_heads": 0}, "n_heads"),
    "n_kv_heads_3": ({"n_kv_heads": 3}, "n_kv_heads"),
    "norm_eps_nan": ({"norm_eps": float("nan")}, "norm_eps"),
    "norm_eps_negative": ({"norm_eps": -1e-5}, "norm_eps"),
    "ffn_dim_multiplier_0": ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier"),
    "vocab_size_0": ({"vocab_size": 0}, "vocab_size"),
    "use_scaled_rope_a_string": ({"use_scaled_rope": "yes"}, "use_scaled_rope"),
    "rope_high_freq_factor_1": ({"use_scaled_rope": True, "rope_high_freq_factor": 1.0}, "rope_high_freq_factor"),
    "rope_scaling_factor_inf": ({"use_scaled_rope": True, "rope_scaling_factor": float("inf")}, "rope_scaling_factor"),
}


def _drop(name, shard):
    return lambda files: files[shard].pop(name)


def _reshape(name, shard):
    def edit(files):
        t = files[shard][name]
        files[shard][name] = torch.zeros(t.shape[0] + 1, t.shape[1] + 1)
    return edit


def _inputs(tmp_path):
    """Every hostile weight input of issue 25 item 12 (and 15): (directory, file it must name, words)."""
    from safetensors.torch import save_file

    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    hf = tmp_path / "hf_base"
    hf.mkdir()
    tensors = to_hf_state_dict(_state(), _args())
    save_file(tensors, hf / "model.safetensors")
    config = hf_config(_args(), torch.float32, 256, 257)
    (hf / "config.json").write_text(json.dumps(config))
    cases = {}
    for case, (edit, key) in HF_CONFIG_CASES.items():
        d = tmp_path / f"hf_{case}"
        shutil.copytree(hf, d)
        (d / "config.json").write_text(json.dumps(edit(json.loads(json.dumps(config)))))
        cases[f"config.json:{case}"] = (d, d / "config.json", key)
    # configs that lie about the tensors: more layers, a larger vocabulary than the file holds
    for case, change, words in (("more_layers_than_tensors", {"num_hidden_layers": 5},
                                 "tensor layers.4.attention.wq.weight is missing"),
                                ("vocab_larger_than_tensors", {"vocab_size": 300},
                                 "tensor tok_embeddings.weight has shape (258, 64), the model needs (300, 64)")):
        d = tmp_path / f"hf_{case}"
        shutil.copytree(hf, d)
        (d / "config.json").write_text(json.dumps({**config, **change}))
        cases[f"config.json:{case}"] = (d, d, words)
    # a sharded directory whose index names a shard that is not there
    d = tmp_path / "hf_missing_shard"
    shutil.copytree(hf, d)
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: tensors[k] for k in first}, d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors").unlink()
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                            **{k: "model-00002-of-00002.safetensors" for k in second}}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["index:missing_shard"] = (d, d / "model.safetensors.index.json", "model-00002-of-00002.safetensors")
    d = tmp_path / "hf_index_escapes"
    shutil.copytree(hf, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: "../hf_base/model.safetensors"}}))
    cases["index:file_outside_the_directory"] = (d, d / "model.safetensors.index.json", "../hf_base")
    d = tmp_path / "hf_index_a_list"
    shutil.copytree(hf, d)
    (d / "model.safetensors.index.json").write_text("[]")
    cases["index:a_list"] = (d, d / "model.safetensors.index.json", "weight_map")
    # Meta: malformed params.json, shards that disagree
    base = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
            "norm_eps": 1e-5, "rope_theta": 10000.0}
    for case, (change, key) in META_PARAMS_CASES.items():
        d = _meta_dir(tmp_path / f"meta_{case}", params={**base, **change}, shards=1)
        cases[f"params.json:{case}"] = (d, d / "params.json", key)
    d = _meta_dir(tmp_path / "meta_params_a_list", params=[base], shards=1)
    cases["params.json:a_list"] = (d, d / "params.json", "must be a JSON object")
    d = _meta_dir(tmp_path / "meta_shard_lacks_a_tensor", mutate=_drop("layers.3.feed_forward.w2.weight", 1))
    cases["meta:shard_lacks_a_tensor"] = (d, d / "consolidated.01.pth", "tensor layers.3.feed_forward.w2.weight is missing")
    d = _meta_dir(tmp_path / "meta_shard_shapes_disagree", mutate=_reshape("layers.0.attention.wq.weight", 1))
    cases["meta:shard_shapes_disagree"] = (d, d / "consolidated.01.pth", "tensor layers.0.attention.wq.weight has shape")
    d = _meta_dir(tmp_path / "meta_shard_missing", shards=3)
    (d / "consolidated.01.pth").unlink()
    cases["meta:shard_file_missing"] = (d, d, "consolidated.01.pth")
    d = _meta_dir(tmp_path / "meta_not_a_dict", shards=1)
    torch.save([torch.zeros(1)], d / "consolidated.00.pth")
    cases["meta:file_not_a_dict"] = (d, d / "consolidated.00.pth", "dict of tensor name")
    return cases


@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("inputs"))


HOSTILE = ([f"config.json:{c}" for c in HF_CONFIG_CASES] + ["index:missing_shard", "index:file_outside_the_directory",
           "index:a_list"] + [f"params.json:{c}" for c in META_PARAMS_CASES] +
           ["params.json:a_list", "meta:shard_lacks_a_tensor", "meta:shard_shapes_disagree", "meta:shard_file_missing",
            "meta:file_not_a_dict"])
LYING = ["config.json:more_layers_than_tensors", "config.json:vocab_larger_than_tensors"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", HOSTILE + LYING)
def test_hostile_weight_inputs_exit_2_naming_file_and_key(hostile_inputs, case, tmp_path, capsys):
    """The reader raises WeightsError (a config that lies about the tensors included: open_weights
    checks every tensor against it); export and generate exit 2 with one line naming the file and key."""
    from dist_llama.weights import WeightsError, open_weights

    d, file, words = hostile_inputs[case]
    with pytest.raises(WeightsError) as info:
        open_weights(d)
    message = str(info.value)
    assert str(file) in message and words in message, message
    code, err = _export(d, tmp_path / "out", capsys)
    assert code == 2 and str(file) in err and words in err, err
    code, err = _generate(d, capsys)
    assert code == 2 and str(file) in err and words in err, err


@pytest.mark.timeout(120)
def test_init_from_a_malformed_config_exits_2(hostile_inputs, tmp_path, monkeypatch, capsys):
    d, file, words = hostile_inputs["config.json:kv_3_does_not_divide_heads"]
    code, err = _train_main([f"checkpoint.init_from={d}"], monkeypatch, capsys, tmp_path)
    assert code == 2 and "checkpoint.init_from" in err and str(file) in err and words in err, err


# ---------------------------------------------------------------- the tokenizer of init_from (item 8)
def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<unk>", "in", "the", "beginning"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.mark.timeout(120)
def test_init_from_trained_with_another_tokenizer_exits_2_naming_both(hf_dir, tmp_path, monkeypatch, capsys):
    """An HF directory carrying its tokenizer.json, continued with the byte tokenizer: exit 2 naming
    both, unless checkpoint.init_from_vocab_remapped says so; the same tokenizer elsewhere is fine."""
    from dist_llama.data import build_tokenizer
    from dist_llama.train.cli import resolve_config
    from dist_llama.weights import open_weights

    d = tmp_path / "with_tokenizer"
    shutil.copytree(hf_dir, d)
    _word_tokenizer(d / "tokenizer.json")
    code, err = _train_main([f"checkpoint.init_from={d}"], monkeypatch, capsys, tmp_path)
    assert code == 2 and err.count("data.tokenizer") == 1 and "byte (byte, 258 ids)" in err, err
    assert f"{d / 'tokenizer.json'} (hf:" in err and "7 ids" in err and "init_from_vocab_remapped" in err, err
    assert not (tmp_path / "run").exists()
    overrides = [*TINY, f"train.run_dir={tmp_path}/r", f"checkpoint.init_from={d}"]
    cfg, _ = resolve_config(DEBUG, [*overrides, "checkpoint.init_from_vocab_remapped=true"], 1)
    assert cfg.checkpoint.init_from_vocab_remapped
    from dist_llama.train.cli import check_init_tokenizer

    same = _word_tokenizer(tmp_path / "elsewhere.json")  # the same vocabulary, another path
    check_init_tokenizer(open_weights(d), str(same), build_tokenizer(str(same)))
    # No tokenizer in the source: nothing to compare (the vocabulary size is still checked).
    resolve_config(DEBUG, [*TINY, f"train.run_dir={tmp_path}/r", f"checkpoint.init_from={hf_dir}"], 1)


@pytest.mark.timeout(180)
def test_init_from_a_run_trained_with_another_tokenizer_exits_2(tmp_path, monkeypatch, capsys):
    """The probe's repro: a dist_llama run trained with the byte tokenizer, continued with another one."""
    from dist_llama.testing import run_ranks

    first = tmp_path / "first"
    assert run_ranks(_start_from, 1, [f"train.run_dir={first}", "train.steps=1"], 1, timeout=150) == [(0, "")]
    tok = _word_tokenizer(tmp_path / "tokenizer.json")
    code, err = _train_main([f"checkpoint.init_from={first}", f"data.tokenizer={tok}"], monkeypatch, capsys, tmp_path)
    assert code == 2 and f"data.tokenizer: {tok} (hf:" in err and "byte (byte, 258 ids)" in err, err


def test_same_vocabulary_across_formats_and_runs(tmp_path):
    """A tiktoken file and the tokenizer.json export converts it to are one vocabulary; a dist_llama
    run's recorded data.tokenizer is its identity."""
    import base64
    from types import SimpleNamespace

    from dist_llama.data import ByteTokenizer, HFTokenizer, TiktokenTokenizer
    from dist_llama.weights.hf_tokenizer import write_tokenizer_json
    from dist_llama.weights.tokenizer_identity import same_vocabulary, tokenizer_mismatch

    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"th": 256, b"the": 257, b"in": 258})
    with open(tmp_path / "tokenizer.model", "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    tik = TiktokenTokenizer(tmp_path / "tokenizer.model")
    write_tokenizer_json(tik, tmp_path / "tokenizer.json")
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    assert tik.name != hf.name and same_vocabulary(tik, hf) and same_vocabulary(hf, tik)
    assert not same_vocabulary(tik, ByteTokenizer())
    run = SimpleNamespace(kind="dist_llama", tokenizer="byte", path=tmp_path)
    assert tokenizer_mismatch(run, ByteTokenizer()) is None
    assert tokenizer_mismatch(run, tik) == "byte (byte, 258 ids)"
    unknown = SimpleNamespace(kind="dist_llama", tokenizer=str(tmp_path / "gone.model"), path=tmp_path)
    assert tokenizer_mismatch(unknown, tik) is None  # no identity to compare


# ---------------------------------------------------- generate with a smaller tokenizer (item 16)
@pytest.mark.timeout(60)
def test_generate_never_samples_an_id_the_tokenizer_cannot_decode(hf_dir, tmp_path, capsys):
    """A 7-id tokenizer on a 258-id model: only ids 0..6 are generated (the logits of the others are
    left out), and greedy picks the argmax of the first 7 logits of the whole model."""
    from dist_llama.generate import load_model, main
    from dist_llama.weights import open_weights

    tok = _word_tokenizer(tmp_path / "tokenizer.json")
    argv = ["--checkpoint", str(hf_dir), "--tokenizer", str(tok), "--prompt", "in the beginning", "--json"]
    assert main([*argv, "--max-new-tokens", "60", "--temperature", "5", "--seed", "3"]) == 0
    out = capsys.readouterr()
    ids = json.loads(out.out)["ids"]
    assert len(ids) >= 1 and all(0 <= i < 7 for i in ids), ids
    assert "the model has 258 ids" in out.err and "7" in out.err
    assert main([*argv, "--max-new-tokens", "1"]) == 0
    (first,) = json.loads(capsys.readouterr().out)["ids"]
    full = load_model(open_weights(hf_dir), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits = full(torch.tensor([[0, 4, 5, 6]]))[0, -1]
    assert first == int(logits[:7].argmax())


def test_the_published_configs_pass_the_checks():
    """The caps and rules refuse no published Llama (Llama 2 7B-70B, Llama 3.1 8B-405B)."""
    from pathlib import Path

    from test_weights import _HF, PUBLISHED_HF, PUBLISHED_META

    from dist_llama.weights.validate import check_hf_config, check_meta_params

    for name, values in PUBLISHED_HF.items():
        check_hf_config({**_HF, **values}, Path(f"{name}/config.json"))
    for name, (params, _) in PUBLISHED_META.items():
        check_meta_params(params, Path(f"{name}/params.json"))
