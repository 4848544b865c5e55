"""Tokenizers: byte, tiktoken (Llama 3 format), SentencePiece (Llama 2 format) and Hugging Face,
built from the KJV at test time; files are recognised by content, not by name."""

import base64
import gzip
import io
import json
import math
import shutil

import numpy as np
import pytest

from dist_llama.data import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenDataset,
    build_tokenizer,
)
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


def train_sentencepiece(kjv_texts, vocab_size=500, **overrides):
    """A SentencePiece BPE model trained like Llama 2's tokenizer.model (identity normalization,
    whitespace kept, digits split, byte fallback; unk 0, BOS 1, EOS 2, no pad): serialized bytes."""
    import sentencepiece

    lines = [line for t in kjv_texts[:3] for line in t.splitlines() if line.strip()]
    options = dict(model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                   byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                             **(options | overrides))
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory, kjv_texts):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(train_sentencepiece(kjv_texts))
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


# --- SentencePiece ---------------------------------------------------------------------------
EDGE_TEXTS = ["", " ", "  leading and trailing  ", "a  b\t\tc", "\n\n\t\r\n", "x\x00y", "12345 678",
              "<s> and </s> are text", UNICODE, "🦙" * 5]


@pytest.mark.timeout(60)
def test_sentencepiece_ids_are_the_library_encode_with_llama2_framing(sp_file, kjv_texts):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    tok = SentencePieceTokenizer(sp_file)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (500, 1, 2)
    assert ref.id_to_piece([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.name.startswith("sentencepiece:")
    texts = kjv_texts[3:6] + EDGE_TEXTS
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.encode(text, bos=True) == [1] + ref.encode(text)
        assert tok.encode(text, eos=True) == ref.encode(text) + [2]
        assert tok.encode(text, bos=True, eos=True) == ref.encode(text, add_bos=True, add_eos=True)
        assert all(0 <= i < 500 for i in ids) and 1 not in ids and 2 not in ids
    text = kjv_texts[4]
    assert len(tok.encode(text)) < 0.8 * len(text.encode())  # merges learned from the KJV are used
    assert [a.tolist() for a in tok.encode_arrays(texts, bos=True, eos=True)] == [
        tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.encode_arrays([]) == []


@pytest.mark.timeout(60)
def test_sentencepiece_round_trips_exactly(sp_file, kjv_texts):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    tok = SentencePieceTokenizer(sp_file)
    for text in kjv_texts[3:6] + EDGE_TEXTS:
        assert tok.decode(tok.encode(text)) == text
        # BOS / EOS show as their pieces, like the other tokenizers' special tokens
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == "<s>" + text + "</s>"
    two_docs = tok.encode(" one", eos=True) + tok.encode(" two", bos=True)
    assert tok.decode(np.asarray(two_docs)) == " one</s><s> two"
    # The one exception, SentencePiece's own (and Llama 2's): its whitespace marker U+2581 in the
    # text comes back as a space.
    marker = "a ▁ b"
    assert tok.encode(marker) == ref.encode(marker)
    assert tok.decode(tok.encode(marker)) == ref.decode(ref.encode(marker)) == "a   b"


@pytest.mark.timeout(60)
def test_sentencepiece_name_bos_and_eos_come_from_the_model(sp_file, kjv_texts, tmp_path):
    assert SentencePieceTokenizer(sp_file).name == SentencePieceTokenizer(sp_file).name
    other = tmp_path / "other.model"
    other.write_bytes(train_sentencepiece(kjv_texts, vocab_size=400))
    b = SentencePieceTokenizer(other)
    assert b.vocab_size == 400 and b.name != SentencePieceTokenizer(sp_file).name
    no_bos = tmp_path / "no_bos.model"
    no_bos.write_bytes(train_sentencepiece(kjv_texts, bos_id=-1, eos_id=1))
    tok = SentencePieceTokenizer(no_bos)
    assert tok.bos_id is None and tok.eos_id == 1
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", bos=True)
    no_eos = tmp_path / "no_eos.model"
    no_eos.write_bytes(train_sentencepiece(kjv_texts, eos_id=-1))
    with pytest.raises(ValueError, match=r"no_eos\.model.*EOS"):
        build_tokenizer(str(no_eos))


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


@pytest.mark.timeout(60)
def test_build_tokenizer_recognises_the_format_by_content(sp_file, tiktoken_file, hf_file, tmp_path):
    def renamed(src, name):
        dst = tmp_path / name
        shutil.copyfile(src, dst)
        return str(dst)

    sp_name = SentencePieceTokenizer(sp_file).name
    for name in ["tokenizer.model", "tokenizer.json.bak", "foo.bin", "tokenizer.json"]:
        tok = build_tokenizer(renamed(sp_file, name))
        assert isinstance(tok, SentencePieceTokenizer) and tok.name == sp_name
    tik = build_tokenizer(renamed(tiktoken_file[0], "vocab.json"))
    assert isinstance(tik, TiktokenTokenizer) and tik.name == TiktokenTokenizer(tiktoken_file[0]).name
    hf = build_tokenizer(renamed(hf_file, "tokenizer.model"))
    assert isinstance(hf, HFTokenizer) and hf.name == HFTokenizer(hf_file).name
    with open(tiktoken_file[0]) as f:  # tiktoken skips blank lines, and so does the recognition
        (tmp_path / "blank_first.model").write_text("\n\n" + f.read())
    assert isinstance(build_tokenizer(str(tmp_path / "blank_first.model")), TiktokenTokenizer)

    garbage = {"text.model": b"this is not a tokenizer at all\n", "empty.model": b"",
               "binary.bin": bytes([0x0A, 0x05]) + bytes(range(256)) * 4}
    for name, content in garbage.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as e:
            build_tokenizer(str(tmp_path / name))
        msg = str(e.value)
        assert name in msg and "tokenizer.json" in msg and "tiktoken" in msg and "SentencePiece" in msg, msg


@pytest.mark.timeout(60)
def test_training_rejects_a_file_that_is_no_tokenizer(tmp_path, capsys):
    from trainrun import DEBUG

    from dist_llama.train.cli import EXIT_CONFIG, main

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 not a model")
    code = main(["--config", DEBUG, f"train.run_dir={tmp_path}/run", f"data.tokenizer={bad}"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CONFIG and len(err.splitlines()) == 1 and "data.tokenizer" in err and str(bad) in err, err


# --- SentencePiece end to end ----------------------------------------------------------------
@pytest.mark.timeout(240)
def test_sentencepiece_prepare_then_train(sp_file, kjv_texts, tmp_path):
    """dist-llama-prepare with Llama 2's tokenizer format (under a name that says nothing), then a
    short training run whose model takes its vocabulary from it."""
    import sentencepiece
    from trainrun import train

    from dist_llama.data.prepare import main as prepare_main

    spec = tmp_path / "foo.bin"
    shutil.copyfile(sp_file, spec)
    docs = kjv_texts[:6]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "shards"
    assert prepare_main(["--tokenizer", str(spec), "--out", str(out), "--quiet", str(src)]) == 0

    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == SentencePieceTokenizer(sp_file).name
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["dtype"]) == (500, 1, 2, "uint16")
    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    expected = [i for d in docs for i in ref.encode(d, add_bos=True, add_eos=True)]
    ds = TokenDataset.open(out)
    assert ds.n_docs == len(docs) and ds.tokens(0, len(ds)).tolist() == expected

    losses, params = train(1, f"data.path={out}", f"data.tokenizer={spec}", "train.steps=2",
                           f"train.run_dir={tmp_path / 'run'}", "checkpoint.enabled=false")
    assert params["tok_embeddings.weight"].shape[0] == 500  # model.vocab_size=-1: from the tokenizer
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(500)) < 1.0, losses  # a fresh model is near-uniform over 500 ids


# --- carried into an exported Hugging Face directory ----------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece", "hf"])
def test_exported_tokenizer_loads_in_transformers_with_the_same_ids(kind, tiktoken_file, sp_file, hf_file, kjv_texts,
                                                                     tmp_path):
    """dist-llama-export's tokenizer files: AutoTokenizer gives our ids (tiktoken through a converted
    tokenizer.json, SentencePiece through LlamaTokenizer with Llama 2's BOS, a tokenizer.json as is)."""
    import transformers

    from dist_llama.weights.export import copy_tokenizer

    spec = str({"tiktoken": tiktoken_file[0], "sentencepiece": sp_file, "hf": hf_file}[kind])
    ours = build_tokenizer(spec)
    copy_tokenizer(spec, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    bos = kind == "sentencepiece"  # Llama 2 prepends BOS to every text
    texts = [kjv_texts[1][:3000], "digits 12345 and ünïcödé ✓"]
    if kind != "sentencepiece":  # transformers' SentencePiece conversion splits runs of spaces its own way
        texts.append("  two  spaces, tabs\tand\r\nnewlines")
    for text in texts:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=bos), text[:50]
        assert theirs.decode(ours.encode(text), skip_special_tokens=True) == text
