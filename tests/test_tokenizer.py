"""Tokenizers: byte, tiktoken (Llama 3 format) and Hugging Face, built from the KJV at test time."""

import base64
import gzip
import json

import pytest

from dist_llama.data import ByteTokenizer, HFTokenizer, TiktokenTokenizer, build_tokenizer
from dist_llama.data.sources import KJV_PATH
from dist_llama.data.tokenizer import LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS

UNICODE = "Grüße, naïve café — 日本語 ✓ 🦙🔥 and a combining é\n\ttabs  "


@pytest.fixture(scope="module")
def kjv_texts():
    with gzip.open(KJV_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(6)]


def write_tiktoken_file(path, ranks):
    with open(path, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory, kjv_texts):
    from tiktoken._educational import bpe_train

    ranks = bpe_train(kjv_texts[0][:8000], 320, LLAMA3_PAT_STR, visualise=None)
    path = tmp_path_factory.mktemp("tik") / "tokenizer.model"
    write_tiktoken_file(path, ranks)
    return path, len(ranks)


def train_hf(kjv_texts, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for t in kjv_texts[:3] for line in t.splitlines()]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory, kjv_texts):
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    train_hf(kjv_texts, ["<s>", "</s>"]).save(str(path))
    return path


# --- byte ------------------------------------------------------------------------------------
def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.name) == (258, 256, 257, "byte")
    for text in ["", "hello", UNICODE, "🦙" * 5]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    ids = tok.encode("hé", bos=True, eos=True)
    assert ids == [256, 104, 0xC3, 0xA9, 257]
    assert tok.decode(ids) == "hé"
    arrs = tok.encode_arrays(["ab", "", UNICODE], bos=True, eos=True)
    assert [a.tolist() for a in arrs] == [tok.encode(t, bos=True, eos=True) for t in ["ab", "", UNICODE]]
    assert [a.tolist() for a in tok.encode_arrays(["ab"], bos=False, eos=True)] == [[97, 98, 257]]


# --- tiktoken --------------------------------------------------------------------------------
def test_tiktoken_round_trip_and_special_ids(tiktoken_file, kjv_texts):
    path, n_base = tiktoken_file
    tok = TiktokenTokenizer(path)
    assert n_base == 320
    assert tok.vocab_size == n_base + 256
    assert tok.bos_id == n_base + 0
    assert tok.eos_id == n_base + 1
    st = tok.special_tokens
    assert st["<|begin_of_text|>"] == n_base
    assert st["<|end_of_text|>"] == n_base + 1
    assert st["<|finetune_right_pad_id|>"] == n_base + 4
    assert st["<|start_header_id|>"] == n_base + 6
    assert st["<|eom_id|>"] == n_base + 8
    assert st["<|eot_id|>"] == n_base + 9
    assert st["<|python_tag|>"] == n_base + 10
    assert st["<|reserved_special_token_2|>"] == n_base + 11  # Llama 3.1 order
    assert st["<|reserved_special_token_246|>"] == n_base + 255
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 and len(set(LLAMA3_SPECIAL_TOKENS)) == 256

    for text in kjv_texts[1:4] + [UNICODE, ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < n_base for i in ids)
    text = kjv_texts[2]
    assert len(tok.encode(text)) < 0.8 * len(text.encode())  # merges learned from the KJV are used
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    # bulk path == single path
    assert [a.tolist() for a in tok.encode_arrays(kjv_texts[:3], bos=True, eos=True)] == [
        tok.encode(t, bos=True, eos=True) for t in kjv_texts[:3]]


def test_tiktoken_special_strings_are_plain_text(tiktoken_file):
    tok = TiktokenTokenizer(tiktoken_file[0])
    text = "a <|end_of_text|> b <|eot_id|>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.special_tokens["<|eot_id|>"] not in ids
    assert tok.decode(ids) == text


def test_tiktoken_long_runs(tiktoken_file):
    tok = TiktokenTokenizer(tiktoken_file[0])
    text = "x" * 30_000 + " " * 60_000 + "end"
    assert tok.decode(tok.encode(text)) == text


def test_tiktoken_name_tracks_file(tiktoken_file, tmp_path):
    path, _ = tiktoken_file
    a = TiktokenTokenizer(path)
    assert a.name.startswith("tiktoken:") and a.name == TiktokenTokenizer(path).name
    other = tmp_path / "tokenizer.model"
    write_tiktoken_file(other, {bytes([i]): i for i in range(256)})
    b = TiktokenTokenizer(other)
    assert b.name != a.name and b.vocab_size == 512
    # rewriting the same path is picked up (no stale cache)
    write_tiktoken_file(other, {bytes([i]): i for i in range(256)} | {b"ab": 256})
    c = TiktokenTokenizer(other)
    assert c.vocab_size == 513 and c.name != b.name and c.encode("ab") == [256]


def test_tiktoken_bad_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("this is not a bpe file at all\n")
    with pytest.raises(ValueError, match="bad.model"):
        TiktokenTokenizer(bad)


# --- Hugging Face ----------------------------------------------------------------------------
def test_hf_round_trip(hf_file, kjv_texts):
    tok = HFTokenizer(hf_file)
    assert tok.bos_id == 0 and tok.eos_id == 1  # "<s>", "</s>" come first
    assert tok.vocab_size == 400
    assert tok.name.startswith("hf:")
    for text in kjv_texts[3:5] + [UNICODE]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    text = kjv_texts[0]
    assert len(tok.encode(text)) < 0.8 * len(text.encode())
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1] and 1 not in ids[1:-1]
    assert tok.decode(tok.encode("x </s> y")) == "x </s> y" and 1 not in tok.encode("x </s> y")
    assert [a.tolist() for a in tok.encode_arrays(kjv_texts[:2], bos=True, eos=True)] == [
        tok.encode(t, bos=True, eos=True) for t in kjv_texts[:2]]


def test_hf_bos_eos_detection(tmp_path, kjv_texts):
    p = tmp_path / "gpt2like.json"
    train_hf(kjv_texts, ["<|endoftext|>"]).save(str(p))
    tok = HFTokenizer(p)
    assert tok.eos_id == 0 and tok.bos_id is None
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", bos=True)

    p2 = tmp_path / "nospecial.json"
    train_hf(kjv_texts, []).save(str(p2))
    with pytest.raises(ValueError, match="EOS"):
        HFTokenizer(p2)
    tok2 = HFTokenizer(p2, eos_id=5)
    assert tok2.eos_id == 5 and tok2.name != HFTokenizer(p, eos_id=5).name
    with pytest.raises(ValueError, match="outside"):
        HFTokenizer(p2, eos_id=10_000)


# --- build_tokenizer -------------------------------------------------------------------------
def test_build_tokenizer(tiktoken_file, hf_file, tmp_path):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert isinstance(build_tokenizer(str(hf_file)), HFTokenizer)
    assert isinstance(build_tokenizer(str(tiktoken_file[0])), TiktokenTokenizer)
    for spec in ["bytes", str(tmp_path / "missing.model"), str(tmp_path / "missing.json"), ""]:
        with pytest.raises(ValueError) as e:
            build_tokenizer(spec)
        assert repr(spec) in str(e.value) and "'byte'" in str(e.value)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        build_tokenizer(str(bad_json))
