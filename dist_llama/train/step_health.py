"""Step health: NaN/Inf, loss spikes and gradient-norm explosions on the global (already
all-reduced) loss and gradient norm of a step, identical on every rank. Detection only: what to do
about a fired check is decided in train/recovery.py. CHECKS names the checks, once.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import numpy as np

MAD_TO_SIGMA = 1.4826
"""MAD x this estimates the standard deviation of normal data (1 / Phi^-1(3/4))."""

CHECKS = ("nan", "loss_spike", "grad_norm_explosion")
"""Names StepHealth.check returns; the recovery policy maps each to an action."""


# --- spikes --------------------------------------------------------------------------------------
class RobustZScore:
    """Distance of a value from the median of the last `window` accepted values, in robust standard
    deviations (1.4826 x MAD). Median and MAD ignore the outliers a mean and std would chase, so one
    earlier spike does not mask the next.

    The caller `accept`s only healthy values, so a spike never enters the window it is judged by.
    """

    def __init__(self, window: int, min_history: int, rel_floor: float = 1e-3):
        if not 1 <= min_history <= window:
            # A window smaller than min_history never fills enough: the check would never fire.
            raise ValueError(f"need 1 <= min_history <= window, got window={window}, min_history={min_history}")
        self.window = window
        self.min_history = min_history
        self.rel_floor = rel_floor
        """A window of identical values has MAD 0; the scale is floored at this fraction of |median|
        (and a tiny absolute floor) so a flat history makes small deviations large, not infinite."""
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def _median_scale(self) -> tuple[float, float]:
        xs = np.asarray(self.values, dtype=np.float64)
        median = float(np.median(xs))
        mad = float(np.median(np.abs(xs - median)))
        scale = max(MAD_TO_SIGMA * mad, self.rel_floor * abs(median), 1e-12)
        return median, scale

    def deviation(self, x: float) -> Optional[float]:
        """Signed (x - median) / scale; None until min_history values were accepted."""
        if len(self.values) < self.min_history:
            return None
        median, scale = self._median_scale()
        return (x - median) / scale

    def score(self, x: float) -> Optional[float]:
        """|x - median| / (1.4826 MAD); None until min_history values were accepted."""
        d = self.deviation(x)
        return None if d is None else abs(d)

    def accept(self, x: float) -> None:
        self.values.append(float(x))

    def state_dict(self) -> dict:
        return {"window": self.window, "min_history": self.min_history, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        """The history comes from the checkpoint; window and min_history stay as configured now (a
        smaller window keeps the newest values)."""
        self.values = collections.deque((float(v) for v in state["values"]), maxlen=self.window)


class StepHealth:
    """Per-step checks on the global loss and gradient norm (identical on every rank)."""

    def __init__(self, health_cfg):
        self.zscore = health_cfg.spike_zscore
        self.grad_norm_max = health_cfg.grad_norm_max
        self.loss = RobustZScore(health_cfg.spike_window, health_cfg.spike_min_history)
        self.grad_norm = RobustZScore(health_cfg.spike_window, health_cfg.spike_min_history)
        self.last: dict[str, Optional[float]] = {}
        """The signed z-scores of the last check (for event logs): loss_z, grad_norm_z."""

    def check(self, loss: float, grad_norm: float) -> list[str]:
        """Names of the checks that fired, in CHECKS order; [] when the step is healthy.

        Spikes are one-sided: only values far ABOVE the median fire, because a loss or gradient
        norm that falls fast (early training) is progress, not a fault. A non-finite value fires
        "nan" alone: z-scores of NaN mean nothing."""
        self.last = {}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return ["nan"]
        loss_z, grad_z = self.loss.deviation(loss), self.grad_norm.deviation(grad_norm)
        self.last = {"loss_z": loss_z, "grad_norm_z": grad_z}
        fired = []
        if loss_z is not None and loss_z > self.zscore:
            fired.append("loss_spike")
        if (self.grad_norm_max is not None and grad_norm > self.grad_norm_max) or \
                (grad_z is not None and grad_z > self.zscore):
            fired.append("grad_norm_explosion")
        return fired

    def accept(self, loss: float, grad_norm: float) -> None:
        """Add a healthy step's values to the history the next steps are judged by."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.loss.accept(loss)
            self.grad_norm.accept(grad_norm)

    def state_dict(self) -> dict:
        """Plain JSON-able data: saved in checkpoints so a resumed run judges spikes identically."""
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
