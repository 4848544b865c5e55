"""What a live training rank actually holds, measured from its tensors, for checking the estimator
against reality (bench/plan_vs_measured.py, tests/test_plan.py).

- Model states: bytes of the distinct storages behind the rank's parameters, gradients (read just
  before the optimizer steps) and optimizer states (just after), DTensors by their local shard. A
  storage is what the allocator handed out, so FSDP's padding of uneven shards counts.
- Saved activations: every tensor autograd saves for backward, other than parameters and views of
  them, tracked from save (pack) to use in backward (unpack) by distinct storage; the peak of the
  live total over the step is what the estimator's activations (+ the loss's logits) predict.
  Transient buffers that backward never needs (gathered FSDP weights, all-gather outputs,
  temporaries) are not in it, nor is allocator caching: CPU tensors have no caching allocator, and
  process RSS (hundreds of MiB of libraries) would drown a small model's few MiB.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _ptr(t: torch.Tensor):
    """Data pointer of t's storage; None for a freed one (FSDP resizes resharded storages to 0)."""
    try:
        return _local(t).untyped_storage().data_ptr()
    except RuntimeError:
        return None


def storage_bytes(tensors: Iterable) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped)."""
    seen = {}
    for t in tensors:
        if t is not None:
            storage = _local(t).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's exp_avg and exp_avg_sq (its scalar step counters are left out: a few bytes)."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.numel() > 1)


class StateProbe:
    """Hooks on a rank's optimizers recording parameter, gradient and optimizer-state bytes at the
    step (gradients exist only between backward and the optimizer's zero_grad)."""

    def __init__(self, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.params = [p for part in model_parts for p in part.parameters()]
        self.optimizers = optimizers
        self.bytes = {}
        for opt in optimizers:
            opt.register_step_pre_hook(lambda *_: self._before_step())
            opt.register_step_post_hook(lambda *_: self._after_step())

    def _before_step(self) -> None:
        self.bytes["params"] = storage_bytes(self.params)
        self.bytes["grads"] = storage_bytes(p.grad for p in self.params)

    def _after_step(self) -> None:
        self.bytes["optimizer"] = sum(optimizer_state_bytes(o) for o in self.optimizers)


class SavedActivations:
    """Peak bytes of tensors saved for backward while `track()` is active (see module docstring)."""

    def __init__(self, model_parts: list[nn.Module]):
        self.model_parts = model_parts
        self.live: dict[int, list] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def _is_parameter(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter):
            return True
        # FSDP's gathered weights are the parameters registered while their block runs; TP's are
        # DTensors whose views lose the Parameter type: compare storages with the current ones.
        ptr = _ptr(t)
        return ptr is None or any(_ptr(p) == ptr for part in self.model_parts for p in part.parameters())

    def _pack(self, t: torch.Tensor):
        if self._is_parameter(t):
            return t, None
        storage = _local(t).untyped_storage()
        ptr = storage.data_ptr()
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return t, ptr

    def _unpack(self, packed):
        t, ptr = packed
        if ptr is not None and ptr in self.live:
            entry = self.live[ptr]
            entry[0] -= 1
            if entry[0] == 0:
                self.current -= entry[1]
                del self.live[ptr]
        return t

    def reset(self) -> None:
        self.peak = self.current

    @contextmanager
    def track(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
