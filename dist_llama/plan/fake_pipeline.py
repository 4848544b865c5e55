"""What lets the real pipeline schedule run on one rank of a fake process group.

torch.distributed.pipelining learns the tensors crossing stage boundaries at the first step: the
stages vote on static vs dynamic metadata (reading the vote with `.item()`) and send each other
pickled tensor metadata. On a fake process group nothing arrives, and fake tensors have no values
to vote with. The one thing that crosses a boundary in this model is the hidden state
[micro-batch, local sequence, dim] (the local slice under sequence parallelism; its gradient the
same), so this rank answers its own metadata requests with it; every
other part of the schedule (its order of forwards and backwards, its buffers) runs as in training.

A fake process group's send completes at once and keeps nothing. NCCL keeps a tensor it sends
(stashed for the caching allocator) until the send's `wait()`, and the schedules wait late: 1F1B
at its next forward, the interleaved runtime only at the end of the step, so every stage output
and input gradient it sends stays allocated until then. The sends here keep their tensors until
waited, as NCCL's do (gloo keeps them longer, until the `Work` object is dropped).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules, stage
from torch.distributed.pipelining._utils import (_derive_grad_metas, _StageBackwardMeta, _StageForwardMeta,
                                                 extract_tensor_metas)


def hidden_state(rows: int, seq_local: int, dim: int, dtype: torch.dtype, tp: int) -> torch.Tensor:
    """An example of the tensor one stage hands the next (make it under the fake mode): the local
    [rows, sequence slice, dim] tensor, cut along the sequence by sequence parallelism. It requires
    grad as a stage's output does: the next stage's receive buffers copy that flag, and without it
    no stage computes (or sends) the gradient of its input."""
    return torch.empty(rows, seq_local // tp, dim, dtype=dtype, requires_grad=True)


@contextlib.contextmanager
def local_stage_metadata(example: torch.Tensor):
    """Patch the schedule's warm-up and the stages' metadata exchange while the fake step runs."""
    metas = extract_tensor_metas((example,))
    grad_metas = _derive_grad_metas(metas)  # the gradient coming back: same shape, no grad of its own

    def warmup(self, stages, has_backward, p2p_done):
        for s in stages:
            s._inference_mode = stage.InferenceMode.DYNAMIC

    def recv_meta(self, src_stage):
        return _StageForwardMeta(metas) if src_stage < self.stage_index else _StageBackwardMeta(grad_metas)

    batch_p2p = schedules._batch_p2p

    def batch_p2p_holding_sends(p2p_ops, desc=None):
        sent = [op.tensor for op in p2p_ops if op.op is dist.isend]
        return [_HeldUntilWait(work, sent) for work in batch_p2p(p2p_ops, desc)]

    saved = (schedules._PipelineSchedule._warmup_p2p, stage.PipelineStage._recv_meta,
             stage.PipelineStage._send_meta, schedules._batch_p2p)
    schedules._PipelineSchedule._warmup_p2p = warmup
    stage.PipelineStage._recv_meta = recv_meta
    stage.PipelineStage._send_meta = lambda self, meta, dst_stage: None
    schedules._batch_p2p = batch_p2p_holding_sends
    try:
        yield
    finally:
        (schedules._PipelineSchedule._warmup_p2p, stage.PipelineStage._recv_meta,
         stage.PipelineStage._send_meta, schedules._batch_p2p) = saved


class _HeldUntilWait:
    """A fake group's Work that keeps the tensors its batch sends until wait(), as NCCL does."""

    def __init__(self, work, sent: list):
        self.work, self.sent = work, sent

    def wait(self, *args, **kwargs):
        self.sent = None
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.work, name)
