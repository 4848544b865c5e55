"""The names config values are checked against, defined here (plain Python) so the configuration
can check them without importing what acts on them: pipeline schedules (parallel.pipeline) and
recovery actions (train.recovery). Engines and objectives have registries of their own (engines.py,
objectives.py)."""

from __future__ import annotations

from typing import Optional

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb")
"""Pipeline schedules (parallel.pp_schedule)."""
MULTI_STAGE = ("interleaved_1f1b", "interleaved_zb")
"""The schedules that run several stages per pipeline rank (parallel.pp_virtual_stages >= 2)."""
ACTIONS = ("log", "skip", "retry", "rollback", "restart", "abort")
"""Recovery actions (health.*_action), in increasing severity."""


def schedule_constraint(name: str, n_microbatches: int, pp: int) -> Optional[str]:
    """Why a schedule can't run this micro-batch count on pp ranks, or None if it can."""
    if name == "1f1b" and n_microbatches < pp:
        return f"1f1b needs at least pp={pp} micro-batches per step, got {n_microbatches}"
    if name in MULTI_STAGE:
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            return (f"{name} needs the micro-batch count ({n_microbatches}) to be a multiple of "
                    f"max(1, micro-batches // pp) = {rounds}")
    return None
