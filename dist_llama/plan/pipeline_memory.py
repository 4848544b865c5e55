"""One pipeline rank's memory through its schedule, action by action: what the closed-form estimate
(plan/estimate.py) holds at the peak of a pipelined rank.

The peak of a pipeline rank is not always where the most micro-batches are in flight: under the
multi-stage runtime every send keeps its tensor until the end of the step (the runtime waits on
them only then, and NCCL stashes the tensor until `wait()`), and torch's stages keep FSDP's whole
gradients from a stage's first backward to its last; both grow as the backwards go on while the
activations shrink. So the rank's actions are replayed in torch's own order (its 1F1B and GPipe
orders written out; the interleaved ones from the schedule classes themselves) and the sum taken at
every backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


def rank_actions(schedule: str, pp: int, virtual: int, n_micro: int, pp_rank: int) -> list[tuple[str, int, int]]:
    """(kind, stage, micro-batch) of every compute action of this pipeline rank, in order; kind F
    (forward), B (backward; zero bubble's input-gradient half) or W (zero bubble's weight half)."""
    if virtual == 1:
        forward = [("F", pp_rank, mb) for mb in range(n_micro)]
        backward = [("B", pp_rank, mb) for mb in range(n_micro)]
        if schedule == "gpipe":
            return forward + backward
        # torch's Schedule1F1B: pp - rank forwards, then one backward and one forward at a time.
        warmup = min(n_micro, pp - pp_rank)
        actions = forward[:warmup]
        for mb in range(n_micro):
            actions.append(backward[mb])
            if warmup + mb < n_micro:
                actions.append(forward[warmup + mb])
        return actions
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble

    cls = ScheduleInterleavedZeroBubble if schedule == "interleaved_zb" else ScheduleInterleaved1F1B
    rounds = max(1, n_micro // pp)
    # The schedule's own ordering, without building stages: it reads only these attributes.
    shape = SimpleNamespace(n_local_stages=virtual, pp_group_size=pp, _n_microbatches=n_micro,
                            number_of_rounds=rounds, microbatches_per_round=n_micro // rounds)
    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "B", "BACKWARD_WEIGHT": "W"}
    actions = []
    for action in cls._calculate_single_rank_operations(shape, pp_rank):
        if action is not None:
            kind = str(action.computation_type).split(".")[-1]
            actions.append((kinds[kind], action.stage_index, action.microbatch_index))
    return actions


@dataclass
class PipelinePeak:
    """What one pipeline rank holds at its peak (a backward), by kind, bytes."""

    activations: float
    """Saved activations (and kept stage outputs) of the micro-batches forwarded, not yet backwarded."""
    held_sends: float
    """Tensors sent after a backward (stage outputs, input gradients) that the runtime keeps until the step ends."""
    grads: float
    """Gradients at that moment: whole ones of the stages that defer their reduction, and the shards of those done."""
    in_flight: float
    """Micro-batches in flight then, in whole-rank units (stages in flight / stages per rank)."""
    working: float
    """What that backward makes besides (its stage's `working`)."""
    stage: int
    """The stage whose backward it is."""
    gathered: float = 0.0
    """Weights unsharded then, when the runtime unshards stages itself (`unsharded` given)."""

    @property
    def total(self) -> float:
        return self.activations + self.held_sends + self.grads + self.working + self.gathered


def pipeline_peak(actions: list[tuple[str, int, int]], saved: dict[int, float], sent: dict[int, float],
                  whole_grads: dict[int, float], shard_grads: dict[int, float], working: dict[int, float],
                  n_micro: int, held_until_end: bool, unsharded: dict[int, float] | None = None,
                  active_stages: int = 3, pending: dict[int, float] | None = None,
                  blocks_gathered: float = 0.0) -> PipelinePeak:
    """Replay `actions` (rank_actions) and return the moment, at the start of a backward (or of
    zero bubble's weight half), with the most bytes. Per stage of the rank: `saved` bytes one
    micro-batch's forward keeps for its backward; `sent` bytes each backward sends and,
    `held_until_end`, keeps (its stage output, whose send completes only then, and its input
    gradient); `whole_grads` the gradients it holds whole from its first backward to its last,
    when `shard_grads` replace them (0 when the engine reduces at once; those gradients are then
    the model states'); `working` what its backward makes besides (the loss's on the last stage,
    the embedding's gradient on the first).
    `unsharded`: each stage's weights when gathered, for a runtime that unshards the stage in use
    and the next ones, `active_stages` at a time, and reshards the rest (torch's multi-stage
    runtime under FSDP: _add_unshard_reshard, max_active_stages=3). The stage in use counts at
    most `blocks_gathered`: FSDP reshards its blocks after each use, so unless the window just
    fetched it, it is gathered block by block (on the 70B's ten-block stages the fake step holds
    the other two stages and a block or two of the current one). `pending`, under zero bubble:
    what a stage's input-gradient half (B) keeps for its weight half (W) besides the saved
    activations: torch's stage_backward_input stashes the gradient of every node where a weight
    meets the input's path (each matmul's and norm weight's output) until stage_backward_weight."""
    pending = pending or {}
    activations = held = grads = 0.0
    in_flight, started = set(), set()
    best = PipelinePeak(0.0, 0.0, 0.0, 0.0, 0.0, -1)
    stages = len(saved)
    upcoming = _upcoming_stages(actions, active_stages) if unsharded is not None else None
    # Zero bubble splits a backward in two: the input-gradient half (B here) sends on, and the
    # matmuls' saved inputs stay for the weight-gradient half (W), which frees them.
    split = any(kind == "W" for kind, _, _ in actions)
    for i, (kind, stage, mb) in enumerate(actions):
        if kind == "F":
            activations += saved[stage]
            in_flight.add((stage, mb))
            continue
        if kind == "B" and stage not in started:
            started.add(stage)
            grads += whole_grads[stage]
        # A B's peak adds its stage's working set; a W starts with the most held (it frees after).
        work = working[stage] if kind == "B" else 0.0
        gathered = 0.0
        if upcoming is not None:
            gathered = (sum(unsharded[s] for s in upcoming[i] if s != stage)
                        + min(unsharded[stage], blocks_gathered))
        if activations + held + grads + work + gathered > best.total:
            best = PipelinePeak(activations, held, grads, len(in_flight) / stages, work, stage, gathered)
        if kind == "W":
            activations -= saved[stage] + pending.get(stage, 0.0)
            in_flight.discard((stage, mb))
            continue
        if split:
            activations += pending.get(stage, 0.0)
        else:
            activations -= saved[stage]
            in_flight.discard((stage, mb))
        if held_until_end:
            held += sent[stage]
        if mb == n_micro - 1:
            grads += shard_grads[stage] - whole_grads[stage]
    return best


def _upcoming_stages(actions: list[tuple[str, int, int]], count: int) -> list[tuple[int, ...]]:
    """For each action, the first `count` distinct stages from it on (one pass from the end)."""
    out, ahead = [], ()
    for _, stage, _ in reversed(actions):
        ahead = (stage, *[s for s in ahead if s != stage])[:count]
        out.append(ahead)
    return out[::-1]
