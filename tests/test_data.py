"""Shard preparation, the token dataset, packing (against brute force) and the stateful sampler."""

import gzip
import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from dist_llama.data import (
    ByteTokenizer,
    DataError,
    InputError,
    PackedLoader,
    TokenDataset,
    open_dataset,
    prepare,
)
from dist_llama.data.prepare import main
from dist_llama.data.tokenizer import Tokenizer

DOCS = ["In the beginning", "", "é🦙 unicode", "x", "And God said, Let there be light: and there was light."]


def write_jsonl(path, docs, key="text", gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


def expected_stream(docs, bos=True):
    tok = ByteTokenizer()
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream += tok.encode(d, bos=bos, eos=True)
    return stream, starts


def make_ds(tmp_path, docs, name="ds", **kw):
    out = tmp_path / name
    prepare([write_jsonl(tmp_path / f"{name}.jsonl", docs)], ByteTokenizer(), str(out), progress=False, **kw)
    return TokenDataset.open(out)


def no_temp_dirs(parent):
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p] == []


# --- prepare ---------------------------------------------------------------------------------
def test_prepare_byte(tmp_path):
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS[:3]), write_jsonl(tmp_path / "b.jsonl.gz", DOCS[3:], gz=True)]
    (tmp_path / "c.txt").write_text("a whole\nfile\n", encoding="utf-8")
    inputs.append(str(tmp_path / "c.txt"))
    docs = DOCS + ["a whole\nfile\n"]
    meta = prepare(inputs, ByteTokenizer(), str(tmp_path / "out"), progress=False)
    stream, starts = expected_stream(docs)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "byte" and meta["vocab_size"] == 258
    assert meta["n_tokens"] == len(stream) and meta["n_docs"] == len(docs) and meta["version"] == 1
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    raw = np.fromfile(tmp_path / "out" / "tokens-00000.bin", dtype="<u2")
    assert raw.tolist() == stream
    assert np.load(tmp_path / "out" / "docs.npy", allow_pickle=False).tolist() == starts
    ds = TokenDataset.open(tmp_path / "out")
    assert len(ds) == len(stream) and ds.n_docs == len(docs)
    assert ds.tokens(0, len(ds)).tolist() == stream
    brute_ids = [i for i, s in enumerate(starts) for _ in range((starts + [len(stream)])[i + 1] - s)]
    assert ds.doc_ids(0, len(ds)).tolist() == brute_ids
    assert ds.fingerprint.startswith("byte|")


def test_prepare_no_bos_and_sharding(tmp_path):
    docs = DOCS * 3
    for bos in (True, False):
        out = tmp_path / f"out{bos}"
        meta = prepare([write_jsonl(tmp_path / "a.jsonl", docs)], ByteTokenizer(), str(out), shard_tokens=7,
                       bos=bos, progress=False)
        stream, starts = expected_stream(docs, bos=bos)
        assert len(meta["shards"]) == -(-len(stream) // 7)
        assert [s["n_tokens"] for s in meta["shards"]][:-1] == [7] * (len(meta["shards"]) - 1)
        assert sorted(os.listdir(out)) == sorted(["meta.json", "docs.npy"] + [s["file"] for s in meta["shards"]])
        ds = TokenDataset.open(out)
        assert ds.tokens(0, len(ds)).tolist() == stream
        rng = np.random.default_rng(0)
        for _ in range(50):
            a, b = sorted(rng.integers(0, len(stream) + 1, 2))
            assert ds.tokens(a, b).tolist() == stream[a:b]
        assert ds.doc_starts.tolist() == starts
        assert (256 in stream) == bos


class BigVocab(Tokenizer):
    """A fake tokenizer with ids above 65535."""

    def encode(self, text, bos=False, eos=False):
        return self._frame([70_000 + ord(c) for c in text], bos, eos)

    def decode(self, ids):
        return "".join(chr(i - 70_000) for i in ids if i >= 70_000)

    vocab_size = property(lambda self: 200_000)
    bos_id = property(lambda self: 66_000)
    eos_id = property(lambda self: 66_001)
    name = property(lambda self: "fake-big")


def test_prepare_uint32(tmp_path):
    tok = BigVocab()
    meta = prepare([write_jsonl(tmp_path / "a.jsonl", ["ab", "c"])], tok, str(tmp_path / "out"),
                   shard_tokens=3, progress=False)
    assert meta["dtype"] == "uint32"
    expected = [66_000, 70_097, 70_098, 66_001, 66_000, 70_099, 66_001]
    raw = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype="<u4") for s in meta["shards"]])
    assert raw.tolist() == expected
    assert TokenDataset.open(tmp_path / "out").tokens(2, 6).tolist() == expected[2:6]


def test_prepare_atomic_on_failure(tmp_path):
    class Failing(ByteTokenizer):
        calls = 0

        def encode_arrays(self, texts, bos=False, eos=False):
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("boom")
            return super().encode_arrays(texts, bos, eos)

    src = write_jsonl(tmp_path / "a.jsonl", ["doc %d" % i for i in range(600)])  # 3 batches of 256
    with pytest.raises(RuntimeError, match="boom"):
        prepare([src], Failing(), str(tmp_path / "out"), shard_tokens=100, progress=False)
    assert not (tmp_path / "out").exists() and no_temp_dirs(tmp_path)
    # bad line in the second file, after the first file was written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        prepare([src, str(bad)], ByteTokenizer(), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and no_temp_dirs(tmp_path)


# --- CLI -------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


def test_cli_ok_and_force(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS, key="body")
    out = str(tmp_path / "out")
    assert main(["--tokenizer", "byte", "--out", out, "--text-key", "body", "--no-bos", "--quiet", src]) == 0
    assert "wrote" in capsys.readouterr().out
    assert TokenDataset.open(out).tokens(0, 3).tolist() == list(b"In ")
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, "--text-key", "body", src)
    assert code == 2 and "not empty" in err and "--force" in err
    assert main(["--tokenizer", "byte", "--out", out, "--text-key", "body", "--force", "--quiet", src]) == 0
    ds = TokenDataset.open(out)
    assert ds.tokens(0, 3).tolist() == [256] + list(b"In") and no_temp_dirs(tmp_path)


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"text": "a"}\n{"text": "b"\n', "in.jsonl:2: bad JSON"),
        ('{"text": "a"}\n\n{"other": "b"}\n', "in.jsonl:3: no key 'text'"),
        ('["a"]\n', "in.jsonl:1: expected a JSON object"),
        ('{"text": 5}\n', "in.jsonl:1: 'text' is int"),
        ("", "no documents"),
    ],
)
def test_cli_bad_jsonl(tmp_path, capsys, content, needle):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", str(tmp_path / "out"), "--quiet", str(src))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and no_temp_dirs(tmp_path)


def test_cli_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: no such file" in err
    (tmp_path / "x.csv").write_text("a,b")
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, str(tmp_path / "x.csv"))
    assert code == 2 and "x.csv: unsupported input type" in err
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, str(tmp_path / "bad.jsonl.gz"))
    assert code == 2 and "bad.jsonl.gz" in err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, str(tmp_path / "latin1.txt"))
    assert code == 2 and "latin1.txt: not valid UTF-8" in err
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    code, err = run_cli(capsys, "--tokenizer", "nope", "--out", out, src)
    assert code == 2 and "'nope'" in err
    code, err = run_cli(capsys, "--tokenizer", "byte", "--out", out, "--shard-tokens", "0", src)
    assert code == 2
    assert not os.path.exists(out) and no_temp_dirs(tmp_path)


# --- TokenDataset errors ---------------------------------------------------------------------
def test_dataset_open_errors(tmp_path):
    with pytest.raises(ValueError, match="meta.json: missing"):
        TokenDataset.open(tmp_path / "nothing")
    make_ds(tmp_path, DOCS, shard_tokens=10)
    d = tmp_path / "ds"
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match="meta.json"):
        TokenDataset.open(d)
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        TokenDataset.open(d)
    (d / "meta.json").write_text(json.dumps(meta))
    with open(d / "tokens-00001.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="tokens-00001.bin"):
        TokenDataset.open(d)


# --- packing against brute force -------------------------------------------------------------
@pytest.fixture(scope="module")
def random_ds(tmp_path_factory):
    rng = np.random.default_rng(1)
    lens = [0, 1, 2, 3, 40, 5, 0, 17, 1, 60, 2, 9, 33, 4, 0, 8, 25, 3] * 3
    docs = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)) for n in lens]
    tmp = tmp_path_factory.mktemp("rand")
    ds = make_ds(tmp, docs, shard_tokens=37)
    stream, starts = expected_stream(docs)
    return ds, stream, starts


def window_order(n_windows, seed, epoch, source=0, stage=0):
    """The loader's order of a source's windows in an epoch: its keyed permutation, which must be one."""
    from dist_llama.data.permutation import KeyedPermutation, mix_key

    order = KeyedPermutation(n_windows, mix_key(seed, source, stage, epoch))(np.arange(n_windows))
    assert sorted(order.tolist()) == list(range(n_windows))
    return order


def brute_window(stream, starts, w, L, reset=True):
    s = w * L
    chunk = stream[s : s + L + 1]
    doc_of = [max(i for i, st in enumerate(starts) if st <= p) for p in range(s, s + L)]
    pos = [p - max(starts[d], s) for p, d in zip(range(s, s + L), doc_of)] if reset else list(range(L))
    return chunk[:-1], chunk[1:], doc_of, pos


@pytest.mark.parametrize("seq_len", [1, 3, 7, 16, 50, 100])
def test_packing_brute_force(random_ds, seq_len):
    ds, stream, starts = random_ds
    n_windows = (len(stream) - 1) // seq_len
    assert PackedLoader.num_windows_for(ds, seq_len) == n_windows
    gbs = min(4, n_windows)
    for reset in (True, False):
        loader = PackedLoader(ds, seq_len, gbs, 0, 1, seed=3, reset_positions=reset)
        perm = window_order(n_windows, seed=3, epoch=0)
        seen_mid, seen_multi = False, False
        for step in range(min(6, n_windows // gbs)):
            b = loader.next_batch()
            for row in range(gbs):
                w = int(perm[step * gbs + row])
                toks, labels, doc_ids, pos = brute_window(stream, starts, w, seq_len, reset)
                assert b["tokens"][row].tolist() == toks
                assert b["labels"][row].tolist() == labels
                assert b["doc_ids"][row].tolist() == [d - doc_ids[0] for d in doc_ids]  # numbered per row
                assert b["positions"][row].tolist() == pos
                seen_mid |= reset and starts[doc_ids[0]] < w * seq_len
                seen_multi |= len(set(doc_ids)) > 1
            for v in b.values():
                assert v.dtype.is_floating_point is False and str(v.dtype) == "torch.int64"
                assert tuple(v.shape) == (gbs, seq_len)
        if seq_len >= 7 and reset:
            assert seen_mid and seen_multi


def test_seq_len_too_long(random_ds):
    ds, stream, _ = random_ds
    gbs = 4
    L = PackedLoader.max_seq_len_for(len(stream), gbs)
    assert PackedLoader.num_windows_for(len(stream), L) >= gbs
    assert PackedLoader.num_windows_for(len(stream), L + 1) < gbs
    PackedLoader(ds, L, gbs, 0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(ds, L + 1, gbs, 0, 1)
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(ds, 4, 6, 0, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedLoader(ds, 4, 4, 2, 2)


# --- sampler ---------------------------------------------------------------------------------
def batches(loader, k):
    return [{n: t.clone() for n, t in loader.next_batch().items()} for _ in range(k)]


def same(a, b):
    return all(x.keys() == y.keys() and all((x[n] == y[n]).all() for n in x) for x, y in zip(a, b)) and len(a) == len(b)


def global_batches(ds, k, dp_size, gbs=4, seq_len=8, seed=0, state=None):
    """k global batches, assembled from dp_size ranks (in rank order)."""
    loaders = [PackedLoader(ds, seq_len, gbs, r, dp_size, seed=seed) for r in range(dp_size)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    per_rank = [batches(ld, k) for ld in loaders]
    import torch

    out = [{n: torch.cat([per_rank[r][i][n] for r in range(dp_size)]) for n in per_rank[0][i]} for i in range(k)]
    return out, loaders[0].state_dict()


def test_sampler_determinism_and_dp_partition(random_ds):
    ds = random_ds[0]
    one, _ = global_batches(ds, 5, 1)
    assert same(one, global_batches(ds, 5, 1)[0])
    assert not same(one, global_batches(ds, 5, 1, seed=1)[0])
    two, _ = global_batches(ds, 5, 2)
    four, _ = global_batches(ds, 5, 4)
    assert same(one, two) and same(one, four)
    r1 = PackedLoader(ds, 8, 4, 1, 2).next_batch()
    assert (r1["tokens"] == one[0]["tokens"][2:4]).all()


@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_exact_resume_and_reshard(random_ds, dp_before, dp_after):
    ds = random_ds[0]
    full, _ = global_batches(ds, 7, 1)
    _, state = global_batches(ds, 3, dp_before)
    assert state["consumed"] == 12 and state["dp_size"] == dp_before
    assert all(isinstance(v, (int, str, dict)) for v in state.values())  # JSON, no arrays
    rest, _ = global_batches(ds, 4, dp_after, state=state)
    assert same(full[3:], rest)


def test_resume_with_other_global_batch(random_ds):
    ds = random_ds[0]
    full, _ = global_batches(ds, 6, 1, gbs=2)  # 12 samples
    _, state = global_batches(ds, 2, 1, gbs=2)  # 4 consumed
    rest, _ = global_batches(ds, 2, 2, gbs=4, state=state)  # the next 8 samples
    import torch

    flat_full = torch.cat([b["tokens"] for b in full])
    flat_rest = torch.cat([b["tokens"] for b in rest])
    assert (flat_full[4:] == flat_rest).all()


def test_state_mismatch(random_ds, tmp_path):
    ds = random_ds[0]
    state = PackedLoader(ds, 8, 4, 0, 1, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"'seq_len'.*8.*16"):
        PackedLoader(ds, 16, 4, 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'seed'.*0.*5"):
        PackedLoader(ds, 8, 4, 0, 1, seed=5).load_state_dict(state)
    other = make_ds(tmp_path, DOCS * 20, name="other")
    with pytest.raises(ValueError, match="'dataset'"):
        PackedLoader(other, 8, 4, 0, 1).load_state_dict(state)


def test_epoch_boundary(tmp_path):
    ds = make_ds(tmp_path, ["abcdefghij", "klmnopqrstuvw"])  # 27 tokens -> 5 windows of seq_len 5
    stream = ds.tokens(0, len(ds)).tolist()
    window = lambda w: stream[5 * w : 5 * w + 5]  # noqa: E731
    order = np.concatenate([window_order(5, seed=7, epoch=e) for e in range(4)])
    loader = PackedLoader(ds, 5, 2, 0, 1, seed=7)
    assert loader.num_windows_for(ds, 5) == 5
    # 20 samples = 4 epochs; steps 3 and 8 straddle epochs 0/1 and 2/3
    got = [row for _ in range(10) for row in loader.next_batch()["tokens"].tolist()]
    assert got == [window(w) for w in order]
    assert loader.epoch == 4 and loader.consumed == 20
    # resuming right before a step that crosses an epoch is exact too
    two_steps = PackedLoader(ds, 5, 2, 0, 1, seed=7)
    two_steps.next_batch(), two_steps.next_batch()
    resumed = PackedLoader(ds, 5, 2, 0, 1, seed=7)
    resumed.load_state_dict(two_steps.state_dict())
    assert resumed.next_batch()["tokens"].tolist() == [window(w) for w in order[4:6]]


def test_commit_race_keeps_existing(tmp_path):
    from dist_llama.data.prepare import commit_dir, make_temp_dir

    target = tmp_path / "t"
    first = make_temp_dir(str(target))
    (tmp_path / first / "x").write_text("first")
    assert commit_dir(first, str(target), replace=False)
    second = make_temp_dir(str(target))
    (tmp_path / second / "x").write_text("second")
    assert not commit_dir(second, str(target), replace=False)
    assert (target / "x").read_text() == "first"
    assert commit_dir(second, str(target), replace=True)
    assert (target / "x").read_text() == "second" and os.listdir(tmp_path) == ["t"]


# --- open_dataset ----------------------------------------------------------------------------
def test_open_dataset_kjv(tmp_path):
    t0 = time.perf_counter()
    ds = open_dataset("kjv", "byte", cache_dir=str(tmp_path))
    cold = time.perf_counter() - t0
    target = tmp_path / "kjv-byte"
    assert ds.path == str(target) and ds.n_docs == 1189 and len(ds) > 4_000_000
    assert bytes(ds.tokens(1, 10).tolist()) == b"Genesis 1" and int(ds.tokens(0, 1)[0]) == 256
    assert cold < 10
    mtime = os.stat(target / "meta.json").st_mtime_ns
    t0 = time.perf_counter()
    ds2 = open_dataset("kjv", "byte", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 1
    assert os.stat(target / "meta.json").st_mtime_ns == mtime and ds2.fingerprint == ds.fingerprint
    assert os.listdir(tmp_path) == ["kjv-byte"]
    # a prepared directory opened by path, with a tokenizer check
    assert open_dataset(str(target), "byte").fingerprint == ds.fingerprint


def test_open_dataset_env_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIST_LLAMA_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    big = tmp_path / "big"
    prepare([src], BigVocab(), str(big), progress=False)
    with pytest.raises(ValueError, match=r"fake-big.*'byte'"):
        open_dataset(str(big), "byte")
    with pytest.raises(ValueError, match=r"'nope'.*kjv"):
        open_dataset("nope", "byte")
    assert open_dataset(str(big), BigVocab()).n_docs == len(DOCS)


def _open_kjv(cache, barrier, q):
    barrier.wait()
    try:
        q.put(open_dataset("kjv", "byte", cache_dir=cache).fingerprint)
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(f"error: {e!r}")


def test_open_dataset_concurrent(tmp_path):
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_kjv, args=(str(tmp_path), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] and not results[0].startswith("error")
    assert os.listdir(tmp_path) == ["kjv-byte"]
    assert TokenDataset.open(tmp_path / "kjv-byte").fingerprint == results[0]


def test_token_ids_outside_the_vocabulary_are_caught_with_the_file_named(tmp_path):
    """prepare records the largest id; a dataset whose ids do not fit its vocabulary is refused when it
    opens, and a shard changed afterwards is named at the read instead of an IndexError in the model."""
    import json

    ds = make_ds(tmp_path, DOCS)
    assert ds.meta["max_id"] == max(int(ds.tokens(0, len(ds)).max()), 0) < ds.vocab_size
    meta_path = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "max_id": meta["vocab_size"]}))
    with pytest.raises(ValueError, match="do not fit the vocabulary"):
        TokenDataset.open(tmp_path / "ds")
    meta_path.write_text(json.dumps(meta))
    shard = tmp_path / "ds" / meta["shards"][0]["file"]
    data = np.fromfile(shard, dtype="<u2")
    data[5] = 60000
    data.tofile(shard)
    ds = TokenDataset.open(tmp_path / "ds")
    with pytest.raises(DataError, match=rf"^{shard}: token id 60000 at position 5 is outside the vocabulary"):
        ds.tokens(0, 10)
