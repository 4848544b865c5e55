"""dist-llama-prepare at scale: the same bytes from any number of worker processes, Parquet input,
and errors that name the file (and line or row) whichever process finds them."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa  # a dependency: missing is a setup failure, not a skip
import pyarrow.parquet as pq
import pytest

from dist_llama.data import ByteTokenizer, InputError, TokenDataset, prepare
from dist_llama.data.prepare import main


def docs_for(name, n):
    # varied lengths and some non-ASCII, so batches and shards cut documents at many places
    return [f"{name} doc {i} " + "é🦙 word " * (i % 13) for i in range(n)]


def write_inputs(d: Path) -> tuple[list[str], list[str]]:
    """Two files of every input type, in an order that mixes them; returns (paths, documents)."""
    paths, docs = [], []
    for k in range(2):
        txt = d / f"t{k}.txt"
        txt.write_text(f"text file {k}\nsecond line\n", encoding="utf-8")
        paths.append(str(txt)), docs.append(txt.read_text(encoding="utf-8"))

        js = docs_for(f"jsonl{k}", 700)  # several batches of 256 in one file
        path = d / f"j{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in js) + "\n\n", encoding="utf-8")
        paths.append(str(path)), docs.extend(js)

        gz = docs_for(f"gz{k}", 300)
        path = d / f"g{k}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(gz))
        paths.append(str(path)), docs.extend(gz)

        pqd = docs_for(f"parquet{k}", 600)
        path = d / f"p{k}.parquet"
        table = pa.table({"id": list(range(len(pqd))), "text": pqd})
        pq.write_table(table, path, row_group_size=250)  # three row groups
        paths.append(str(path)), docs.extend(pqd)
    return paths, docs


def dir_bytes(d) -> dict[str, bytes]:
    return {name: (Path(d) / name).read_bytes() for name in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs_for("train", 200), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("spec", ["byte", "hf"])
def test_prepare_output_identical_for_1_and_2_workers(tmp_path, spec, hf_tokenizer):
    spec = hf_tokenizer if spec == "hf" else spec
    paths, docs = write_inputs(tmp_path)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare(paths, spec, str(out), shard_tokens=20_000, progress=False, workers=workers)
        outs[workers] = dir_bytes(out)
    assert len([n for n in outs[1] if n.startswith("tokens-")]) > 2
    assert outs[1] == outs[2]  # every file, meta.json included
    ds = TokenDataset.open(tmp_path / "out2")
    assert ds.n_docs == len(docs)
    if spec == "byte":
        stream = np.concatenate(ByteTokenizer().encode_arrays(docs, bos=True, eos=True))
        assert ds.tokens(0, len(ds)).tolist() == stream.tolist()


def test_cli_workers(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path)
    assert main(["--tokenizer", "byte", "--out", str(tmp_path / "a"), "--workers", "2", *paths]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote") and len(captured.out.splitlines()) == 1
    assert captured.err == ""  # the progress bar only on a terminal
    assert main(["--tokenizer", "byte", "--out", str(tmp_path / "b"), "--workers", "1", "--quiet", *paths]) == 0
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main(["--tokenizer", "byte", "--out", str(tmp_path / "c"), "--workers", "0", *paths])
    assert e.value.code == 2 and "--workers must be >= 1" in capsys.readouterr().err


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return e.value.code, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_parquet(tmp_path, capsys, workers):
    out = str(tmp_path / "out")
    cases = [
        (pa.table({"body": ["a", "b"]}), "no.parquet: no column 'text' (columns: body)"),
        (pa.table({"text": [1, 2]}), "int.parquet: column 'text' is int64, expected strings"),
        (pa.table({"text": ["a", "b", None, "d"]}), "null.parquet: row 2: 'text' is null"),
    ]
    for (table, needle), name in zip(cases, ["no", "int", "null"]):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, "--workers", workers,
                            str(tmp_path / f"{name}.parquet"))
        assert code == 2 and needle in err, err
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, str(tmp_path / "junk.parquet"))
    assert code == 2 and "junk.parquet: cannot read as Parquet" in err
    assert not (tmp_path / "out").exists()
    # a dictionary-encoded string column is text too, and the column comes from --text-key
    pq.write_table(pa.table({"body": pa.array(["x", "y", "x"]).dictionary_encode()}), tmp_path / "dict.parquet")
    assert main(["--tokenizer", "byte", "--out", out, "--text-key", "body", "--quiet", "--workers", workers,
                 str(tmp_path / "dict.parquet")]) == 0
    assert TokenDataset.open(out).tokens(0, 3).tolist() == [256, ord("x"), 257]


def test_errors_come_in_input_order_with_workers(tmp_path, capsys):
    """A bad line found by a worker comes before a reading error in a later file, as with one worker."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_for("g", 1000)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "later.jsonl.gz").write_bytes(b"not gzip")
    for workers in ("1", "2"):
        code, err = run_cli(capsys, "--tokenizer", "byte", "--out", str(tmp_path / "out"), "--quiet",
                            "--workers", workers, str(good), str(bad), str(tmp_path / "later.jsonl.gz"))
        assert code == 2 and "bad.jsonl:2: bad JSON" in err, err
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_workers_need_a_spec(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello")
    with pytest.raises(ValueError, match="spec"):
        prepare([str(src)], ByteTokenizer(), str(tmp_path / "out"), progress=False, workers=2)
    with pytest.raises(InputError, match="workers must be >= 1"):
        prepare([str(src)], "byte", str(tmp_path / "out"), progress=False, workers=0)
