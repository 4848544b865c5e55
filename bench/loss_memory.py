"""Peak memory and time of the loss's forward + backward: the plain cross-entropy on the whole
micro-batch's logits beside the chunked one (parallel/loss.py, the automatic chunk size), for one
sequence of Llama 3's vocabulary (128,256) x 8,192 tokens and a smaller shape, with the ratios.

Peak memory: on CUDA the allocator's peak above what was allocated before; on CPU torch's MemTracker
(every storage alive at once). The large shape's plain loss needs ~13 GB, so on CPU it runs on fake
tensors (memory only, no time) unless --real is given.

    .venv/bin/python bench/loss_memory.py [--dim 64] [--real] [--repeats 3]
    .venv/bin/python bench/loss_memory.py --quick    # a small real shape and the large one (fake on CPU)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dist_llama.parallel.loss import auto_chunk_tokens, chunked_loss_sum

SHAPES = [(32_000, 2048), (128_256, 8192)]  # (vocab, tokens): Llama 2's and Llama 3's vocabularies


def plain(h, w, labels):
    return F.cross_entropy((h @ w.t()).float().flatten(0, 1), labels.flatten(), reduction="sum")


def chunked(h, w, labels):
    return chunked_loss_sum(h, w, labels, auto_chunk_tokens(w.shape[0], 1))


def inputs(vocab, tokens, dim, device):
    h = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    w = (torch.randn(vocab, dim, device=device) / dim**0.5).requires_grad_()
    return h, w, torch.randint(0, vocab, (1, tokens), device=device)


def measure(loss_fn, vocab, tokens, dim, device, fake, repeats):
    """(peak bytes, seconds per forward+backward or None)."""
    if device.type == "cuda":
        h, w, labels = inputs(vocab, tokens, dim, device)
        seconds = []
        for _ in range(repeats + 1):  # the first is a warm-up
            h.grad = w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss_fn(h, w, labels).backward()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() - base
        return peak, min(seconds[1:])
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    if fake:
        with FakeTensorMode():
            h, w, labels = inputs(vocab, tokens, dim, device)
            tracker = MemTracker()
            with tracker:
                loss_fn(h, w, labels).backward()
        return tracker.get_tracker_snapshot("peak")[device]["Total"], None
    h, w, labels = inputs(vocab, tokens, dim, device)
    tracker = MemTracker()
    with tracker:
        loss_fn(h, w, labels).backward()
    peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
    seconds = []
    for _ in range(repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        loss_fn(h, w, labels).backward()
        seconds.append(time.perf_counter() - t0)
    return peak, min(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64, help="hidden size (the logits do not depend on it)")
    ap.add_argument("--real", action="store_true", help="CPU: run the large shape on real tensors too")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a small shape instead of Llama 2's, one repeat (a smoke test)")
    args = ap.parse_args()
    shapes = [(4096, 512), SHAPES[-1]] if args.quick else SHAPES
    if args.quick:
        args.repeats = 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gib = 2**30
    print(f"loss forward+backward on {device.type}, hidden {args.dim}; peak memory above the inputs")
    print(f"{'vocab':>8}{'tokens':>8}{'logits GiB':>12}{'chunk':>7}{'plain GiB':>11}{'chunked GiB':>13}"
          f"{'memory ratio':>14}{'plain s':>9}{'chunked s':>11}{'time ratio':>12}")
    for vocab, tokens in shapes:
        fake = device.type == "cpu" and not args.real and vocab * tokens > 10**9
        p_mem, p_s = measure(plain, vocab, tokens, args.dim, device, fake, args.repeats)
        c_mem, c_s = measure(chunked, vocab, tokens, args.dim, device, fake, args.repeats)
        times = (f"{p_s:>9.3f}{c_s:>11.3f}{c_s / p_s:>11.2f}x" if p_s is not None
                 else f"{'-':>9}{'-':>11}{'(fake)':>12}")
        print(f"{vocab:>8,}{tokens:>8}{4 * vocab * tokens / gib:>12.2f}{auto_chunk_tokens(vocab, 1):>7}"
              f"{p_mem / gib:>11.2f}{c_mem / gib:>13.3f}{p_mem / c_mem:>13.1f}x{times}")


if __name__ == "__main__":
    main()
