"""The loop's own state that checkpoints carry: progress through the data, and goodput accounting."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Tokens trained on (counted label tokens of every step done)."""
    data: Optional[dict] = None
    """The loader's position at this step boundary (before the prefetched batch)."""


@dataclass
class Goodput:
    """Where wall time went since the run directory's first start (restarts included: it is
    checkpointed, so work after the checkpoint a restart resumes from counts as lost)."""

    run_start: float = field(default_factory=time.time)
    productive_s: float = 0.0
    """Time in steps that were kept."""
    lost_s: float = 0.0
    """Time in steps that were retried, skipped or rolled back."""
    checkpoint_blocking_s: float = 0.0
    """Time the loop waited for checkpoint saves."""

    def effective(self) -> float:
        """Productive step time over wall time (restarts, recomputed steps, checkpoint blocking and
        stalls all count against it)."""
        return self.productive_s / max(1e-9, time.time() - self.run_start)

    def summary(self) -> dict:
        wall = time.time() - self.run_start
        return {"effective_training_time": self.effective(), "wall_s": round(wall, 3),
                "productive_s": round(self.productive_s, 3),
                "checkpoint_blocking_s": round(self.checkpoint_blocking_s, 3),
                "retried_or_skipped_s": round(self.lost_s, 3),
                # what remains: restarts, steps recomputed after them or after rollbacks, start-up
                "restarts_recompute_startup_s": round(wall - self.productive_s - self.checkpoint_blocking_s
                                                      - self.lost_s, 3)}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
