"""Fault injection: spec parsing, every hook's effect, once-per-run-directory markers, env specs."""

import math
import multiprocessing as mp
import signal
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_llama.faults import ENV_VAR, KINDS, FaultInjector, parse_spec, validate_specs
from dist_llama.testing import run_ranks

pytestmark = pytest.mark.timeout(60)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _bits(parts) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).view(torch.int32) for m in parts
                      for _, p in sorted(m.named_parameters())])


def _popcount(x: torch.Tensor) -> int:
    return sum(bin(v & 0xFFFFFFFF).count("1") for v in x.tolist())


# --- specs ---------------------------------------------------------------------------------------
def test_parse_canonical_and_defaults():
    assert parse_spec("kill:step=7:rank=1").canonical == "kill:rank=1:step=7"
    nan = parse_spec(" nan : step=4 ")
    assert nan.canonical == "nan:step=4:times=1" and nan.rank is None
    assert parse_spec("slow:rank=0:factor=2.5").get("factor") == 2.5
    assert [s.kind for s in validate_specs(["hang:rank=0:step=1", "ckpt_corrupt:step=2"])] == ["hang", "ckpt_corrupt"]


@pytest.mark.parametrize("spec,why", [
    ("explode:rank=1", "unknown kind 'explode'"),
    ("kill:rank=1", "kill needs step"),
    ("kill:rank=1:step=7:times=2", "unknown key 'times' for kill"),
    ("kill:rank1:step=7", "is not key=value"),
    ("kill:rank=1:rank=2:step=7", "given twice"),
    ("nan:step=x", "is not an integer"),
    ("nan:step=3:times=0", "times must be >= 1"),
    ("slow:rank=0:factor=0.5", "factor must be >= 1"),
    ("", "empty"),
])
def test_bad_specs_name_the_spec_and_what_is_allowed(spec, why):
    with pytest.raises(ValueError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert why in msg and repr(spec) in msg
    assert all(kind in msg for kind in KINDS) and "step" in msg and "rank" in msg


def test_validate_checks_ranks_against_the_world(tmp_path):
    with pytest.raises(ValueError, match="rank 4 does not exist"):
        validate_specs(["kill:rank=4:step=1"], world_size=4)
    validate_specs(["kill:rank=3:step=1"], world_size=4)
    assert not (tmp_path / "faults").exists()


def test_inert_without_specs(tmp_path):
    f = FaultInjector([], rank=0, run_dir=tmp_path)
    assert not f.active
    loss = torch.tensor(2.0)
    m = _model()
    before = _bits([m])
    f.at_step_start(1)
    assert f.loss(1, loss) is loss
    f.after_step(1, [m])
    f.on_checkpoint_written(1, tmp_path)
    assert torch.equal(_bits([m]), before) and f.fired == []
    assert not (tmp_path / "faults").exists()


def test_env_specs_are_appended(tmp_path):
    cfg = SimpleNamespace(faults=["kill:rank=0:step=9"])
    f = FaultInjector.from_config(cfg, 0, tmp_path, environ={ENV_VAR: "nan:step=2, ckpt_fail:step=3,"})
    assert [s.canonical for s in f.specs] == ["kill:rank=0:step=9", "nan:step=2:times=1", "ckpt_fail:step=3"]
    assert f.active
    dup = FaultInjector.from_config(cfg, 0, tmp_path, environ={ENV_VAR: "kill:step=9:rank=0"})
    assert len(dup.specs) == 1
    with pytest.raises(ValueError, match="bogus"):
        FaultInjector.from_config(cfg, 0, tmp_path, environ={ENV_VAR: "bogus:step=1"})


# --- process-level faults (in forked children) ---------------------------------------------------
def _child(spec, step, run_dir):
    f = FaultInjector([spec], rank=1, run_dir=run_dir)
    f.at_step_start(step - 1)  # not yet
    f.at_step_start(step)


def _run_child(spec, step, run_dir, wait=10.0):
    p = mp.get_context("fork").Process(target=_child, args=(spec, step, run_dir))
    p.start()
    p.join(wait)
    return p


def test_kill_sigkills_after_writing_its_marker(tmp_path):
    p = _run_child("kill:rank=1:step=7", 7, tmp_path)
    assert p.exitcode == -signal.SIGKILL
    assert (tmp_path / "faults" / "kill_rank=1_step=7.fired").exists()
    p = _run_child("kill:rank=1:step=7", 7, tmp_path)  # the restarted process goes on
    assert p.exitcode == 0


def test_sigterm(tmp_path):
    p = _run_child("sigterm:rank=1:step=2", 2, tmp_path)
    assert p.exitcode == -signal.SIGTERM
    assert _run_child("sigterm:rank=1:step=2", 2, tmp_path).exitcode == 0


def test_hang_blocks_until_killed(tmp_path):
    p = _run_child("hang:rank=1:step=3", 3, tmp_path, wait=1.0)
    try:
        assert p.is_alive()
        assert (tmp_path / "faults" / "hang_rank=1_step=3.fired").exists()
    finally:
        p.kill()
        p.join()


def test_other_ranks_are_untouched(tmp_path):
    f = FaultInjector(["kill:rank=1:step=2", "hang:rank=1:step=2", "bitflip:rank=1:step=2",
                       "slow:rank=1:factor=100"], rank=0, run_dir=tmp_path)
    m = _model()
    before = _bits([m])
    t0 = time.monotonic()
    f.at_step_start(2)
    f.after_step(2, [m])
    f.slow_down([m])
    m(torch.zeros(2, 3))
    assert time.monotonic() - t0 < 0.5 and torch.equal(_bits([m]), before)
    assert f.fired == [] and not (tmp_path / "faults").exists()


# --- in-process hooks ----------------------------------------------------------------------------
def test_nan_times_counts_attempts_and_poisons_gradients(tmp_path):
    events = []
    f = FaultInjector(["nan:step=4:times=2"], rank=3, run_dir=tmp_path,
                      on_fire=lambda kind, step, **kw: events.append((kind, step, kw)))
    loss = torch.tensor(1.5)
    assert f.loss(3, loss) is loss
    assert math.isnan(f.loss(4, loss).item())
    x = torch.ones(2, requires_grad=True)
    f.loss(4, (x * 2).sum()).backward()  # attempt 2, before backward: gradients are NaN too
    assert torch.isnan(x.grad).all()
    assert f.loss(4, loss) is loss  # the third attempt succeeds
    assert [e[2]["attempt"] for e in events] == [1, 2] and events[0][:2] == ("nan", 4)
    assert f.fired[0] == {"kind": "nan", "step": 4, "rank": 3, "spec": "nan:step=4:times=2", "attempt": 1}
    # A rank-specific nan only concerns that rank.
    other = FaultInjector(["nan:rank=1:step=5"], rank=0, run_dir=tmp_path)
    assert other.loss(5, loss) is loss
    assert math.isnan(FaultInjector(["nan:rank=1:step=5"], rank=1, run_dir=tmp_path).loss(5, 1.0))


def test_once_per_run_dir_across_injectors(tmp_path):
    specs = ["nan:step=4", "ckpt_fail:step=2"]
    a = FaultInjector(specs, rank=0, run_dir=tmp_path)
    assert math.isnan(a.loss(4, 1.0))
    with pytest.raises(RuntimeError, match="injected checkpoint write failure"):
        a.on_checkpoint_written(2, tmp_path)
    b = FaultInjector(specs, rank=0, run_dir=tmp_path)  # a restarted process, same run directory
    assert b.loss(4, 1.0) == 1.0
    b.on_checkpoint_written(2, tmp_path)
    assert b.fired == []
    # Rank-less faults act on every rank, each with its own marker.
    c = FaultInjector(specs, rank=1, run_dir=tmp_path)
    assert math.isnan(c.loss(4, 1.0))
    assert math.isnan(FaultInjector(specs, rank=0, run_dir=tmp_path / "other").loss(4, 1.0))


def test_bitflip_changes_exactly_one_bit_once(tmp_path):
    m1, m2 = _model(), _model()
    f = FaultInjector(["bitflip:rank=0:step=5"], rank=0, run_dir=tmp_path)
    before = _bits([m1, m2])
    f.after_step(4, [m1, m2])
    assert torch.equal(_bits([m1, m2]), before)
    f.after_step(5, [m1, m2])
    diff = _bits([m1, m2]) ^ before
    assert _popcount(diff) == 1 and diff[0] == 1 << 22  # element 0 of "0.bias" of the first part
    assert f.fired[0]["param"] == "0.bias" and f.fired[0]["bit"] == 22
    value = m1[0].bias[0].item()
    assert math.isfinite(value) and value != _model()[0].bias[0].item()
    f.after_step(5, [m1, m2])  # a replayed step 5 does not flip it back
    assert _popcount(_bits([m1, m2]) ^ before) == 1


def _bitflip_dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    try:
        import tempfile
        mesh = init_device_mesh("cpu", (2,))
        lin = nn.Linear(4, 4, bias=False)
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        before = lin.weight.to_local().clone()
        with tempfile.TemporaryDirectory() as d:
            FaultInjector(["bitflip:rank=1:step=1"], dist.get_rank(), d).after_step(1, [lin])
        after = lin.weight.to_local()
        return _popcount(after.reshape(-1).view(torch.int32) ^ before.reshape(-1).view(torch.int32))
    finally:
        dist.destroy_process_group()


def test_bitflip_hits_the_local_shard_of_a_dtensor():
    assert run_ranks(_bitflip_dtensor, 2) == [0, 1]


class _Sleeper(nn.Module):
    """A forward that takes 50 ms."""

    def forward(self, x):
        time.sleep(0.05)
        return x


def test_slow_makes_every_forward_factor_times_longer(tmp_path):
    events = []
    f = FaultInjector(["slow:rank=0:factor=3"], rank=0, run_dir=tmp_path,
                      on_fire=lambda kind, step, **kw: events.append((kind, step, kw)))
    m = _Sleeper()
    f.slow_down([m])
    for step in (1, 2):
        f.at_step_start(step)
        t0 = time.monotonic()
        m(torch.zeros(1))  # the delay is inside the forward call, not after the step
        assert 0.15 <= time.monotonic() - t0 < 0.5
    assert events == [("slow", 1, {"spec": "slow:rank=0:factor=3.0", "factor": 3.0})]


def test_ckpt_fail_only_at_its_step(tmp_path):
    f = FaultInjector(["ckpt_fail:step=6"], rank=0, run_dir=tmp_path)
    f.on_checkpoint_written(5, tmp_path)
    with pytest.raises(RuntimeError, match="injected checkpoint write failure"):
        f.on_checkpoint_written(6, tmp_path)
    f.on_checkpoint_written(6, tmp_path)


def test_ckpt_corrupt_flips_one_byte_of_one_file_once_across_ranks(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    originals = {}
    for name in ("__0_0.distcp", "__1_0.distcp"):
        data = bytes(range(256)) * 4
        (ckpt / name).write_bytes(data)
        originals[name] = data
    (ckpt / ".metadata").write_bytes(b"meta")
    run = tmp_path / "run"
    ranks = [FaultInjector(["ckpt_corrupt:step=3"], rank=r, run_dir=run) for r in (0, 1)]
    for f in ranks:
        f.on_checkpoint_written(2, ckpt)
        f.on_checkpoint_written(3, ckpt)
    changed = {n: sum(a != b for a, b in zip((ckpt / n).read_bytes(), data)) for n, data in originals.items()}
    assert changed == {"__0_0.distcp": 1, "__1_0.distcp": 0}
    assert (ckpt / ".metadata").read_bytes() == b"meta"
    assert [len(f.fired) for f in ranks] == [1, 0]
    assert ranks[0].fired[0]["file"].endswith("__0_0.distcp") and ranks[0].fired[0]["offset"] == 512
