"""Pipeline parallelism with torch.distributed.pipelining: cut the model into stages, build a schedule.

Stages are consecutive runs of `model.layers`; the first stage keeps `tok_embeddings`, the last keeps
`norm` and `output`. With V virtual stages per rank the assignment is looped: rank r holds stages
r, r + pp, r + 2·pp, ... (what the interleaved schedules expect). Document ids and positions are
passed to `schedule.step` as keyword arguments, which the schedule splits into micro-batches and
hands to every stage, so each stage can build its own attention mask.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

# The schedule names (and what each needs) are defined with the configuration, which validates
# them without importing torch; SCHEDULES and schedule_constraint are also known from this module.
from dist_llama.config.names import MULTI_STAGE, SCHEDULES, schedule_constraint  # noqa: F401

_SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
}


def layers_per_stage(n_layers: int, n_stages: int, lighter_ends: bool = False,
                     explicit: Optional[Sequence[int]] = None) -> list[int]:
    """How many transformer layers each stage gets.

    Evenly spread by default (earlier stages take the remainder). With `lighter_ends` the first and
    last stages count their embedding / output projection as one layer's worth of work, so they
    get one layer fewer than the middle stages (Llama 3, §3.3.2).
    """
    if explicit is not None:
        return list(explicit)
    if not lighter_ends or n_stages == 1:
        return [n_layers // n_stages + (1 if s < n_layers % n_stages else 0) for s in range(n_stages)]
    base, remainder = divmod(n_layers + 2, n_stages)
    counts = [base] * n_stages
    for s in (list(range(1, n_stages - 1)) + [0, n_stages - 1])[:remainder]:  # middle stages first
        counts[s] += 1
    counts[0] -= 1
    counts[-1] -= 1
    return counts


def stage_ids_for_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    return [pp_rank + v * pp for v in range(virtual_stages)]


def split_model(model: nn.Module, stage_ids: Sequence[int], counts: Sequence[int]) -> list[nn.Module]:
    """One pruned copy of `model` per stage in `stage_ids`; parameter names (FQNs) are unchanged,
    so checkpoints move between pipeline layouts."""
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    n_stages = len(counts)
    parts = []
    for s in stage_ids:
        keep = {str(i) for i in range(starts[s], starts[s + 1])}
        dropped = [m for name, m in model.layers.items() if name not in keep]
        if s != 0:
            dropped.append(model.tok_embeddings)
        if s != n_stages - 1:
            dropped += [model.norm, model.output, model.score]
        # The modules this stage drops are copied as None (a deepcopy memo entry) instead of
        # copied and deleted: a stage of a 126-layer model copies its own layers only.
        part = copy.deepcopy(model, memo={id(m): None for m in dropped})
        for name in [name for name, m in part.layers.items() if m is None]:
            del part.layers[name]
        parts.append(part)
    return parts


def build_stages(parts: Sequence[nn.Module], stage_ids: Sequence[int], n_stages: int, pp_mesh: DeviceMesh,
                 device: torch.device) -> list[PipelineStage]:
    group = pp_mesh.get_group()
    return [PipelineStage(part, stage_index=s, num_stages=n_stages, device=device, group=group)
            for part, s in zip(parts, stage_ids)]


def build_schedule(name: str, stages: list[PipelineStage], n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The loss function already carries the whole-batch scaling, so the schedule must not divide
    gradients by the micro-batch count again (scale_grads=False)."""
    cls = _SCHEDULE_CLASSES[name]
    if name in MULTI_STAGE:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    (stage,) = stages
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
