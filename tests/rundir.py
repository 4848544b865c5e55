"""Reading a run directory's JSONL records (metrics.jsonl, events.jsonl) in tests."""

from pathlib import Path
from typing import Optional

from dist_llama.train.metrics import read_jsonl  # the loop's own reader: torn lines are skipped


def losses(run_dir: Path) -> list[float]:
    """Loss per step; steps recomputed after a restart appear twice in metrics.jsonl, the last counts."""
    return list({r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}.values())


def events(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    """The run's events, or those of one kind."""
    return [e for e in read_jsonl(run_dir / "events.jsonl") if kind is None or e["event"] == kind]
