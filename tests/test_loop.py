"""The loop against the engine and step interfaces: a recording fake engine and step strategy with
scripted losses show which calls the loop makes, in which order, for a normal step, a skipped step,
a retry and a rollback (through the real checkpointer, policy and health checks, on one gloo rank)."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from dist_llama.testing import run_ranks
from dist_llama.train.compute_clock import ComputeClock


class FakeLoader:
    """Batch i is {"id": i}; its position is the next id."""

    new_epochs, global_batch_size, seq_len, tokens_by_source = [], 1, 1, {}

    def __init__(self):
        self.next_id = 0

    def next_batch(self):
        batch = {"id": torch.tensor(self.next_id)}
        self.next_id += 1
        return batch

    def state_dict(self):
        return {"next_id": self.next_id}

    def load_state_dict(self, state):
        self.next_id = state["next_id"]


class FakeEngine:
    """Records every call; its 'weights' are the number of updates, saved and loaded as a file."""

    format, required, autocast_dtype, replica_group = "fake", ("fake.json",), None, None

    def __init__(self, calls, grad_norms, optimizer):
        self.calls, self.grad_norms = calls, grad_norms
        self.updates = 0
        self.parts, self.optimizers = [], [optimizer]
        self.lrs: list[float] = []
        """The LR of each update, as the optimizer held it when stepping."""
        self.compute_clock = ComputeClock(torch.device("cpu"))

    def grad_norm(self):
        self.calls.append("grad_norm")
        return torch.tensor(self.grad_norms.pop(0) if self.grad_norms else 1.0)

    def step(self):
        self.calls.append("step")
        self.updates += 1
        self.lrs.append(self.optimizers[0].param_groups[0]["lr"])

    def discard(self):
        self.calls.append("discard")

    def poison_gradients(self):
        self.calls.append("poison")

    def save(self, directory, on_written, group, stager):
        from dist_llama.checkpoint_format.integrity import write_durable

        self.calls.append("save")
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Like a real optimizer's state, the saved state carries the LR of the last update.
        state = {"updates": self.updates, "lr": self.optimizers[0].param_groups[0]["lr"]}
        on_written({"fake.json": write_durable(Path(directory) / "fake.json", json.dumps(state).encode())})
        done = Future()
        done.set_result(None)
        return done

    def load(self, directory, manifest):
        state = json.loads((Path(directory) / "fake.json").read_text())
        self.updates = state["updates"]
        self.optimizers[0].param_groups[0]["lr"] = state["lr"]
        self.calls.append(f"load:{self.updates}")


class FakeStep:
    """forward_backward returns the scripted loss of each call (1.0 when the script runs out)."""

    def __init__(self, calls, losses):
        self.calls, self.losses = calls, losses
        self.metrics = {}  # the objective's metrics channel: none here

    def count_tokens(self, batch):
        return torch.tensor(4)

    def forward_backward(self, batch, n_tokens):
        self.calls.append(f"fb:{int(batch['id'])}")
        return torch.tensor(self.losses.pop(0) if self.losses else 1.0)

    def global_loss(self, local, n_tokens):
        return local


def _drive(run_dir, losses, grad_norms, overrides, lrs=None):
    import torch.distributed as dist

    from dist_llama import config as config_lib
    from dist_llama.faults import FaultInjector
    from dist_llama.train.checkpoint import Checkpointer
    from dist_llama.train.step_health import StepHealth
    from dist_llama.train.watchdog import NoWatchdog
    from dist_llama.train.metrics import MetricsLogger
    from dist_llama.train.optim import build_scheduler
    from dist_llama.train.recovery import RecoveryPolicy
    from dist_llama.train.trainer import Trainer, TrainerParts

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    cfg = config_lib.to_object(config_lib.load(None, [
        f"train.run_dir={run_dir}", "train.steps=5", "checkpoint.interval=2", "checkpoint.async_save=false",
        "logging.console=false", "logging.wandb_mode=disabled", "health.spike_window=100", "health.spike_min_history=100", *overrides]))
    calls: list[str] = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    engine, step = FakeEngine(calls, grad_norms, optimizer), FakeStep(calls, losses)
    scheduler = build_scheduler(optimizer, cfg.optim, 5)
    logger = MetricsLogger(Path(run_dir), 0, 5, cfg.logging, {})
    faults = FaultInjector([], 0, Path(run_dir))
    trainer = Trainer(TrainerParts(
        cfg=cfg, device=torch.device("cpu"), engine=engine, step=step, schedulers=[scheduler], loader=FakeLoader(),
        checkpointer=Checkpointer(Path(run_dir), 3, torch.device("cpu"), async_save=False, logger=logger),
        logger=logger, health=StepHealth(cfg.health), policy=RecoveryPolicy(cfg.health), faults=faults,
        watchdog=NoWatchdog(), callbacks=[], flops_per_token=lambda seq_len: 1.0, peak_flops=1.0, world_size=1, layout={}))
    try:
        history = trainer.fit()
    finally:
        trainer.close()
        dist.destroy_process_group()
    if lrs is not None:
        lrs.extend((engine.lrs, [h["lr"] for h in history]))
    return calls, [h["step"] for h in history], engine.updates


def _run(tmp_path, losses=(), grad_norms=(), overrides=()):
    return run_ranks(_drive, 1, str(tmp_path), list(losses), list(grad_norms), list(overrides), timeout=60)[0]


NORMAL = ["fb:{i}", "grad_norm", "step"]


def _steps(*batch_ids):
    """The calls of normal steps on these batches."""
    return [c.format(i=i) for i in batch_ids for c in NORMAL]


@pytest.mark.timeout(90)
def test_normal_steps_compute_then_update_and_save_on_the_interval(tmp_path):
    calls, steps, updates = _run(tmp_path)
    assert calls == [*_steps(0, 1), "save", *_steps(2, 3), "save", *_steps(4), "save"]
    assert steps == [1, 2, 3, 4, 5] and updates == 5


@pytest.mark.timeout(90)
def test_a_skipped_step_discards_and_moves_on_to_the_next_batch(tmp_path):
    # Step 3's first attempt has an exploding gradient norm: skipped; step 3 then trains on batch 3.
    calls, steps, updates = _run(tmp_path, grad_norms=[1.0, 1.0, 1e6], overrides=["health.grad_norm_max=100"])
    assert calls[:10] == [*_steps(0, 1), "save", "fb:2", "grad_norm", "discard"]
    assert calls[10:] == [*_steps(3, 4), "save", *_steps(5), "save"]
    assert steps == [1, 2, 3, 4, 5] and updates == 5


@pytest.mark.timeout(90)
def test_a_retry_discards_and_runs_the_same_batch_again(tmp_path):
    calls, steps, updates = _run(tmp_path, losses=[1.0, 1.0, math.nan], overrides=["health.nan_action=retry"])
    assert calls[:10] == [*_steps(0, 1), "save", "fb:2", "grad_norm", "discard"]
    assert calls[10:] == [*_steps(2, 3), "save", *_steps(4), "save"]
    assert steps == [1, 2, 3, 4, 5] and updates == 5


@pytest.mark.timeout(90)
def test_a_rollback_discards_loads_the_last_checkpoint_and_recomputes(tmp_path):
    # NaN at step 4 (batch 3): back to step 2's checkpoint (2 updates); with rollback_skip_data the
    # recomputed steps 3 and 4 take the batches after the failed one.
    calls, steps, updates = _run(tmp_path, losses=[1.0, 1.0, 1.0, math.nan],
                                 overrides=["health.nan_action=rollback", "health.rollback_skip_data=true"])
    assert calls == [*_steps(0, 1), "save", *_steps(2), "fb:3", "grad_norm", "discard", "load:2",
                     *_steps(4, 5), "save", *_steps(6), "save"]
    assert steps == [1, 2, 3, 3, 4, 5] and updates == 5


def _drive_lrs(run_dir, losses, overrides):
    lrs = []
    _drive(run_dir, losses, [], overrides, lrs)
    return lrs


@pytest.mark.timeout(90)
def test_the_rollback_lr_scale_applies_from_the_first_rerun_step_and_records_log_the_lr_used(tmp_path):
    # Closed form: warmup 0, peak 1e-3, cosine over 5 steps to 0.1 x peak; step s (1-based) uses
    # 1e-3 * (0.1 + 0.45 * (1 + cos(pi * (s - 1) / 5))), times 0.5 after the rollback.
    def lr(step, scale=1.0):
        return 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / 5))) * scale

    used, logged = run_ranks(_drive_lrs, 1, str(tmp_path), [1.0, 1.0, 1.0, math.nan], [
        "optim.warmup_steps=0", "optim.lr=1e-3", "health.nan_action=rollback", "health.rollback_lr_scale=0.5"],
        timeout=60)[0]
    # Steps 1-3, then NaN at step 4: back to step 2's checkpoint; steps 3-5 again at half the LR.
    expected = [lr(1), lr(2), lr(3), lr(3, 0.5), lr(4, 0.5), lr(5, 0.5)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert logged == pytest.approx(expected, rel=1e-12)
    assert logged[0] == 1e-3
