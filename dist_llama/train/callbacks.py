"""What the loop calls at named points but does not itself do: validation, logging the step record,
fault injection, hang reports after a restart, straggler and silent-data-corruption checks. Each is
a Callback; the loop calls every callback's hooks in list order:

  on_train_start()                  once, before resuming
  on_step_start(step)               before the step's forward (step numbers count from 1)
  on_update(step, elapsed_s)        after the optimizer update, before the step is timed
  on_record(record, result)         the applied step's record: add to it (validation), log it
  on_step_end(record)               after the step is recorded; returns findings for the recovery
                                    policy, already agreed by every rank
  on_exception(step, exc)           this rank's step raised (exc is re-raised after the callbacks)

The profiler and memory snapshots (train/profiling.py) are a Callback too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from dist_llama.faults import FaultInjector
from dist_llama.train.compute_clock import ComputeClock
from dist_llama.train.evaluate import Evaluator
from dist_llama.train.replicas import check_replicas, find_stragglers
from dist_llama.train.heartbeats import progress
from dist_llama.train.metrics import MetricsLogger, read_jsonl
from dist_llama.train.recovery import agree

@dataclass
class Finding:
    """A check that fired on some rank, agreed by all: the loop asks the recovery policy what to do
    and logs `event` with the fields and that action."""

    check: str
    event: str
    fields: dict = field(default_factory=dict)


class Callback:
    def on_train_start(self) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        pass

    def on_update(self, step: int, elapsed_s: float) -> None:
        pass

    def on_record(self, record: dict, result) -> None:
        pass

    def on_step_end(self, record: dict) -> list[Finding]:
        return []

    def on_exception(self, step: int, exc: BaseException) -> None:
        pass


class Validation(Callback):
    """The held-out loss at due steps (train.eval_interval, and the last step), added to the record
    after the update and before this step's checkpoint (train/evaluate.py)."""

    def __init__(self, evaluator: Evaluator, step, watchdog):
        self.evaluator, self.step, self.watchdog = evaluator, step, watchdog

    def on_record(self, record: dict, result) -> None:
        if self.evaluator.due(record["step"]):
            self.watchdog.beat(record["step"], "evaluate")
            t0 = time.perf_counter()
            record.update(self.evaluator.evaluate(self.step, result.fetched.seq_len, result.rows))
            record["val_time_s"] = time.perf_counter() - t0


class RecordLog(Callback):
    """The step record to metrics.jsonl, the console, wandb and TensorBoard: every
    train.log_interval steps, at the last step, and whenever it holds a validation or downstream scores."""

    def __init__(self, logger: MetricsLogger, interval: int, total_steps: int):
        self.logger, self.interval, self.total_steps = logger, interval, total_steps
        self.started: float | None = None
        self.steps = 0

    def on_step_start(self, step: int) -> None:
        if self.started is None:  # the ETA counts this process's steps, not its start-up
            self.started = time.perf_counter()

    def on_record(self, record: dict, result) -> None:
        self.steps += 1
        step = record["step"]
        if step % self.interval == 0 or step == self.total_steps or "val_loss" in record or "downstream_time_s" in record:
            elapsed = time.perf_counter() - self.started
            self.logger.log_step(record, eta_s=elapsed / self.steps * (self.total_steps - step))


class Faults(Callback):
    """Injected faults at the loop's points (slow forwards from the start; kill, sigterm, hang at
    step start; bitflip after the update). NaN losses and checkpoint faults are injected where they
    happen."""

    def __init__(self, injector: FaultInjector, parts):
        self.injector = injector
        self.parts = parts

    def on_train_start(self) -> None:
        self.injector.slow_down(self.parts)

    def on_step_start(self, step: int) -> None:
        self.injector.at_step_start(step)

    def on_update(self, step: int, elapsed_s: float) -> None:
        self.injector.after_step(step, self.parts)


class HangReport(Callback):
    """After a restart caused by a hang: which ranks were stuck. Every live rank's watchdog fires
    (the others wait for the stuck one in a collective) and names the suspects from all ranks'
    heartbeats (train/heartbeats.py); a frozen rank's own watchdog never fires."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_train_start(self) -> None:
        logger = self.logger
        events_file = logger.run_dir / "events.jsonl"
        if logger.rank != 0 or not events_file.exists():
            return
        hangs = []
        for event in read_jsonl(events_file):
            if event["event"] == "train_start":
                hangs = []
            elif event["event"] == "hang_detected":
                hangs.append(event)
        if not hangs:
            return
        # The suspects the watchdogs named from every rank's heartbeat (a frozen rank reports
        # nothing itself); without heartbeats, the reporting ranks furthest behind.
        stuck = sorted({r for e in hangs for r in e.get("suspects", ())})
        if not stuck:
            where = {e["rank"]: progress(e["step"], e["last_phase"]) for e in hangs}
            stuck = sorted(r for r, v in where.items() if v == min(where.values()))
        logger.event("hang_report", hangs[0]["step"], stuck_ranks=stuck,
                     last_phases={e["rank"]: e["last_phase"] for e in hangs}, dumps=sorted(e["dump"] for e in hangs))


class StragglerCheck(Callback):
    """Every `interval` steps, ranks whose compute time (`compute_s`: the step's forward/backward
    without the time the rank was blocked in collectives, train/compute_clock.py) is above factor x
    the median are reported. Each rank's time is its median over the interval's steps: one noisy
    step (a rank preempted by another process, a page fault storm) neither names a rank nor hides a
    slow one, as a single step's time would. Step times cannot be compared: in lockstep training
    every rank waits for the slowest, so all step times come out equal. A layout whose compute time
    the engine cannot measure gets one `straggler_check_unavailable` event with the reason, and no
    check."""

    def __init__(self, interval: int, factor: float, clock: ComputeClock, watchdog, logger: MetricsLogger):
        self.interval, self.factor, self.clock, self.watchdog, self.logger = interval, factor, clock, watchdog, logger
        self._times: list[float] = []  # this rank's compute_s of the interval's steps so far

    def on_train_start(self) -> None:
        if self.clock.unmeasured is not None:
            self.logger.event("straggler_check_unavailable", 0, reason=self.clock.unmeasured)

    def on_step_end(self, record: dict) -> list[Finding]:
        if self.clock.unmeasured is not None:
            return []
        if record.get("compute_s") is not None:
            self._times.append(record["compute_s"])
        if record["step"] % self.interval == 0:
            self.watchdog.beat(record["step"], "straggler_check")
            times, self._times = self._times, []
            # Every rank calls the collective; the same steps are timed on each.
            slow = find_stragglers(statistics.median(times) if times else 0.0, factor=self.factor)
            if slow:
                self.logger.event("stragglers", record["step"], ranks=[r for r, _ in slow],
                                  compute_s=[round(t, 4) for _, t in slow], steps=len(times), factor=self.factor)
        return []


class ReplicaCheck(Callback):
    """Every `interval` steps, data-parallel replicas compare a hash of their parameters; a replica
    that differs from the majority is silent data corruption."""

    def __init__(self, interval: int, group, parts, device, watchdog):
        self.interval, self.group, self.parts, self.device, self.watchdog = interval, group, parts, device, watchdog

    def on_step_end(self, record: dict) -> list[Finding]:
        if record["step"] % self.interval:
            return []
        self.watchdog.beat(record["step"], "sdc_check")
        divergent = check_replicas(self.parts, self.group)
        if not agree({"sdc": bool(divergent)}, self.device)["sdc"]:
            return []
        return [Finding("sdc", "sdc_detected", {"divergent_ranks": divergent, "all_ranks": bool(divergent)})]
