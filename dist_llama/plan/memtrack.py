"""Live tensor bytes of one rank through a training step, by kind, and the moment of the peak.

A TorchDispatchMode sees every tensor an operator returns; each distinct storage is counted from
then until it is freed (its weak reference dies, or FSDP resizes it to 0 with
`UntypedStorage.resize_`, which bypasses dispatch and is patched while tracking). The same tracker
runs over real tensors (gloo ranks: CPU tensors have no `max_memory_allocated`, so this is its
twin) and over fake ones (plan/memory.py: the real step on a fake process group), so the two
reports count the same way. Modelled on torch.distributed._tools.mem_tracker.MemTracker, which
cannot follow a model called once per micro-batch and labels FSDP2's gradients as temporaries.

Kinds: parameters as stored (what the rank keeps between steps), gathered weights (FSDP's
unsharded copies and autocast's compute-dtype casts of them), gradients (whatever `.grad` of a
parameter holds), optimizer state, activations (made during forward) and temporaries (made during
backward, the optimizer step or outside any of them: activation gradients, recomputation under
activation checkpointing, communication buffers, the batch). A storage's kind is set when it is
made and corrected when the peak is recorded (gradients, optimizer state and unsharded weights are
recognised by what holds them then); bytes are storage sizes, without allocator rounding or caching.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import wraps

import torch
import torch.distributed._tools.fake_collectives  # noqa: F401  (fake impls of c10d ops under FakeTensorMode)
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

KINDS = ("params", "gathered", "grads", "optimizer", "activations", "temporaries")


@dataclass
class MemoryReport:
    """Peak live bytes of one rank and what they were at that moment."""

    peak: int = 0
    """Highest live total over the tracked steps."""
    by_kind: dict = field(default_factory=dict)
    """The peak split into KINDS."""
    moment: dict = field(default_factory=dict)
    """When it happened: step, phase (forward, backward, optimizer, other), micro-batch, module."""

    def to_dict(self) -> dict:
        return {"peak": self.peak, "by_kind": dict(self.by_kind), "moment": dict(self.moment)}


class MemoryTracker(TorchDispatchMode):
    """Use as a context manager around the steps; `register` the model parts, optimizers and batch
    made before it first (their storages would not be seen otherwise)."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        super().__init__()
        self.parts, self.optimizers = parts, optimizers
        self._info = WeakIdKeyDictionary()  # storage -> [bytes, kind, weakref]
        self.current = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.report = MemoryReport()
        self.step = 0
        self.micro_batch = -1
        self._in_optimizer = False
        self._modules: list[str] = []
        self._names = {m: name for part in parts for name, m in part.named_modules()}
        self._handles = []
        self._orig_resize = torch.UntypedStorage.resize_
        self._orig_meta_prop = ShardingPropagator._propagate_tensor_meta_non_cached
        self._in_meta_prop = 0

    # --- bookkeeping ------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, kind: str) -> None:
        entry = self._info.get(st)
        if entry is not None:
            self._resized(entry, st.nbytes())
            return
        entry = [0, kind, None]
        entry[2] = weakref.ref(st, lambda _, e=entry: self._resized(e, 0))
        self._info[st] = entry
        self._resized(entry, st.nbytes())

    def _resized(self, entry: list, nbytes: int) -> None:
        delta, entry[0] = nbytes - entry[0], nbytes
        self.current[entry[1]] += delta
        self.total += delta

    def _relabel(self, t: torch.Tensor, kind: str) -> None:
        for st in get_untyped_storages(t):
            entry = self._info.get(st)
            if entry is None:
                self._add(st, kind)
            elif entry[1] != kind:
                self.current[entry[1]] -= entry[0]
                self.current[kind] += entry[0]
                entry[1] = kind

    def register(self, *tensors: torch.Tensor, kind: str = "temporaries") -> None:
        """Count tensors made before tracking (the batch); the parts and optimizers are counted
        on entry."""
        for t in tensors:
            self._relabel(t, kind)

    def _stored_params(self):
        return [p for part in self.parts for p in part.parameters()]

    def _classify(self) -> None:
        """Correct kinds from what holds each storage now: gradients, optimizer state, and
        weights a module holds other than the stored parameters (FSDP's unsharded ones)."""
        for p in self._stored_params():
            if p.grad is not None:
                self._relabel(p.grad, "grads")
        for opt in self.optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self._relabel(v, "optimizer")
        for p in self._stored_params():
            for st in get_untyped_storages(p):
                entry = self._info.get(st)
                if entry is not None and entry[1] not in ("params", "gathered"):
                    self._relabel(p, "gathered")

    def _phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return "forward" if self._modules else "other"

    def _maybe_peak(self) -> None:
        if self.total <= self.report.peak:
            return
        phase = self._phase()
        if phase in ("backward", "optimizer"):
            self._classify()
        node = torch._C._current_autograd_node() if phase == "backward" else None
        self.report = MemoryReport(self.total, dict(self.current), {
            "step": self.step, "phase": phase, "micro_batch": self.micro_batch,
            "module": self._modules[-1] if self._modules else (node.name() if node is not None else "")})

    # --- hooks --------------------------------------------------------------------------------
    def _pre_forward(self, module, args):
        name = self._names.get(module)
        if name is not None:
            if module is self.parts[0] and torch._C._current_graph_task_id() == -1:
                self.micro_batch += 1
            self._modules.append(name or "model")

    def _post_forward(self, module, args, output):
        if self._names.get(module) is not None and self._modules:
            self._modules.pop()

    def _opt_pre(self, *_):
        self._in_optimizer = True

    def _opt_post(self, optimizer, *_):
        self._in_optimizer = False
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self._relabel(v, "optimizer")

    def next_step(self) -> None:
        """Mark the start of the next optimizer step (for the moment of the peak)."""
        self.step += 1
        self.micro_batch = -1

    def __enter__(self):
        self._fake_on_entry = active_fake_mode()
        for p in self._stored_params():
            self._relabel(p, "params")
            if p.grad is not None:
                self._relabel(p.grad, "grads")
        for opt in self.optimizers:
            self._opt_post(opt)
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre_forward),
                         nn.modules.module.register_module_forward_hook(self._post_forward),
                         register_optimizer_step_pre_hook(self._opt_pre),
                         register_optimizer_step_post_hook(self._opt_post)]
        tracker, orig = self, self._orig_resize

        @wraps(orig)
        def resize_(st, size):
            result = orig(st, size)
            entry = tracker._info.get(st)
            if entry is not None:
                tracker._resized(entry, st.nbytes())
                tracker._maybe_peak()
            return result

        torch.UntypedStorage.resize_ = resize_

        # DTensor learns an op's output shape by running it on fake global-shape tensors, in
        # the active fake mode if there is one (the dry run's), else in a fake mode of its own:
        # not memory of this rank, in either case.
        @wraps(self._orig_meta_prop)
        def propagate_tensor_meta(prop, op_schema):
            tracker._in_meta_prop += 1
            try:
                return tracker._orig_meta_prop(prop, op_schema)
            finally:
                tracker._in_meta_prop -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate_tensor_meta
        self._maybe_peak()
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._orig_resize
        ShardingPropagator._propagate_tensor_meta_non_cached = self._orig_meta_prop
        for h in self._handles:
            h.remove()
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode():
            res = args[0]  # the fake wait returns a new tensor; the real one returns its input
        else:
            res = func(*args, **(kwargs or {}))
        # Ops of another fake mode than the one tracked (none, or the dry run's) are not memory.
        if not self._in_meta_prop and active_fake_mode() is self._fake_on_entry:
            kind = ("temporaries" if self._in_optimizer or self._phase() != "forward" else "activations")
            if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) and any(
                    self._info.get(st, (0, ""))[1] in ("params", "gathered") for st in get_untyped_storages(args[0])):
                kind = "gathered"  # autocast's compute-dtype copy of a weight
            # Per op, so without pytree's rebuilding of the output (a 405B stage is ~10^5 ops).
            for t in (res,) if isinstance(res, torch.Tensor) else tree_leaves(res):
                if isinstance(t, torch.Tensor):
                    if is_traceable_wrapper_subclass(t):
                        for st in get_untyped_storages(t):
                            self._add(st, kind)
                    else:
                        self._add(t.untyped_storage(), kind)
            self._maybe_peak()
        return res
