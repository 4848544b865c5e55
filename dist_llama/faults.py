"""Fault injection for tests and drills: inert unless faults are configured.

A fault is a spec string, the kind then key=value pairs separated by colons, e.g.
"kill:rank=1:step=7". Specs come from `health.faults` in the config plus the environment variable
DIST_LLAMA_FAULTS (comma-separated, appended), so a drill can be added to any launch command.

kind        keys (required, [optional])     effect
kill        rank, step                      SIGKILL this process at the start of the step
crash       step, [rank]                    raise RuntimeError at the start of the step, on EVERY attempt
                                            (no marker: a deterministic bug, the crash-loop detector's case)
hang        rank, step                      block forever at the start of the step (the watchdog's case)
sigterm     rank, step                      SIGTERM this process at the start of the step (preemption)
nan         step, [rank], [times=1]         the step's loss comes back NaN (x NaN) on `times` attempts of
                                            that step; with rank, only that rank's local loss
bitflip     rank, step, [bit]               after the step's update, flip one bit of element 0 of the
                                            first (by name) parameter with local data; default bit:
                                            the top mantissa bit (finite, but a different value)
slow        rank, factor                    every forward of this rank's model parts takes factor x as
                                            long: a sleep of (factor - 1) x its time inside the forward
                                            (a slow device; the other ranks wait in its collectives)
ckpt_fail   step, [rank]                    on_checkpoint_written raises RuntimeError
ckpt_corrupt step, [rank]                   on_checkpoint_written flips one byte of one .distcp file

Steps are the numbers the trainer passes to the hooks (it passes the 1-based number of the step
being computed, the `step` of its metrics line).

Once per run directory: before a fault acts, it atomically creates a marker file
<run_dir>/faults/<spec>[.rankN][.attemptK].fired (O_EXCL), and a fault whose marker exists does not
act again, so a fault fires once even across restarts of the job (a kill writes its marker before
killing). `crash` is the exception: it keeps no marker and fires whenever its step is reached. A fault with `rank` concerns that rank only. A fault without `rank` acts on every rank
that reaches it, each with its own marker (.rankN), except ckpt_corrupt: one corrupted file is the
drill, so the first rank to claim the shared marker does it. `nan` keeps one marker per attempt.
`slow` is a property of a node, not an event: it acts on every forward from `slow_down(parts)` on,
and its marker only records (once, at the first forward) that it was switched on.

Reporting: each firing appends an event dict {"kind", "step", "rank", "spec", ...details} to
`FaultInjector.fired` and, if given, calls `on_fire(kind, step, **details)` (details include
"spec"; never "kind", "step" or "rank") BEFORE the fault acts, so a kill or hang is logged first.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# The spec grammar lives with the configuration, which validates specs without importing torch.
# ENV_VAR, KINDS and parse_spec are not used here: callers know them from this module.
from dist_llama.config.fault_specs import (ENV_VAR, KINDS, FaultSpec, parse_spec,  # noqa: F401
                                           specs_from_env, validate_specs)


def _marker_name(text: str) -> str:
    """Spec -> file name: only [A-Za-z0-9._=-]; ':' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", text)


class FaultInjector:
    """The hooks the trainer and checkpointer call; each is a no-op unless a fault matches."""

    def __init__(self, specs: list[str], rank: int, run_dir: Path,
                 on_fire: Optional[Callable[..., None]] = None):
        parsed = validate_specs(specs)
        # A fault given twice (config and environment) is one fault.
        self.specs: list[FaultSpec] = list(dict.fromkeys(parsed))
        self.rank = rank
        self.marker_dir = Path(run_dir) / "faults"
        self.on_fire = on_fire
        self.fired: list[dict] = []
        """Every firing in this process, as event dicts (see the module docstring)."""
        self._step = 0
        """The step being computed (set at its start): what a slow forward reports."""

    @classmethod
    def from_config(cls, health_cfg, rank: int, run_dir: Path, on_fire: Optional[Callable[..., None]] = None,
                    environ: Mapping[str, str] = os.environ) -> "FaultInjector":
        """Specs from health.faults, then DIST_LLAMA_FAULTS."""
        return cls(list(health_cfg.faults or []) + specs_from_env(environ), rank, run_dir, on_fire)

    @property
    def active(self) -> bool:
        """Any fault configured (on any rank)."""
        return bool(self.specs)

    # --- bookkeeping -------------------------------------------------------------------------------
    def _mine(self, kind: str, step: Optional[int] = None) -> list[FaultSpec]:
        """Faults of this kind for this rank (at this step, if given)."""
        return [s for s in self.specs if s.kind == kind and s.rank in (None, self.rank)
                and (step is None or s.get("step") == step)]

    def _marker(self, spec: FaultSpec, attempt: Optional[int] = None) -> Path:
        name = _marker_name(spec.canonical)
        if spec.rank is None and spec.kind != "ckpt_corrupt":
            name += f".rank{self.rank}"
        if attempt is not None:
            name += f".attempt{attempt}"
        return self.marker_dir / f"{name}.fired"

    def _claim(self, marker: Path, step: int) -> bool:
        """Atomically create the marker; False if it already exists (fired before)."""
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"rank={self.rank} pid={os.getpid()} step={step} time={time.time():.3f}\n")
            f.flush()
            os.fsync(f.fileno())  # a kill follows at once: the marker must be on disk first
        return True

    def _report(self, spec: FaultSpec, step: int, **details) -> None:
        details = {"spec": spec.canonical, **details}
        self.fired.append({"kind": spec.kind, "step": step, "rank": self.rank, **details})
        if self.on_fire is not None:
            self.on_fire(spec.kind, step, **details)

    def _fire_once(self, spec: FaultSpec, step: int, **details) -> bool:
        if not self._claim(self._marker(spec), step):
            return False
        self._report(spec, step, **details)
        return True

    # --- hooks -------------------------------------------------------------------------------------
    def at_step_start(self, step: int) -> None:
        """Before the step's forward: crash, kill, sigterm, hang."""
        self._step = step
        if not self.specs:
            return
        for spec in self._mine("crash", step):
            self._report(spec, step)
            raise RuntimeError(f"injected crash at step {step} ({spec.canonical})")
        for spec in self._mine("sigterm", step):
            if self._fire_once(spec, step):
                os.kill(os.getpid(), signal.SIGTERM)
        for spec in self._mine("kill", step):
            if self._fire_once(spec, step):
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # SIGKILL to ourselves lands before this returns; never go on
        for spec in self._mine("hang", step):
            if self._fire_once(spec, step):
                while True:  # what a rank stuck in a dead collective looks like from outside
                    time.sleep(1.0)

    def loss(self, step: int, loss):
        """The step's local loss, NaN on the attempts a `nan` fault covers; otherwise the very same
        object (the trainer tests `is`). Multiplying (not adding) also poisons gradients when the
        loss is still to be backpropagated. Call once per attempt of a step, not per micro-batch."""
        if not self.specs:
            return loss
        for spec in self._mine("nan", step):
            for attempt in range(1, spec.get("times") + 1):
                if self._claim(self._marker(spec, attempt), step):
                    self._report(spec, step, attempt=attempt)
                    return loss * float("nan")
        return loss

    def after_step(self, step: int, parts: list[nn.Module]) -> None:
        """After the step's optimizer update: bitflip (once)."""
        if not self.specs:
            return
        for spec in self._mine("bitflip", step):
            if self._claim(self._marker(spec), step):
                where = flip_bit(parts, spec.get("bit"))
                self._report(spec, step, **where)

    def slow_down(self, parts: list[nn.Module]) -> None:
        """Install this rank's `slow` faults: a hook pair on each model part makes every forward
        sleep (factor - 1) x its own time before returning, so the delay is inside the compute,
        before the collectives that follow it, as a slow device's would be."""
        for spec in self._mine("slow"):
            for part in parts:
                started: list[float] = []
                # Registered after the engine's hooks: FSDP's pre-forward all-gather is not timed.
                part.register_forward_pre_hook(lambda module, args, started=started: started.append(time.perf_counter()))
                part.register_forward_hook(
                    lambda module, args, out, spec=spec, started=started: self._slow_forward(spec, started.pop()))

    def _slow_forward(self, spec: FaultSpec, started: float) -> None:
        if self._claim(self._marker(spec), self._step):  # once per run directory: the switch-on
            self._report(spec, self._step, factor=spec.get("factor"))
        time.sleep((spec.get("factor") - 1.0) * (time.perf_counter() - started))

    def on_checkpoint_written(self, step: int, tmp_dir: Path, files: Optional[list[str]] = None) -> None:
        """After this rank's checkpoint files are written into tmp_dir, before it verifies them
        (every rank calls it; `files`: those it wrote, relative to tmp_dir). ckpt_corrupt edits the
        first non-empty .distcp among `files` (of all of tmp_dir when not given), on whichever
        rank claims it first, so the rank that checks the file is the one that wrote it."""
        if not self.specs:
            return
        for spec in self._mine("ckpt_fail", step):
            if self._fire_once(spec, step):
                raise RuntimeError("injected checkpoint write failure")
        for spec in self._mine("ckpt_corrupt", step):
            if self._claim(self._marker(spec), step):
                candidates = (sorted(Path(tmp_dir).rglob("*.distcp")) if files is None else
                              [Path(tmp_dir) / f for f in sorted(files) if f.endswith(".distcp")])
                candidates = [f for f in candidates if f.stat().st_size > 0]
                if not candidates:
                    raise FileNotFoundError(f"ckpt_corrupt: no non-empty .distcp file in {tmp_dir}")
                path = candidates[0]
                offset = path.stat().st_size // 2  # the middle: tensor bytes, not a header
                self._report(spec, step, file=str(path), offset=offset)
                with open(path, "r+b") as f:
                    f.seek(offset)
                    byte = f.read(1)
                    f.seek(offset)
                    f.write(bytes([byte[0] ^ 0xFF]))


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def default_bit(dtype: torch.dtype) -> int:
    """The top mantissa bit: flips the value by up to 1.5x, still finite (subtle, as real SDC is)."""
    return {torch.float32: 22, torch.bfloat16: 6, torch.float16: 9, torch.float64: 51}.get(
        dtype, torch.finfo(dtype).bits - 2 if dtype.is_floating_point else 0)


def flip_bit(parts: list[nn.Module], bit: Optional[int] = None) -> dict:
    """Flip one bit of element 0 of the first parameter (by name, first part first) that has local
    data on this rank (an FSDP shard can be empty), in place. Returns where, for the event."""
    for part in parts:
        for name, p in sorted(part.named_parameters(), key=lambda kv: kv[0]):
            local = p.detach().to_local() if isinstance(p, DTensor) else p.detach()
            if local.numel() == 0:
                continue
            nbits = local.element_size() * 8
            b = default_bit(local.dtype) if bit is None else bit
            if b >= nbits:
                raise ValueError(f"bitflip: bit {b} does not exist in {local.dtype}")
            # Reinterpret the element's bytes as a signed integer of the same width and XOR in
            # place: the parameter's storage changes, exactly one bit of it.
            mask = (1 << b) - (1 << nbits if b == nbits - 1 else 0)
            with torch.no_grad():
                element = local[(0,) * local.dim()]  # a view, contiguous or not
                element.view(_INT_VIEW[local.element_size()]).bitwise_xor_(mask)
            return {"param": name, "bit": b}
    raise RuntimeError("bitflip: this rank holds no parameter data")
