"""Peak host memory of dist-llama-export beside the size of what it exports.

Writes a Hugging Face directory with >= 2 GB of fp32 weights (a Llama-2-shaped model: dim 2048,
8 layers, vocabulary 32000; random values), then runs `dist-llama-export` on it in a fresh process
(fp32 and bf16 outputs, 1 GB shards) and prints the child's peak RSS next to the checkpoint size, the
largest tensor and the ratio. Streaming means the peak follows the largest tensor, not the model.

    .venv/bin/python bench/export_memory.py [--workdir DIR]
    .venv/bin/python bench/export_memory.py --quick     # a tiny model, fp32 only: seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(path: Path, quick: bool = False) -> tuple[int, int]:
    """(bytes of weights, bytes of the largest tensor) of the directory written."""
    from safetensors.torch import save_file

    from dist_llama.model import ModelArgs
    from dist_llama.weights import expected_shapes
    from dist_llama.model.hf import hf_name
    from dist_llama.weights.export import hf_config

    args = ModelArgs(dim=2048, n_layers=8, n_heads=16, n_kv_heads=16, vocab_size=32000, multiple_of=256,
                     rope_theta=10000.0, max_seq_len=4096)
    if quick:
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, multiple_of=32,
                         rope_theta=10000.0, max_seq_len=128)
    path.mkdir(parents=True)
    shapes = expected_shapes(args)
    g = torch.Generator().manual_seed(0)
    # One file per layer, so that making the checkpoint needs little memory itself.
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        key = name.split(".")[1] if name.startswith("layers.") else "top"
        groups.setdefault(key, {})[hf_name(name)] = torch.randn(shape, generator=g) * 0.02
    weight_map = {}
    for key, tensors in groups.items():
        file = f"model-{key}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(args, torch.float32, None, None)))
    return total, max(4 * torch.Size(s).numel() for s in shapes.values())


def export_peak_rss(src: Path, out: Path, dtype: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one export in a fresh process."""
    code = ("import resource, sys; from dist_llama.weights.export import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(src), "--out", str(out), "--dtype", dtype,
                           "--max-shard-gb", "1"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK"))
    return peak, elapsed


def baseline_rss() -> float:
    """RSS of a process that imports the exporter and does nothing: the interpreter + torch floor."""
    code = ("import resource; import dist_llama.weights.export; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--make", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a tiny model, fp32 only (a smoke test)")
    args = parser.parse_args()
    if args.make:  # the child that writes the checkpoint
        print(json.dumps(make_checkpoint(Path(args.make), args.quick)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-bench-"))
    try:
        # In a child: a peak RSS high-water mark survives fork, so this process must stay small.
        made = subprocess.run([sys.executable, __file__, "--make", str(work / "hf"), *(["--quick"] * args.quick)],
                              capture_output=True, text=True, check=True)
        total, largest = json.loads(made.stdout.strip().splitlines()[-1])
        floor = baseline_rss()
        gib = 2**30
        print(f"checkpoint: {total / gib:.2f} GiB of fp32 weights, largest tensor {largest / gib:.3f} GiB; "
              f"import floor {floor / gib:.2f} GiB RSS")
        print(f"{'export':<8}{'peak RSS GiB':>14}{'above floor':>13}{'/ checkpoint':>14}{'/ largest':>11}{'s':>7}")
        for dtype in ("fp32",) if args.quick else ("fp32", "bf16"):
            peak, secs = export_peak_rss(work / "hf", work / f"out-{dtype}", dtype)
            above = peak - floor
            print(f"{dtype:<8}{peak / gib:>14.2f}{above / gib:>13.2f}{above / total:>14.2f}{above / largest:>11.1f}"
                  f"{secs:>7.1f}")
            shutil.rmtree(work / f"out-{dtype}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
