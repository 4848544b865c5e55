"""The table of bench/gpu_vs_torchtitan.sh: dist_llama's metrics.jsonl and torchtitan's log, side by side.

  python bench/gpu_vs_torchtitan_table.py METRICS.jsonl TORCHTITAN.log [dist_llama config args ...]
  python bench/gpu_vs_torchtitan_table.py --quick     # the table of made-up records (a smoke test, CPU)

Steady state: the first third of each run's steps (compilation, warm-up) is left out and medians are
taken. MFU is computed for both from their tokens/s with one formula (dist_llama.model.flops: PaLM,
6N + 12·L·H·Q·T, non-embedding N) and one peak (H100/H200 dense bf16, 989 TFLOP/s), so the column
compares throughput and nothing else; each tool's own MFU figure is shown beside it. Memory: the
peak the CUDA caching allocator reserved (what torchtitan prints), and dist_llama's peak allocated.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from dist_llama.model.flops import H100_BF16_PEAK, flops_per_token, mfu
from dist_llama.train.cli import parse_args, resolve_config

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TITAN_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)"
                        r".*?mfu:\s*([\d.]+|N/A)%?")


def steady(rows: list) -> list:
    return rows[len(rows) // 3:]


def torchtitan_rows(log_path: str) -> list[dict]:
    rows = []
    for line in open(log_path, errors="replace"):
        m = TITAN_STEP.search(ANSI.sub("", line))
        if m:
            rows.append({"step": int(m[1]), "loss": float(m[2]), "mem_reserved_gib": float(m[3]),
                         "tokens_per_sec": float(m[4].replace(",", "")),
                         "mfu": None if m[5] == "N/A" else float(m[5]) / 100})
    if not rows:
        raise SystemExit(f"no step lines in {log_path}: did torchtitan run? (see the log)")
    return rows


def quick_inputs(work: Path) -> list[str]:
    """Made-up inputs in the two formats (six steps each) and the debug model: what --quick tabulates.
    The torchtitan lines are ones TITAN_STEP reads (colour codes included), not a real log's."""
    metrics, log = work / "metrics.jsonl", work / "torchtitan.log"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 6.0 - 0.1 * i, "tokens_per_sec": 1000.0 + i,
                                           "mfu": 0.4, "mem_gib": 1.0, "mem_reserved_gib": 1.5}) + "\n"
                               for i in range(1, 7)))
    log.write_text("".join(f"[titan] \x1b[31mstep: {i}  \x1b[32mloss:  {6.1 - 0.1 * i:.4f}  \x1b[33mmemory:  2.00GiB"
                           f"(2.10%)  \x1b[34mtps: 1,{i}00  \x1b[36mtflops: 1.0  \x1b[35mmfu: 40.00%\x1b[39m\n"
                           for i in range(1, 7)))
    return [str(metrics), str(log), "--config", "configs/debug.yaml"]


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--quick"]:
        args = quick_inputs(Path(tempfile.mkdtemp(prefix="titan-table-")))
    metrics_path, titan_log, *config_args = args
    cfg, _ = resolve_config(*parse_args(config_args + ["train.device=cpu", "train.float8=false"]), world_size=1)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    ours = [json.loads(line) for line in open(metrics_path)]
    theirs = torchtitan_rows(titan_log)

    def med(rows, key):
        values = [r[key] for r in steady(rows) if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    tps_d, tps_t = med(ours, "tokens_per_sec"), med(theirs, "tokens_per_sec")
    mem_d, mem_t = max(r["mem_reserved_gib"] for r in ours), max(r["mem_reserved_gib"] for r in theirs)
    rows = [
        ("tokens/s", f"{tps_d:,.0f}", f"{tps_t:,.0f}", f"{tps_d / tps_t:.3f}"),
        ("MFU, one formula (%)", f"{100 * mfu(tps_d, per_token, H100_BF16_PEAK):.1f}",
         f"{100 * mfu(tps_t, per_token, H100_BF16_PEAK):.1f}", f"{tps_d / tps_t:.3f}"),
        ("MFU, own figure (%)", f"{100 * med(ours, 'mfu'):.1f}", f"{100 * med(theirs, 'mfu'):.1f}", ""),
        ("peak reserved (GiB)", f"{mem_d:.1f}", f"{mem_t:.1f}", f"{mem_d / mem_t:.3f}"),
        ("peak allocated (GiB)", f"{max(r['mem_gib'] for r in ours):.1f}", "-", ""),
        ("loss first -> last", f"{ours[0]['loss']:.3f} -> {ours[-1]['loss']:.3f}",
         f"{theirs[0]['loss']:.3f} -> {theirs[-1]['loss']:.3f}", ""),
    ]
    m = cfg.model
    print(f"\nLlama-3-8B shape, {m.n_layers} layers, seq {cfg.data.seq_len}, batch {cfg.train.global_batch_size}, "
          f"ac {cfg.parallel.ac}, compile {cfg.train.compile}, float8 {'train.float8=true' in config_args}; "
          f"{len(ours)} / {len(theirs)} steps, medians of the last two thirds")
    print(f"{'':<24}{'dist_llama':>20}{'torchtitan':>20}{'dist_llama / torchtitan':>26}")
    for name, a, b, ratio in rows:
        print(f"{name:<24}{a:>20}{b:>20}{ratio:>26}")
    print("(higher is better for tokens/s and MFU, lower for memory; different tokenizers, so losses differ)")


if __name__ == "__main__":
    main()
