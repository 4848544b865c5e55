"""Health checks: robust z-scores, step checks, the hang watchdog, stragglers, replica hashes, preflight."""

import json
import math
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_llama.config import Config, ParallelConfig
from dist_llama.testing import run_ranks
from dist_llama.train.replicas import check_replicas, find_stragglers, param_hash, preflight
from dist_llama.train.step_health import RobustZScore, StepHealth
from dist_llama.train.watchdog import Watchdog

pytestmark = pytest.mark.timeout(60)


def health_cfg(**kw):
    base = dict(spike_zscore=8.0, spike_window=50, spike_min_history=10, grad_norm_max=None)
    return SimpleNamespace(**{**base, **kw})


# --- z-scores and step checks --------------------------------------------------------------------
def test_robust_zscore_matches_closed_form():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 0.2, size=40)
    z = RobustZScore(window=16, min_history=5)
    for i, v in enumerate(values):
        probe = float(v + rng.normal(0, 0.5))
        seen = values[max(0, i - 16):i]
        if i < 5:
            assert z.score(probe) is None
        else:
            med = np.median(seen)
            mad = np.median(np.abs(seen - med))
            assert z.score(probe) == pytest.approx(abs(probe - med) / (1.4826 * mad), rel=1e-12)
            assert z.deviation(probe) == pytest.approx((probe - med) / (1.4826 * mad), rel=1e-12)
        z.accept(float(v))
    assert len(z.values) == 16


def test_robust_zscore_flat_history_is_finite():
    z = RobustZScore(window=8, min_history=3)
    for _ in range(8):
        z.accept(2.0)
    assert z.score(2.0) == 0.0
    assert math.isfinite(z.score(2.01)) and z.score(2.01) > 1.0  # floored at 1e-3 x median
    assert z.score(4.0) == pytest.approx(2.0 / 2e-3)


def _noisy(h: StepHealth, n=30, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        loss, gn = 2.0 + rng.normal(0, 0.02), 1.0 + rng.normal(0, 0.05)
        assert h.check(loss, gn) == []
        h.accept(loss, gn)


def test_spike_fires_on_spike_not_on_noise_nor_drop():
    h = StepHealth(health_cfg())
    _noisy(h)
    assert h.check(4.0, 1.0) == ["loss_spike"]
    assert h.last["loss_z"] > 8
    assert h.check(1.0, 1.0) == []  # a fast drop is progress, not a spike
    assert h.check(2.03, 1.05) == []


def test_no_checks_before_min_history():
    h = StepHealth(health_cfg(spike_min_history=10))
    for _ in range(9):
        h.accept(2.0, 1.0)
    assert h.check(100.0, 100.0) == []
    h.accept(2.0, 1.0)
    assert h.check(100.0, 100.0) == ["loss_spike", "grad_norm_explosion"]


@pytest.mark.parametrize("loss,gn", [(float("nan"), 1.0), (2.0, float("inf")), (float("-inf"), float("nan"))])
def test_nan_detection(loss, gn):
    h = StepHealth(health_cfg())
    _noisy(h)
    assert h.check(loss, gn) == ["nan"]
    h.accept(loss, gn)  # non-finite values never enter the history
    assert len(h.loss.values) == 30 and len(h.grad_norm.values) == 30


def test_grad_norm_explosion_by_ceiling_and_by_zscore():
    h = StepHealth(health_cfg(grad_norm_max=5.0))
    assert h.check(2.0, 5.5) == ["grad_norm_explosion"]  # the ceiling needs no history
    assert h.check(2.0, 4.5) == []
    _noisy(h)
    assert h.check(2.0, 4.5) == ["grad_norm_explosion"]  # below the ceiling, but ~70 MADs out
    h2 = StepHealth(health_cfg())
    _noisy(h2)
    assert h2.check(2.0, 1.1) == []
    assert h2.check(2.0, 50.0) == ["grad_norm_explosion"]


def test_state_round_trip_through_json():
    h = StepHealth(health_cfg())
    _noisy(h, n=20, seed=4)
    state = json.loads(json.dumps(h.state_dict()))
    h2 = StepHealth(health_cfg())
    h2.load_state_dict(state)
    for probe in (2.0, 2.1, 2.5, 3.0):
        assert h2.check(probe, 1.3) == h.check(probe, 1.3)
        assert h2.last == h.last
    small = StepHealth(health_cfg(spike_window=5, spike_min_history=2))
    small.load_state_dict(state)
    assert list(small.loss.values) == state["loss"]["values"][-5:]


def test_a_window_smaller_than_the_history_it_needs_is_refused():
    """Such a window never holds min_history values, so the spike and explosion checks would never fire:
    after 100 healthy steps a loss of 50 and a gradient norm of 1e6 went unnoticed."""
    with pytest.raises(ValueError, match="min_history <= window"):
        StepHealth(health_cfg(spike_window=5, spike_min_history=10))
    h = StepHealth(health_cfg(spike_window=10, spike_min_history=10))
    for i in range(100):
        h.accept(2.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 5))
    assert set(h.check(50.0, 1e6)) == {"loss_spike", "grad_norm_explosion"}


# --- watchdog ------------------------------------------------------------------------------------
def _stuck_in_a_collective_for_the_test(event: threading.Event):
    event.wait(10)


def test_watchdog_fires_with_stacks_and_history(tmp_path):
    fired = threading.Event()
    wd = Watchdog(0.5, tmp_path, rank=3, on_hang=fired.set)
    try:
        wd.beat(7, "forward_backward")
        wd.beat(7, "all_reduce loss")
        t0 = time.monotonic()
        _stuck_in_a_collective_for_the_test(fired)
        elapsed = time.monotonic() - t0
    finally:
        wd.stop()
    assert fired.is_set() and wd.fired
    assert 0.45 < elapsed < 0.5 + 0.5, elapsed
    text = (tmp_path / "hang-rank-00003.txt").read_text()
    assert "_stuck_in_a_collective_for_the_test" in text
    assert "forward_backward" in text and "all_reduce loss" in text and "step 7" in text
    assert "last phase 'all_reduce loss'" in text


def test_watchdog_quiet_while_beating_paused_or_unarmed(tmp_path):
    hung = []
    wd = Watchdog(0.3, tmp_path, rank=0, on_hang=lambda: hung.append(1))
    try:
        time.sleep(0.5)  # not armed before the first beat
        for i in range(8):
            wd.beat(i, "forward_backward")
            time.sleep(0.1)
        wd.pause()
        time.sleep(0.6)
        wd.resume()
        time.sleep(0.1)
        wd.beat(9, "optimizer")
        assert not hung and not wd.fired
        time.sleep(0.7)  # resumed and silent: now it fires
        assert hung == [1]
    finally:
        wd.stop()
    assert (tmp_path / "hang-rank-00000.txt").exists()


# --- hashes --------------------------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _flip(t: torch.Tensor, index: int, bit: int):
    with torch.no_grad():
        t.view(-1)[index:index + 1].view(torch.int32).bitwise_xor_(1 << bit)


def test_param_hash_is_byte_sensitive():
    m = _model()
    h0 = param_hash([m])
    assert h0 == param_hash([_model()]) and 0 <= h0 < 2**64
    _flip(m[0].weight, 5, 0)  # the lowest mantissa bit
    assert param_hash([m]) != h0
    _flip(m[0].weight, 5, 0)
    assert param_hash([m]) == h0
    with torch.no_grad():
        m[2].bias[0] = 0.0
        h_pos = param_hash([m])
        m[2].bias[0] = -0.0  # == 0.0, different bytes
    assert param_hash([m]) != h_pos
    assert param_hash([m]) != param_hash([m[0]])


def _replicas_and_stragglers(fail_rank):
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        slow = find_stragglers(5.0 if rank == 1 else 1.0 + 0.01 * rank, factor=2.0)
        none_slow = find_stragglers(1.0 + 0.1 * rank, factor=2.0)
        m = _model()
        agree = check_replicas([m], None)
        if rank == fail_rank:
            _flip(m[2].weight, 0, 30)
        one_bad = check_replicas([m], None)
        split = check_replicas([_model(seed=rank)], None)  # three different models: no majority
        # DTensor parameters hash their local shard.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (3,))
        lin = nn.Linear(6, 3)
        full = param_hash([lin])
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        lin.bias = nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Shard(0)]))
        sharded = param_hash([lin])
        return slow, none_slow, agree, one_bad, split, full != sharded
    finally:
        dist.destroy_process_group()


def test_stragglers_and_replica_check_on_three_ranks():
    for slow, none_slow, agree, one_bad, split, dtensor_local in run_ranks(_replicas_and_stragglers, 3, 2):
        assert slow == [(1, 5.0)]
        assert none_slow == []
        assert agree == []
        assert one_bad == [2]
        assert split == [0, 1, 2]
        assert dtensor_local


def _two_ranks(broken_rank, bad_nodes):
    dist.init_process_group("gloo")
    os.environ["SLURMD_NODENAME"] = f"node{dist.get_rank()}"
    try:
        # Two ranks: the slower one is compared with the faster (a mean-of-two median never allows it).
        assert find_stragglers(1.0 + 2.5 * dist.get_rank(), factor=2.0) == [(1, 3.5)]
        assert find_stragglers(1.0 + 0.5 * dist.get_rank(), factor=2.0) == []
        preflight(torch.device("cpu"))
        if dist.get_rank() == broken_rank:
            real = torch.matmul
            torch.matmul = lambda a, b: real(a, b) + (a[0, 0] == a[0, 0])  # off by one everywhere
        try:
            preflight(torch.device("cpu"), Path(bad_nodes))
        except RuntimeError as e:
            return str(e)
        return None
    finally:
        dist.destroy_process_group()


def test_preflight_and_stragglers_on_two_ranks(tmp_path):
    """Both ranks stop, each naming the broken rank; only the broken rank's node is recorded for the
    Slurm batch script to leave out."""
    bad_nodes = tmp_path / "slurm" / "bad_nodes"
    errors = run_ranks(_two_ranks, 2, 1, str(bad_nodes))
    assert "rank 1" in errors[1] and "matmul" in errors[1]
    assert "rank 0" in errors[0] and "ranks [1]" in errors[0]
    assert bad_nodes.read_text() == "node1\n"


def _groups_on_fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dist_llama.parallel.dims import ParallelDims
    from dist_llama.train.engines import build_engine

    def replica_groups(meshes, dims, engine):  # the group the engine built for this layout hands the check
        cfg = Config(parallel=ParallelConfig(engine=engine))
        return build_engine(cfg, dims, meshes, torch.device("cpu"), torch.float32, 1).replica_group

    out = {}
    for rank in (0, 5):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        try:
            hsdp = ParallelDims(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2)
            meshes = hsdp.build_mesh("cpu")
            out[rank] = {
                "hsdp": dist.get_process_group_ranks(replica_groups(meshes, hsdp, "fsdp")),
                "ddp": dist.get_process_group_ranks(replica_groups(meshes, hsdp, "ddp")),
            }
            fsdp = ParallelDims(pp=1, dp_replicate=1, dp_shard=4, cp=1, tp=2)
            out[rank]["fsdp"] = replica_groups(fsdp.build_mesh("cpu"), fsdp, "fsdp")
        finally:
            dist.destroy_process_group()
    return out


def test_replica_groups_follow_the_data_parallel_layout():
    (out,) = run_ranks(_groups_on_fake_world, 1)
    # mesh [pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2]: rank = 4*rep + 2*shard + tp
    assert out[0] == {"hsdp": [0, 4], "ddp": [0, 2, 4, 6], "fsdp": None}
    assert out[5] == {"hsdp": [1, 5], "ddp": [1, 3, 5, 7], "fsdp": None}


def test_straggler_check_says_when_the_layout_is_unmeasured():
    """A layout whose waits the engine cannot time gets one event with the reason and no check (no
    collective: this runs without a process group)."""
    from dist_llama.train.callbacks import StragglerCheck
    from dist_llama.train.compute_clock import Unmeasured

    events = []
    logger = SimpleNamespace(event=lambda name, step, **kw: events.append((name, step, kw)))
    check = StragglerCheck(1, 2.0, Unmeasured("tp=2: not timed"), SimpleNamespace(beat=lambda *a: None), logger)
    check.on_train_start()
    assert check.on_step_end({"step": 1, "compute_s": None}) == []
    assert events == [("straggler_check_unavailable", 0, {"reason": "tp=2: not timed"})]


def _straggler_check_over_an_interval(times_by_rank):
    """StragglerCheck on 2 gloo ranks, fed each rank's compute_s step by step; the events it logs."""
    from dist_llama.train.callbacks import StragglerCheck
    from dist_llama.train.compute_clock import ComputeClock

    dist.init_process_group("gloo")
    try:
        logged = []
        logger = SimpleNamespace(event=lambda name, step, **fields: logged.append((name, step, fields)))
        check = StragglerCheck(3, 2.0, ComputeClock(torch.device("cpu")), SimpleNamespace(beat=lambda *a: None),
                               logger)
        for step, t in enumerate(times_by_rank[dist.get_rank()], start=1):
            check.on_step_end({"step": step, "compute_s": t})
        return logged
    finally:
        dist.destroy_process_group()


def test_straggler_is_named_on_its_median_though_the_fast_rank_was_noisy_at_the_check_step():
    """Rank 1 is 10x slower every step; rank 0 was held up at step 6 (the probe's case, a loaded
    machine: step 6 missed). One step's times would compare 1.0 with 2 x 0.9 and miss it; the
    interval's medians (1.0 vs 0.1, 1.0 vs 0.1) name it at both checks. A single spike on the slow
    rank's own noise at a check step names no one when no rank is slow."""
    times = {0: [0.1, 0.1, 0.1, 0.1, 0.1, 0.9], 1: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
    for logged in run_ranks(_straggler_check_over_an_interval, 2, times):
        assert [(name, step, f["ranks"], f["compute_s"], f["steps"]) for name, step, f in logged] == \
            [("stragglers", 3, [1], [1.0], 3), ("stragglers", 6, [1], [1.0], 3)]
    quiet = {0: [0.1, 0.1, 2.0, 0.1, 0.1, 0.1], 1: [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}  # one noisy step, no straggler
    for logged in run_ranks(_straggler_check_over_an_interval, 2, quiet):
        assert logged == []
