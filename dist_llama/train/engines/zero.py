"""DeepSpeed ZeRO as the data-parallel engine (`parallel.engine=deepspeed`), under dist_llama's loop.

DeepSpeed does what ZeRO is about: it shards the optimizer states (stage 1), the gradients too (2)
and the parameters too (3) over the data-parallel ranks, reduces the gradients, clips them to the
global norm and runs the update. dist_llama keeps everything else: the model, the data, the
per-token loss, the LR schedule (its own LambdaLR on the torch AdamW that DeepSpeed wraps), health
checks and recovery, and the checkpoint commit (manifest, atomic rename, retention).

The loop needs two things DeepSpeed's `step()` does in one go kept apart: the gradient norm must be
known BEFORE the update (the ranks agree on skip / retry / rollback first), and an update must be
droppable. `grad_norm()` asks the ZeRO optimizer for the norm with the very function its `step()`
clips with; `discard()` runs DeepSpeed's own `step()` with the torch optimizer's update switched off,
so DeepSpeed releases its gradient buffers however the stage keeps them, and nothing else changes.
Both are covered by tests against FSDP (tests/test_zero.py); DeepSpeed is pinned below 0.20 for them.

DeepSpeed is imported only when this engine is chosen (about 4 s), in `wrap`. On CPU it runs with
DS_ACCELERATOR=cpu over the job's gloo group, with torch's AdamW and the shared-memory comm op off,
so nothing is compiled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from dist_llama.checkpoint_format.deepspeed import safe_load
from dist_llama.checkpoint_format.integrity import CheckpointError, Digests, HashingStream, sha256_file
from dist_llama.parallel.dims import Meshes, ParallelDims
from dist_llama.train.compute_clock import Unmeasured

CHECKPOINT_TAG = "deepspeed"
"""DeepSpeed writes its files into <checkpoint dir>/deepspeed/."""


def import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    import deepspeed

    # Else DeepSpeed's CPU accelerator compiles a shared-memory all-reduce at init (~90 s here);
    # gloo does the collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls two collectives torch 2.13 deprecated; torch warns on every step.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


def ds_config(cfg, dp: int, n_micro: int, dtype: torch.dtype) -> dict:
    """DeepSpeed's config for dist_llama's: same batch, accumulation, clip and precision."""
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.global_batch_size // dp // n_micro,
        "gradient_accumulation_steps": n_micro,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # bf16 weights with fp32 master weights in the optimizer; gradients reduced in fp32, as
        # FSDP's mixed-precision policy does.
        "bf16": {"enabled": dtype == torch.bfloat16},
        "communication_data_type": "fp32",
        # torch's AdamW with dist_llama's hyperparameters, also when offloaded (DeepSpeed's CPU Adam
        # is a C++ op to compile).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


class ZeroEngine:
    """A DeepSpeedEngine around the model and the torch optimizer (the Engine interface of
    dist_llama.train.engines.base). After `wrap`, parts == [the DeepSpeedEngine]: call it like the
    model (it gathers ZeRO-3 parameters as needed)."""

    format = "deepspeed"
    required: tuple[str, ...] = ()
    autocast_dtype = None  # DeepSpeed's bf16 mode casts the weights itself

    def __init__(self, config: dict, dims: ParallelDims, meshes: Meshes, device: torch.device):
        self.config = config
        self.device = device
        self.stage = config["zero_optimization"]["stage"]
        # ZeRO-1/2 shard optimizer state (and gradients) but every dp rank holds the whole model,
        # all-gathered after each update; ZeRO-3 shards the parameters.
        self.replica_group = meshes.dp.get_group() if self.stage < 3 and dims.dp > 1 else None
        self.compute_clock = Unmeasured("DeepSpeed ZeRO: its collectives are DeepSpeed's own and not timed")
        self.parts: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.engine = None

    def shard(self, part: nn.Module) -> None:
        pass  # DeepSpeed partitions at initialize (wrap)

    def unwrapped(self, part: nn.Module) -> nn.Module:
        return part.module

    def wrap(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        (model,), (optimizer,) = parts, optimizers
        deepspeed = import_deepspeed(self.device)
        # The process group exists already (init_distributed); DeepSpeed uses it. It still asserts
        # LOCAL_RANK, which only a launcher sets: one process without torchrun is local rank 0.
        os.environ.setdefault("LOCAL_RANK", "0")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                               dist_init_required=False)
        self.engine.checkpoint_engine = _hashing_checkpoint_engine()
        # The torch optimizer inside DeepSpeed's ZeRO optimizer (its param groups hold the fp32
        # shards this rank updates); the LR scheduler steps it.
        self.parts, self.optimizers = [self.engine], [optimizer]

    # --- one step ---------------------------------------------------------------------------------
    def grad_sync(self, part: nn.Module, last_micro_batch: bool) -> ContextManager:
        """Reduce (and, at step(), update) after the last micro-batch."""
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already scaled for the global per-token mean (the step strategy's scale):
        # DeepSpeed must not divide it again by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of this step's gradients over all ranks, before clipping, by the function
        the ZeRO optimizer's step() clips with (non-finite gradients give inf). Collective."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        opt = self.engine.optimizer
        norm = combine_grad_norm_groups(opt._get_norm_groups()) if self.stage == 3 else opt.scaled_global_norm()
        return (norm / opt.loss_scale).float()

    def step(self) -> None:
        """DeepSpeed clips to the global norm, updates through the torch optimizer and clears its own
        gradient buffers (the optimizer's zero_grad would drop the ones ZeRO-Offload keeps)."""
        self.engine.step()

    def discard(self) -> None:
        """Drop this step's gradients without an update (skip, retry, rollback)."""
        (optimizer,) = self.optimizers
        optimizer.step = lambda closure=None: None  # shadows the class's step for this call
        try:
            self.engine.step()
        finally:
            del optimizer.step

    def poison_gradients(self) -> None:
        """Make this step's gradients NaN where ZeRO keeps them (fault injection, like a real overflow)."""
        from deepspeed.utils import safe_set_full_grad

        param = next(p for p in self.engine.module.parameters() if p.requires_grad)
        safe_set_full_grad(param, torch.full(getattr(param, "ds_shape", param.shape), float("nan"),
                                             device=param.device))

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self, directory: Path, on_written: Callable[[Digests], None], group, stager=None) -> Future:
        """Write this rank's part of the engine state into directory/deepspeed/, synchronously, each
        file hashed as written; then a barrier on `group`, so every rank's digest list is complete
        when the future is. A failure is the future's (after every collective, so no rank hangs)."""
        done: Future = Future()
        try:
            on_written(self._save(directory))
            done.set_result(None)
        except Exception as e:  # noqa: BLE001 (becomes checkpoint_failed, like a failed DCP write)
            done.set_exception(e)
        dist.barrier(group=group)
        return done

    def _save(self, directory: Path) -> Digests:
        ckpt = self.engine.checkpoint_engine
        ckpt.written, ckpt.errors = {}, []
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)
        if ckpt.errors:
            path, e = ckpt.errors[0]
            if isinstance(e, OSError) and e.errno:
                raise OSError(e.errno, e.strerror, path)
            raise OSError(f"DeepSpeed checkpoint write failed: {path}: {type(e).__name__}: {e}")
        written = {Path(path).relative_to(directory).as_posix(): digest for path, digest in ckpt.written.items()}
        if self.engine.global_rank == 0:  # DeepSpeed's rank 0 also copies its zero_to_fp32.py scripts there
            for script in Path(directory).glob("*.py"):
                written[script.name] = (script.stat().st_size, sha256_file(script))
        return written

    def load(self, directory: Path, manifest: dict) -> None:
        """Load weights and optimizer state saved by `save` under the same data-parallel degree.
        The caller has checked every file against the manifest's sha256 (Checkpointer.latest)."""
        world_size = dist.get_world_size()
        if manifest["world_size"] != world_size:
            raise CheckpointError(f"{directory} was saved by DeepSpeed on {manifest['world_size']} ranks; its ZeRO "
                                  f"shards load on as many ranks only (this run has {world_size})")
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory / CHECKPOINT_TAG}")


def _hashing_checkpoint_engine():
    """DeepSpeed's torch.save / torch.load checkpoint engine, changed in two ways:

    - save: every file is written through a hashing stream, so the manifest gets the sha256 of the
      bytes as written (as DCP files get), and fsynced; a failure is recorded, not raised, so this
      rank still reaches DeepSpeed's barriers.
    - load: weights_only=True. DeepSpeed's own engine unpickles with weights_only=False, which runs
      arbitrary code from the file; these files hold tensors and plain containers plus three
      DeepSpeed types, allowed here by name.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class HashingCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__()
            self.written: dict[str, tuple[int, str]] = {}
            self.errors: list[tuple[str, Exception]] = []

        def save(self, state_dict, path: str) -> None:
            stream = None
            try:
                with open(path, "wb") as f:
                    stream = HashingStream(f)
                    torch.save(state_dict, stream)
                    f.flush()
                    os.fsync(f.fileno())
                self.written[path] = (stream.size, stream.hexdigest())
            except Exception as e:  # noqa: BLE001 (reported by ZeroEngine.save after the collectives)
                # torch.save reports a failed write as its own RuntimeError: keep the OSError under it.
                self.errors.append((path, stream.error if stream is not None and stream.error else e))

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return HashingCheckpointEngine()
