"""Sampling at scale and rejection sampling (dist-llama-sample, dist-llama-rejection-sample).

- Batched greedy generation of prompts of different lengths equals transformers' generate, prompt by
  prompt, on the same (saved and reloaded) weights.
- Sampled first tokens follow softmax(logits / T) (chi-square at fixed seeds); with top-k and top-p
  every draw is in transformers' eligible set.
- The output file is the same for 1 and 2 ranks, and a job killed halfway and restarted writes a
  byte-identical file.
- Rejection sampling keeps, for every prompt, the sample that transformers' sequence classifier
  (the reward model saved with save_pretrained) scores highest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from chatdata import SPECIALS, llama3_tokenizer, word_tokenizer
from conftest import ROOT
from sharp import randomize_
from test_generate import hf_config
from dist_llama.generate import load_model
from dist_llama.model.batch_generation import generate_batch
from dist_llama.model.generation import filter_logits, generate
from dist_llama.weights import open_weights

PROMPTS = [[256, *b"In the beginning"], [256, *b"Hi"], [256, *b"God said, let there be"], [256, 72]]


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    hf = randomize_(transformers.LlamaForCausalLM(hf_config()).float().eval(), seed=1)
    path = tmp_path_factory.mktemp("lm")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf, load_model(open_weights(path), torch.device("cpu"), torch.float32)


@pytest.mark.timeout(120)
def test_batched_greedy_equals_transformers_generate_per_prompt(hf_lm):
    _, hf, ours = hf_lm
    new = 24
    got = generate_batch(ours, PROMPTS, new, samples=2)  # two identical greedy samples per prompt
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new)
        ref = ref[0, len(prompt):].tolist()
        assert got[2 * i].ids == ref and got[2 * i + 1].ids == ref, i
        assert got[2 * i].finish == "length"
    assert generate(ours, PROMPTS, new) == [got[2 * i].ids for i in range(len(PROMPTS))]


@pytest.mark.timeout(120)
def test_stops_at_a_stop_id_per_row(hf_lm):
    _, _, ours = hf_lm
    free = generate_batch(ours, PROMPTS, 12)
    stop = free[0].ids[3]  # row 0 stops at its 4th token; the others at that id if they meet it
    got = generate_batch(ours, PROMPTS, 12, stop_ids=[stop])
    for f, g in zip(free, got):
        cut = f.ids.index(stop) + 1 if stop in f.ids else len(f.ids)
        assert g.ids == f.ids[:cut]
        assert g.finish == ("end_of_turn" if stop in f.ids else "length")


@pytest.mark.timeout(120)
def test_first_token_follows_softmax_and_truncation_is_exact(hf_lm):
    from scipy.stats import chisquare
    import transformers

    _, _, ours = hf_lm
    prompt, T, n = PROMPTS[1], 0.7, 3000
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]))[0, -1]
    got = generate_batch(ours, [prompt], 1, samples=n, temperature=T, seeds=range(100, 100 + n))
    first = np.array([c.ids[0] for c in got])
    probs = torch.softmax(logits.double() / T, -1).numpy()
    common = probs * n >= 5  # chi-square over the tokens expected at least 5 times, the rest pooled
    observed = np.append(np.bincount(first, minlength=len(probs))[common], (~common[first]).sum())
    expected = np.append(probs[common] * n, probs[~common].sum() * n)
    assert common.sum() >= 5
    assert chisquare(observed, expected).pvalue > 1e-3

    for top_k, top_p in ((5, 1.0), (None, 0.6), (20, 0.8)):
        scores = logits[None].float() / T
        if top_k:
            scores = transformers.TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = transformers.TopPLogitsWarper(top_p)(None, scores)
        eligible = set(torch.isfinite(scores[0]).nonzero()[:, 0].tolist())
        draws = generate_batch(ours, [prompt], 1, samples=400, temperature=T, top_k=top_k, top_p=top_p)
        seen = {c.ids[0] for c in draws}
        assert seen <= eligible and len(seen) > 1, (top_k, top_p, seen, eligible)
        assert torch.equal(torch.isfinite(filter_logits(logits, T, top_k, top_p)).nonzero()[:, 0],
                           torch.tensor(sorted(eligible)))


# --- the commands ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A random policy (LlamaForCausalLM) and reward model (LlamaForSequenceClassification) over the word
    tokenizer, saved with save_pretrained; chat prompts."""
    import shutil

    import transformers

    d = tmp_path_factory.mktemp("chat")
    tok = word_tokenizer(d / "tokenizer.json")
    vocab = 25 + len(SPECIALS)
    config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=vocab - 5,
                  eos_token_id=vocab - 4, pad_token_id=vocab - 5)
    torch.manual_seed(0)
    policy = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval(), seed=2)
    reward = randomize_(transformers.LlamaForSequenceClassification(transformers.LlamaConfig(num_labels=1, **config)).eval(),
                        seed=3)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(d / name, safe_serialization=True)
        shutil.copy(tok, d / name / "tokenizer.json")
    words = ["red", "blue", "green", "gold", "pink", "gray", "teal", "jade"]
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(24):
            messages = [{"role": "user", "content": f"say {words[i % 8]}" + " now" * (i % 3)}]
            f.write(json.dumps({"messages": messages, "unsafe": i % 5 == 0}) + "\n")
    return d, reward


def _cmd(module: str, *args: str, nproc: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    return [*launcher, module, *args]


def _run(cmd, expect: int = 0):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


SAMPLE = ["--samples", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "6", "--batch-prompts", "4",
          "--seed", "7"]


@pytest.mark.timeout(300)
def test_same_file_for_1_and_2_ranks_and_after_a_kill(chat_models, tmp_path):
    d, _ = chat_models
    base = ["--checkpoint", str(d / "policy"), "--prompts", str(d / "prompts.jsonl"), *SAMPLE]
    one = tmp_path / "one.jsonl"
    proc = _run(_cmd("dist_llama.sample", *base, "--out", str(one)))
    assert "dist-llama-sample: rank 0: 24 prompts, 72 samples" in proc.stderr
    lines = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(24))
    assert all(len(r["samples"]) == 3 and all(s["finish"] in ("end_of_turn", "length") for s in r["samples"])
               for r in lines)
    assert lines[0]["prompt"] == [{"role": "user", "content": "say red"}]
    assert len({tuple(s["ids"]) for r in lines for s in r["samples"]}) > 20  # sampled, not one answer

    two = tmp_path / "two.jsonl"
    _run(_cmd("dist_llama.sample", *base, "--out", str(two), nproc=2))
    assert two.read_bytes() == one.read_bytes()

    killed = tmp_path / "killed.jsonl"
    slow = [*base, "--batch-prompts", "1", "--out", str(killed)]
    proc = subprocess.Popen(_cmd("dist_llama.sample", *slow), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp_path / "killed.jsonl.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("block-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("block-*.jsonl")))
    assert 0 < done < 24 and not killed.exists(), done
    _run(_cmd("dist_llama.sample", *slow))
    assert not parts.exists()
    # another block size draws the same samples: each depends on (seed, prompt, sample) only
    assert [r["samples"] for r in map(json.loads, killed.read_text().splitlines())] == [r["samples"] for r in lines]


@pytest.mark.timeout(300)
def test_rejection_sampling_keeps_what_transformers_scores_highest(chat_models, tmp_path):
    from dist_llama.data import build_tokenizer
    from dist_llama.data.chat import template_for

    d, reward = chat_models
    out, best = tmp_path / "samples.jsonl", tmp_path / "best.jsonl"
    _run(_cmd("dist_llama.rejection", "--policy", str(d / "policy"), "--reward", str(d / "reward"),
              "--prompts", str(d / "prompts.jsonl"), *SAMPLE, "--out", str(out), "--sft-out", str(best), nproc=2))
    template = template_for(build_tokenizer(str(d / "policy" / "tokenizer.json")))
    chosen = [json.loads(line) for line in best.read_text().splitlines()]
    all_scores, kept = [], []
    for record, pick in zip(map(json.loads, out.read_text().splitlines()), chosen):
        theirs = []
        for s in record["samples"]:
            ids, _ = template.render(record["prompt"] + [{"role": "assistant", "content": s["text"]}])
            with torch.no_grad():
                theirs.append(reward(torch.tensor([ids])).logits[0, 0].item())
            assert s["score"] == pytest.approx(theirs[-1], abs=1e-5)
        top = record["samples"][int(np.argmax(theirs))]["text"]
        assert pick["messages"] == record["prompt"] + [{"role": "assistant", "content": top}]
        all_scores += theirs
        kept.append(max(theirs))
    assert np.mean(kept) > np.mean(all_scores)
    prep = _run([sys.executable, "-m", "dist_llama.data.prepare", "--tokenizer", str(d / "policy" / "tokenizer.json"),
                 "--format", "chat", "--out", str(tmp_path / "sft"), "--quiet", str(best)])
    assert (tmp_path / "sft" / "meta.json").is_file(), prep.stderr


@pytest.mark.timeout(120)
def test_bad_inputs_exit_2_and_write_nothing(chat_models, tmp_path):
    from dist_llama.rejection import main as rejection
    from dist_llama.sample import main as sample

    d, _ = chat_models
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "say red"}]}\n{oops\n')
    other = tmp_path / "other"  # a reward model over another tokenizer (the byte one)
    _save_byte_reward(other)
    out = tmp_path / "out.jsonl"
    base = ["--checkpoint", str(d / "policy"), "--out", str(out)]
    cases = [(sample, [*base, "--prompts", str(tmp_path / "empty.jsonl")], "holds no prompt"),
             (sample, [*base, "--prompts", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: bad JSON"),
             (sample, [*base, "--prompts", str(d / "prompts.jsonl"), "--samples", "0"], "--samples: must be >= 1"),
             (rejection, ["--policy", str(d / "policy"), "--reward", str(other), "--prompts", str(d / "prompts.jsonl"),
                          "--out", str(out), "--sft-out", str(tmp_path / "best.jsonl")], "another tokenizer")]
    for main, argv, message in cases:
        proc = subprocess.run([sys.executable, "-c", f"import sys; from {main.__module__} import main; "
                               f"sys.exit(main({argv!r}))"], cwd=ROOT, capture_output=True, text=True, timeout=100)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
                 and "return func" not in line]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not list(tmp_path.glob("out.jsonl*")) and not (tmp_path / "best.jsonl").exists()


def _save_byte_reward(path):
    """A reward model over the byte-level Llama 3-style tokenizer (another vocabulary than the word one)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256 + len(SPECIALS), hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_hidden_layers=1, num_labels=1, pad_token_id=256,
                                      tie_word_embeddings=False)
    transformers.LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    llama3_tokenizer(path / "tokenizer.json")


@pytest.mark.timeout(300)
def test_tensor_parallel_sampling(chat_models, tmp_path):
    """--tp 2: each pair of ranks holds one sharded copy. Greedy answers equal one process's; sampled
    files are the same for one tensor-parallel group (2 ranks) and two (4 ranks)."""
    d, _ = chat_models
    base = ["--checkpoint", str(d / "policy"), "--prompts", str(d / "prompts.jsonl"), "--max-new-tokens", "6",
            "--batch-prompts", "4"]
    greedy = [*base, "--temperature", "0"]
    _run(_cmd("dist_llama.sample", *greedy, "--out", str(tmp_path / "plain.jsonl")))
    _run(_cmd("dist_llama.sample", *greedy, "--tp", "2", "--out", str(tmp_path / "tp.jsonl"), nproc=2))
    ids = [[s["ids"] for s in json.loads(line)["samples"]] for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert ids == [[s["ids"] for s in json.loads(line)["samples"]]
                   for line in (tmp_path / "tp.jsonl").read_text().splitlines()]
    sampled = [*base, *SAMPLE[:6], "--tp", "2"]
    _run(_cmd("dist_llama.sample", *sampled, "--out", str(tmp_path / "one_group.jsonl"), nproc=2))
    _run(_cmd("dist_llama.sample", *sampled, "--out", str(tmp_path / "two_groups.jsonl"), nproc=4))
    assert (tmp_path / "one_group.jsonl").read_bytes() == (tmp_path / "two_groups.jsonl").read_bytes()
