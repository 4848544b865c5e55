"""Run-directory logs (metrics.jsonl, events.jsonl), the console line, wandb and TensorBoard.

Only rank 0 writes metrics; every rank may record events (each carries its rank).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

WANDB_ID_FILE = "wandb_id.txt"
TENSORBOARD_DIR = "tensorboard"


def peak_memory_gib(device, reserved: bool = False) -> float:
    """Peak memory: CUDA allocator peak on GPU (tensors allocated, or with `reserved` the memory the
    caching allocator held, which is what torchtitan reports), peak RSS of this process on CPU."""
    if device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
        return peak(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _append_jsonl(path: Path, record: dict) -> None:
    """One line per record. A torn last line (a full disk, a crash mid-write) is closed off first so
    the new record stays readable; a failed write is reported once and never stops training."""
    try:
        with open(path, "a+b") as f:
            f.seek(0, 2)
            torn = False
            if f.tell():
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + (json.dumps(record) + "\n").encode())
    except OSError as exc:
        print(f"dist_llama: could not append to {path}: {exc}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records of an append-only log, skipping torn or garbled lines."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, logging_cfg, config_dict: dict):
        self.run_dir = run_dir
        self.rank = rank
        self.total_steps = total_steps
        self.console = logging_cfg.console and rank == 0
        self.wandb = None
        self.tensorboard = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            mode = os.environ.get("WANDB_MODE", logging_cfg.wandb_mode)
            if mode != "disabled":
                self.wandb = _init_wandb(run_dir, mode, logging_cfg.wandb_project, config_dict)
            if getattr(logging_cfg, "tensorboard", False):
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb.id if self.wandb is not None else None

    def log_step(self, record: dict[str, Any], eta_s: float) -> None:
        if self.rank != 0:
            return
        _append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.wandb is not None:
            self.wandb.log(_wandb_fields(record), step=record["step"])
        if self.tensorboard is not None:  # wandb's fields, those that are numbers
            for name, value in _wandb_fields(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(name, value, global_step=record["step"])
            self.tensorboard.flush()  # a killed job keeps what it logged
        if self.console:
            mem = f"{record['mem_gib']:.2f} GiB" if "mem_gib" in record else "-"
            val = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"step {record['step']:>6}/{self.total_steps}  loss {record['loss']:.4f}{val}  "
                  f"lr {record['lr']:.3e}  gnorm {record['grad_norm']:.3f}  "
                  f"tok/s {record['tokens_per_sec']:,.0f}  mfu {100 * record['mfu']:.2f}%  "
                  f"mem {mem}  eta {_fmt_duration(eta_s)}", flush=True)

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """An entry in events.jsonl: what happened, at which step, when, on which rank."""
        all_ranks = fields.pop("all_ranks", False)
        record = {"event": kind, "step": step, "time": time.time(), "rank": self.rank, **fields}
        if self.rank == 0 or all_ranks:
            _append_jsonl(self.run_dir / "events.jsonl", record)
        if self.console:
            print(f"[event] {kind} step={step} " + " ".join(f"{k}={v}" for k, v in fields.items()),
                  file=sys.stderr, flush=True)

    def fault_fired(self, kind: str, step: int, **fields: Any) -> None:
        """An injected fault fired on this rank (recorded by every rank: faults are rank-specific)."""
        self.event("fault_injected", step, fault=kind, all_ranks=True, **fields)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _wandb_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its step; the per-source validation losses as val_loss/<source>, one
    chart each in wandb's val_loss section."""
    fields = {k: v for k, v in record.items() if k not in ("step", "val_loss_by_source")}
    for name, value in record.get("val_loss_by_source", {}).items():
        fields[f"val_loss/{name}"] = value
    return fields


def _init_wandb(run_dir: Path, mode: str, project: str, config_dict: dict):
    """The run id lives in the run directory, so a resumed job continues the same wandb run."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                      config=config_dict, name=run_dir.name)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
