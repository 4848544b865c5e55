"""dist-llama-prepare tokens/s with 1 and 2 workers, side by side in one run.

The builtin corpus (dist_llama/data/corpus/kjv.jsonl.gz) copied into --copies input files, prepared
with each tokenizer and each worker count into a fresh directory; the time is the whole of
``prepare`` (reading, tokenising, writing, fsync; the pool's start-up included). The outputs of all
worker counts must be byte-identical. By default the tokenizers are ``byte`` (tokenising costs
almost nothing: the rate is reading and JSON decoding) and a 4096-token byte-level BPE
tokenizer.json trained on the corpus here (a real tokenizer's cost). Each count runs --repeats
times; the best time counts.

  python bench/prepare_speed.py                               # byte + BPE, 4 copies, 1 and 2 workers
  python bench/prepare_speed.py --tokenizer /path/to/tokenizer.model --workers 1 2 4 8 --copies 16
  python bench/prepare_speed.py --quick                       # byte, the corpus's first 200 documents
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dist_llama.data.prepare import prepare
from dist_llama.data.sources import KJV_PATH


def train_bpe(path: Path, vocab_size: int = 4096) -> str:
    import gzip
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with gzip.open(KJV_PATH, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return str(path)


def head(src: str, dst: str, lines: int) -> None:
    """The first `lines` documents of a .jsonl.gz file."""
    import gzip
    import itertools

    with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(dst, "wt", encoding="utf-8") as out:
        out.writelines(itertools.islice(f, lines))


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", action="append", default=None,
                    help="a tokenizer spec (repeatable; default: byte and a BPE trained on the corpus)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--copies", type=int, default=4, help="input files, each a copy of the corpus")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="byte only, one input of the corpus's first 200 documents")
    args = ap.parse_args()
    if args.quick:
        args.tokenizer, args.copies = args.tokenizer or ["byte"], 1

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="prepare_speed-"))
    try:
        inputs = []
        for i in range(args.copies):
            inputs.append(str(work / f"kjv{i}.jsonl.gz"))
            if args.quick:
                head(KJV_PATH, inputs[-1], 200)
            else:
                shutil.copyfile(KJV_PATH, inputs[-1])
        specs = args.tokenizer or ["byte", train_bpe(work / "bpe4096.json")]
        size = sum(os.path.getsize(p) for p in inputs)
        print(f"{args.copies} x kjv.jsonl.gz ({size / 1e6:.1f} MB compressed), {cores} usable cores, "
              f"best of {args.repeats}")
        print(f"{'tokenizer':<16} {'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'vs 1':>6}")
        for spec in specs:
            label = os.path.basename(spec)[:16]
            rates, reference = {}, None
            for w in args.workers:
                best = float("inf")
                for _ in range(args.repeats):
                    out = work / f"out-{w}"
                    shutil.rmtree(out, ignore_errors=True)
                    t0 = time.perf_counter()
                    meta = prepare(inputs, spec, str(out), progress=False, workers=w)
                    best = min(best, time.perf_counter() - t0)
                files = dir_bytes(out)
                if reference is None:
                    reference = files
                elif files != reference:
                    raise SystemExit(f"prepare_speed: {spec}: the output with {w} workers differs")
                rates[w] = meta["n_tokens"] / best
                base = rates[args.workers[0]]
                print(f"{label:<16} {w:>7} {meta['n_tokens']:>12,} {best:>8.2f} {rates[w]:>12,.0f} "
                      f"{rates[w] / base:>5.2f}x")
            if 1 in rates and 2 in rates:
                print(f"{label}: 2 workers / 1 worker = {rates[2] / rates[1]:.2f}x (outputs byte-identical)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
