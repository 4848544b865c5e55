"""This rank's own compute time in a step's forward/backward: the straggler check's input.

Whole-step wall times cannot show a slow rank: in lockstep training every rank waits for the
slowest one inside collectives, so all of them report the same step time. What differs between
ranks is their own work, so a clock times the forward/backward window and takes out the time the
rank was blocked in the engine's collectives (waiting for the others, and moving data):

    compute_s = window wall time - time blocked in collectives

Only the engine knows where its rank blocks, so each engine builds its clock and feeds it:

- FSDP2 (one sharding dimension): every all-gather and reduce-scatter goes through the engine's
  own comm objects (`FSDPModule.set_custom_all_gather/_reduce_scatter`), which make each call
  synchronous and time it with `blocked()`. On CPU that is where gloo blocks anyway.
- DDP: forward has no collective (buffers are not broadcast), and the gradient buckets are
  all-reduced asynchronously and waited for only at the end of backward. So the rank's own work
  ends when its last bucket is ready: the comm hook calls `work_done()` and everything after it in
  the window counts as blocked ("time up to the first blocking collective").

Any other collective inside the window would count as compute, wait included: layouts with
collectives the engine does not see (tensor, context or pipeline parallel inside the model or the
schedule, HSDP's replica all-reduce, DeepSpeed's own communication) get an `Unmeasured` clock
that says why, and the straggler check reports that instead of comparing wrong numbers.

On CUDA the window and `work_done` are CUDA events on the current stream, so the time is the
device's, not the host's launch time; that is honest for DDP (the compute stream never waits for
the bucket all-reduces before the end). FSDP's all-gathers run on their own streams and the
compute stream waits on them inside FSDP, where no event can be put: FSDP on CUDA is unmeasured.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch


class ComputeClock:
    """Times one forward/backward window at a time; `seconds` is the last window's compute time."""

    unmeasured: Optional[str] = None
    """Why this layout's compute time cannot be measured, or None when it can."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: Optional[float] = None
        self._start = None
        self._done = None
        self._blocked_s = 0.0

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _between(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        """Around the step's forward/backward."""
        self._start, self._done, self._blocked_s = self._now(), None, 0.0
        try:
            yield
        finally:
            end = self._done if self._done is not None else self._now()
            self.seconds = max(0.0, self._between(self._start, end) - self._blocked_s)
            self._start = None

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Around a synchronous collective call inside the window (CPU only: a CUDA collective call
        returns before the device has waited for anything)."""
        if self._start is None or self.cuda:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._blocked_s += time.perf_counter() - t0

    def work_done(self) -> None:
        """This rank's own work in the window may have ended here: what follows until the window
        closes is waiting, unless work_done is called again later (the last call counts)."""
        if self._start is not None:
            self._done = self._now()


class Unmeasured(ComputeClock):
    """A layout whose collectives the engine cannot see: no time, and the reason."""

    def __init__(self, reason: str):
        super().__init__(torch.device("cpu"))
        self.unmeasured = reason

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        yield

    def work_done(self) -> None:
        pass
