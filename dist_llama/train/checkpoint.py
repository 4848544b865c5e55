"""Checkpoints with DCP: sharded model + optimizer, plus the small trainer state and per-rank RNG.

Layout of <run_dir>/checkpoints/step-XXXXXXXX/:
  .metadata, __*.distcp   DCP files: model and optimizer keyed by parameter name, resharded to any
                          layout (data, tensor, context, pipeline parallel) on load
  trainer_state.json      step, tokens, LR schedule, data sampler position (global, so any dp degree
                          resumes exactly), wandb id, the layout it was saved under
  rng/rank-XXXXX.pt       each rank's RNG state (tensors only, loaded with weights_only=True)

A save is written into a hidden temporary directory and renamed once every rank has finished, so a
directory named step-* is always complete; `latest()` also requires trainer_state.json, written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _state_dict(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Model and optimizer state keyed by parameter names (FQNs), merged over this rank's pipeline
    stages: the same keys whatever the layout, which is what lets DCP reshard across layouts."""
    model_sd, optim_sd = {}, {}
    for part, optimizer in zip(parts, optimizers):
        m, o = get_state_dict(part, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd}


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, device: torch.device):
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.device = device
        self.rank = dist.get_rank()

    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        dcp.save(_state_dict(parts, optimizers), checkpoint_id=str(tmp))
        torch.save(_rng_state(self.device), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._apply_retention()
        dist.barrier()
        return final

    def _apply_retention(self) -> None:
        complete = self.list_complete()
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def list_complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file() and (p / ".metadata").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, as rank 0 sees it (every rank gets the same answer)."""
        choice = [None]
        if self.rank == 0:
            complete = self.list_complete()
            choice[0] = str(complete[-1]) if complete else None
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def load(self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[dict, bool]:
        """Load into the current layout (DCP reshards). Returns (trainer state, whether RNG was restored)."""
        state = _state_dict(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for part, optimizer in zip(parts, optimizers):
            # Each part takes its own keys from the merged dicts (hence strict=False).
            set_state_dict(part, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))
        rng_file = path / "rng" / f"rank-{self.rank:05d}.pt"
        rng_restored = rng_file.is_file()
        if rng_restored:
            _set_rng_state(torch.load(rng_file, weights_only=True), self.device)
        return json.loads((path / STATE_FILE).read_text()), rng_restored


def gather_full_state_dict(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on every rank, gathered over every parallel
    dimension (for export and for comparing layouts). Costs a full copy per rank: small models only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    local = {}
    for part in parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        local.update({k: v.detach().cpu() for k, v in sd.items()})
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for sd in gathered for k, v in sd.items()}
