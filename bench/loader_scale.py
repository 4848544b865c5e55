"""Extra memory and time to the first batch of the data loader as the corpus grows.

One rank of 256 data-parallel ranks, sequence 8192, global batch 2048 (Llama 3 405B's final
stage), over a virtual token source of 1e9 ... 1.5e13 tokens (tokens and document starts computed,
nothing stored), each size in a fresh process: constructing the loader and reading the first batch,
from the start and resumed 10T tokens in (where the corpus has them). Beside it, the previous
loader's approach for the same corpus: a materialised np.random permutation of every window (up to
1e11 tokens; beyond that it takes minutes and gigabytes). The goal is a flat first column.

    .venv/bin/python bench/loader_scale.py
    .venv/bin/python bench/loader_scale.py --quick     # the smallest and the largest size (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SEQ, BATCH, DP = 8192, 2048, 256
SIZES = [1e9, 1e10, 1e11, 1e12, 1e13, 1.5e13]
RESUME_AT = 10e12


class VirtualSource:
    """n tokens, token i = i mod 50000, a document every 3000 tokens: nothing is stored."""

    def __init__(self, n: int):
        self.n = n
        self.fingerprint = f"virtual:{n}"

    def __len__(self):
        return self.n

    def tokens(self, start, stop):
        import numpy as np

        return np.arange(start, stop, dtype=np.int64) % 50000

    def doc_starts_in(self, start, stop):
        import numpy as np

        first = start // 3000 * 3000
        return np.arange(first, max(stop, first + 1), 3000, dtype=np.int64)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def child(n_tokens: int, resume_tokens: int, old: bool) -> dict:
    import numpy as np
    import torch  # noqa: F401 (loaded in any training process: not the loader's cost)

    from dist_llama.data.loader import PackedLoader

    base = _rss()
    t0 = time.perf_counter()
    if old:  # the previous loader's order: one materialised permutation of every window
        order = np.random.default_rng([0, 0]).permutation((n_tokens - 1) // SEQ)
        first = order[:BATCH // DP]
        assert len(first) == BATCH // DP
    else:
        loader = PackedLoader(VirtualSource(n_tokens), SEQ, BATCH, dp_rank=7, dp_size=DP)
        if resume_tokens:
            samples = resume_tokens // SEQ // BATCH * BATCH
            state = loader.state_dict()
            loader.load_state_dict({**state, "consumed": samples, "tokens": samples * SEQ, "stage_samples": samples,
                                    "per_source": {"data": samples}, "tokens_by_source": {"data": samples * SEQ}})
        batch = loader.next_batch()
        assert tuple(batch["tokens"].shape) == (BATCH // DP, SEQ)
    return {"seconds": time.perf_counter() - t0, "extra_rss": _rss() - base}


def run(n_tokens: int, resume_tokens: int = 0, old: bool = False) -> dict:
    code = (f"import json, sys; sys.path.insert(0, 'bench'); from loader_scale import child; "
            f"print(json.dumps(child({int(n_tokens)}, {int(resume_tokens)}, {old})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest and the largest size only")
    args = parser.parse_args()
    mib = 2**20
    print(f"one rank of {DP}, seq {SEQ}, global batch {BATCH}: construct + first batch")
    print(f"{'tokens':>9} {'start s':>8} {'start MiB':>10} {'@10T s':>7} {'@10T MiB':>9} "
          f"{'old perm s':>10} {'old MiB':>8} {'old/new s':>9}")
    for n in [SIZES[0], SIZES[-1]] if args.quick else SIZES:
        new = run(n)
        resumed = run(n, RESUME_AT) if n > RESUME_AT else None
        old = run(n, old=True) if n <= 1e11 else None
        cols = [f"{n:>9.1e}", f"{new['seconds']:>8.3f}", f"{new['extra_rss'] / mib:>10.1f}",
                f"{resumed['seconds']:>7.3f}" if resumed else f"{'-':>7}",
                f"{resumed['extra_rss'] / mib:>9.1f}" if resumed else f"{'-':>9}",
                f"{old['seconds']:>10.3f}" if old else f"{'-':>10}",
                f"{old['extra_rss'] / mib:>8.1f}" if old else f"{'-':>8}",
                f"{old['seconds'] / new['seconds']:>9.1f}" if old else f"{'-':>9}"]
        print(" ".join(cols), flush=True)


if __name__ == "__main__":
    main()
