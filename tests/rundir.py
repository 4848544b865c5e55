"""Reading a run directory's JSONL records (metrics.jsonl, events.jsonl) in tests."""

import json
from pathlib import Path
from typing import Optional


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    """Loss per step; steps recomputed after a restart appear twice in metrics.jsonl, the last counts."""
    return list({r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}.values())


def events(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    """The run's events, or those of one kind."""
    return [e for e in read_jsonl(run_dir / "events.jsonl") if kind is None or e["event"] == kind]
