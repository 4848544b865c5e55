"""Seeing time and memory on a live run: a torch.profiler trace of chosen steps on every rank, and on
CUDA the caching allocator's memory history (every allocation with its stack) at a chosen step and
when a step runs out of memory. Each file's path goes into events.jsonl.

  <run_dir>/profile/step-N/rank-R.json     Chrome trace (open in https://ui.perfetto.dev or
                                           chrome://tracing): CPU ops, CUDA kernels, collectives
  <run_dir>/memory/step-N-rank-R.pickle    memory snapshot (drag into https://pytorch.org/memory_viz)
  <run_dir>/memory/oom-step-N-rank-R.pickle
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from dist_llama.train.callbacks import Callback
from dist_llama.train.metrics import MetricsLogger

MEMORY_HISTORY_ENTRIES = 100_000
"""Allocation events the CUDA allocator remembers (a ring buffer): enough for a few steps."""


class StepProfiler(Callback):
    """A Callback: the profiler runs from a chosen step's start to its end (a retried step's attempts
    all land in its trace); the memory history is recorded over the snapshot step, or from the start
    of training when the out-of-memory snapshot is on."""

    def __init__(self, logger: MetricsLogger, run_dir: Path, rank: int, device: torch.device,
                 profile_steps: Sequence[int] = (), memory_snapshot_step: Optional[int] = None,
                 memory_snapshot_on_oom: bool = False):
        self.logger, self.run_dir, self.rank, self.device = logger, Path(run_dir), rank, device
        self.profile_steps = set(profile_steps)
        cuda = device.type == "cuda"
        self.snapshot_step = memory_snapshot_step if cuda else None
        self.on_oom = memory_snapshot_on_oom and cuda
        self._unavailable = (memory_snapshot_step is not None or memory_snapshot_on_oom) and not cuda
        self._profiler: Optional[profile] = None
        self._recording = False

    def on_train_start(self) -> None:
        if self._unavailable:
            self.logger.event("memory_snapshot_unavailable", 0, device=self.device.type,
                              reason="memory snapshots record the CUDA caching allocator")
        if self.on_oom:
            self._record(True)

    def on_step_start(self, step: int) -> None:
        if step in self.profile_steps and self._profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profiler.start()
        if step == self.snapshot_step:
            self._record(True)

    def on_step_end(self, record: dict) -> list:
        step = record["step"]
        if self._profiler is not None:
            self._profiler.stop()
            path = self.run_dir / "profile" / f"step-{step}" / f"rank-{self.rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._profiler.export_chrome_trace(str(path))
            self._profiler = None
            self.logger.event("profile_trace", step, path=str(path), all_ranks=True)
        if step == self.snapshot_step:
            self._dump(f"step-{step}-rank-{self.rank}.pickle", step, "memory_snapshot")
            if not self.on_oom:
                self._record(False)
        return []

    def on_exception(self, step: int, exc: BaseException) -> None:
        if self.on_oom and isinstance(exc, torch.OutOfMemoryError):
            self._dump(f"oom-step-{step}-rank-{self.rank}.pickle", step, "memory_snapshot_oom")

    def _record(self, enabled: bool) -> None:
        if enabled != self._recording:
            torch.cuda.memory._record_memory_history(enabled="all" if enabled else None,
                                                     max_entries=MEMORY_HISTORY_ENTRIES)
            self._recording = enabled

    def _dump(self, name: str, step: int, event: str) -> None:
        path = self.run_dir / "memory" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        self.logger.event(event, step, path=str(path), all_ranks=True)
