"""Generation: greedy ids against transformers' generate on the same (saved and reloaded) weights, the
KV-cache path against full recomputation, sampling, stopping, and the dist-llama-generate command."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from sharp import randomize_

from dist_llama.generate import load_model, main
from dist_llama.model import ModelArgs, Transformer
from dist_llama.model.generation import generate, sample, stream
from dist_llama.weights import open_weights

VOCAB = 258  # the byte tokenizer's
PROMPT = [256] + list(b"In the beginning")
NEW = 40


def hf_config():
    import transformers  # a test dependency: a missing install must fail, not skip

    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        rope_theta=500000.0,
        # Llama 3.1 scaling with a 16-token "original" context, which the prompt + 40 tokens pass.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers LlamaForCausalLM saved as safetensors, and the model itself."""
    import transformers

    torch.manual_seed(0)
    hf = randomize_(transformers.LlamaForCausalLM(hf_config()).float().eval(), seed=1)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


@pytest.fixture(scope="module")
def ours(hf_dir):
    return load_model(open_weights(hf_dir[0]), torch.device("cpu"), torch.float32)


@pytest.mark.timeout(120)
def test_greedy_matches_transformers_generate(hf_dir, ours):
    _, hf = hf_dir
    assert ours.args.use_scaled_rope and ours.args.n_kv_heads == 2
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    ref = ref[0, len(PROMPT):].tolist()
    assert len(ref) == NEW
    got = generate(ours, [PROMPT], NEW)[0]
    assert got == ref
    assert len(set(got)) > 10  # a real continuation, not one token repeated


@pytest.mark.timeout(120)
def test_sharded_checkpoint_loads_the_same(hf_dir, ours, tmp_path):
    _, hf = hf_dir
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    source = open_weights(tmp_path)
    assert sorted(source.names()) == sorted(ours.state_dict())
    sharded = load_model(source, torch.device("cpu"), torch.float32)
    for name, value in ours.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], value), name


@pytest.mark.timeout(120)
def test_kv_cache_equals_recomputation(ours):
    """Same ids, and the logits of every step within 1e-5, also for a sampled continuation (whose
    tokens are not the argmax, so both paths see the same unusual sequence)."""
    for kw in (dict(), dict(temperature=1.0, top_k=50)):
        runs = []
        for use_cache in (True, False):
            g = torch.Generator().manual_seed(3)
            runs.append(list(stream(ours, PROMPT, NEW, generator=g, use_cache=use_cache, **kw)))
        (cached, full) = runs
        assert [t for t, _ in cached] == [t for t, _ in full] and len(cached) == NEW
        for (_, a), (_, b) in zip(cached, full):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.timeout(120)
def test_kv_cache_with_gqa_in_chunks():
    """Feeding a sequence through the cache in uneven chunks gives the logits of one full forward:
    positions start_pos.. and the offset causal mask are right (GQA, 3 query heads per KV head)."""
    args = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=64)
    torch.manual_seed(0)
    model = randomize_(Transformer(args)).eval()
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 30)
        pieces, start = [], 0
        for n in (7, 1, 12, 1, 9):
            pieces.append(model(tokens[:, start:start + n], start_pos=start, cache=cache))
            start += n
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.timeout(120)
def test_sampling_reproducible_and_top_k_1_is_greedy(ours):
    prompts = [PROMPT, [256] + list(b"And")]
    a = generate(ours, prompts, 20, temperature=0.9, top_p=0.9, seed=7)
    assert a == generate(ours, prompts, 20, temperature=0.9, top_p=0.9, seed=7)
    assert a != generate(ours, prompts, 20, temperature=0.9, top_p=0.9, seed=8)
    assert generate(ours, prompts, 20, temperature=1.5, top_k=1, seed=7) == generate(ours, prompts, 20)


@pytest.mark.timeout(60)
def test_sample_restricts_to_top_k_and_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample(logits, 1.0, generator=g, **kw) for _ in range(400)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7: the second token is still needed
    assert draws(top_p=0.45) == {0}
    assert sample(logits) == 0


def _transformers_scores(logits, temperature, top_k, top_p):
    """The scores transformers' sampling warpers leave (-inf outside the eligible set)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(torch.zeros(1, 1, dtype=torch.long), logits.float()[None].clone())[0]


def _logit_cases():
    g = torch.Generator().manual_seed(3)
    near_equal = 1e-3 * torch.randn(100, generator=g)  # the audit's case: top-k mass 0.1 < top_p
    peaked = 3 * torch.randn(258, generator=g)
    flat = 0.3 * torch.randn(258, generator=g)
    return [(near_equal, 1.0, 10, 0.5), (near_equal, 1.0, 50, 0.8), (peaked, 0.7, 50, 0.8),
            (flat, 1.3, 50, 0.8), (flat, 1.0, 200, 0.3), (peaked, 1.0, None, 0.9), (flat, 1.0, 20, 1.0)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", range(len(_logit_cases())))
def test_top_k_then_top_p_keeps_exactly_transformers_eligible_set(case):
    """top-p runs on the distribution renormalised after top-k: with 100 near-equal tokens, k 10 and
    p 0.5, 5 tokens stay (the old code cut top-p on the un-renormalised mass and kept all 10)."""
    from dist_llama.model.generation import filter_logits

    logits, temperature, top_k, top_p = _logit_cases()[case]
    ours = torch.isfinite(filter_logits(logits, temperature, top_k, top_p))
    theirs = torch.isfinite(_transformers_scores(logits, temperature, top_k, top_p))
    assert torch.equal(ours, theirs), (int(ours.sum()), int(theirs.sum()))
    if case == 0:
        assert int(theirs.sum()) == 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [1, 3])
def test_top_k_top_p_draws_follow_transformers_distribution(case):
    """Chi-square of 20,000 draws of `sample` against the probabilities transformers' warpers leave
    (fixed seed); no draw outside their eligible set."""
    logits, temperature, top_k, top_p = _logit_cases()[case]
    probs = torch.softmax(_transformers_scores(logits, temperature, top_k, top_p), dim=-1).double()
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample(logits, temperature, top_k, top_p, generator=g) for _ in range(n)]),
                            minlength=len(logits)).double()
    assert counts[probs == 0].sum() == 0, "drew a token outside transformers' eligible set"
    kept = probs > 0
    expected = n * probs[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # the 99.9% quantile of chi-square(dof), Wilson-Hilferty's approximation
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < bound, (chi2, bound, dof)


@pytest.mark.timeout(60)
def test_stops_at_a_stop_token(ours):
    free = generate(ours, [PROMPT], NEW)[0]
    stop = free[5]
    first = free.index(stop)
    assert generate(ours, [PROMPT], NEW, stop_ids=[stop])[0] == free[: first + 1]


# ---------------------------------------------------------------- the command line


@pytest.mark.timeout(120)
def test_cli_prints_a_continuation(hf_dir, ours, capsys, tmp_path):
    path = str(hf_dir[0])
    assert main(["--checkpoint", path, "--tokenizer", "byte", "--prompt", "In the beginning",
                 "--max-new-tokens", "12"]) == 0
    expected = generate(ours, [PROMPT], 12, stop_ids=[257])[0]
    text = bytes(i for i in expected if i < 256).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == "In the beginning" + text + "\n"  # the prompt, then its continuation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\n\nAnd God said\n")
    assert main(["--checkpoint", path, "--tokenizer", "byte", "--prompt-file", str(prompts),
                 "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 2 and all(set(o) == {"prompt_ids", "ids", "text"} for o in objects)
    assert objects[0]["prompt_ids"] == PROMPT
    assert objects[1]["prompt_ids"] == [256] + list(b"And God said")
    assert objects[0]["ids"] == generate(ours, [PROMPT, objects[1]["prompt_ids"]], 12, 0.8, top_p=0.9, seed=1,
                                         stop_ids=[257])[0]


@pytest.mark.timeout(120)
def test_cli_subprocess_json(hf_dir, ours):
    cmd = [sys.executable, "-m", "dist_llama.generate", "--checkpoint", str(hf_dir[0]), "--tokenizer", "byte",
           "--prompt", "In the beginning", "--max-new-tokens", "8", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (obj,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert obj["prompt_ids"] == PROMPT and obj["ids"] == generate(ours, [PROMPT], 8, stop_ids=[257])[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv,flag", [
    (["--checkpoint", "{missing}", "--prompt", "x"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--tokenizer", "byte", "--prompt", "x", "--prompt-file", "{prompts}"],
     "--prompt/--prompt-file"),
    (["--checkpoint", "{ckpt}", "--tokenizer", "byte"], "--prompt/--prompt-file"),
    (["--checkpoint", "{ckpt}", "--prompt-file", "{missing}"], "--prompt-file"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--checkpoint", "{ckpt}", "--tokenizer", "byte", "--prompt", "x", "--max-new-tokens", "1000"],
     "--max-new-tokens"),  # beyond max_seq_len
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--top-k", "0"], "--top-k"),
    (["--checkpoint", "{ckpt}", "--prompt", "x"], "--tokenizer"),  # the HF directory has no tokenizer.json
    (["--checkpoint", "{prompts}", "--tokenizer", "byte", "--prompt", "x"], "--checkpoint"),  # not weights
    (["--prompt", "x"], "--checkpoint"),
])
def test_cli_bad_input_exits_2_naming_the_flag(argv, flag, hf_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    names = dict(missing=str(tmp_path / "missing"), ckpt=str(hf_dir[0]), prompts=str(prompts))
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and flag in err, err


@pytest.mark.timeout(60)
def test_cli_uses_the_checkpoints_tokenizer_and_stops_at_eot(hf_dir, tmp_path, capsys):
    """A tokenizer.json beside the weights is used without --tokenizer; its EOS and <|eot_id|> stop."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from dist_llama.data import build_tokenizer
    from dist_llama.generate import _stop_ids

    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_dir[0], ckpt)
    words = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<unk>", "in", "the", "beginning"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    assert open_weights(ckpt).tokenizer == str(ckpt / "tokenizer.json")
    assert _stop_ids(build_tokenizer(str(ckpt / "tokenizer.json"))) == [1, 2]
    assert _stop_ids(build_tokenizer("byte")) == [257]

    assert main(["--checkpoint", str(ckpt), "--prompt", "in the beginning", "--max-new-tokens", "5", "--json"]) == 0
    (obj,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert obj["prompt_ids"] == [0, 4, 5, 6]
    assert len(obj["ids"]) <= 5 and all(i not in (1, 2) for i in obj["ids"][:-1])
