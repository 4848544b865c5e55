"""Initial weights depend only on (seed, parameter name): every layout of the layout tests, and each
data-parallel engine, starts from exactly the single-process weights, whether it initialises the
whole model before splitting and sharding it or builds on the meta device and each rank initialises
only what it holds (train.meta_init, the CUDA default)."""

import pytest
import torch
import torch.distributed as dist

from dist_llama.testing import run_ranks
from test_parallel_layouts import LAYOUTS
from trainrun import DEBUG, TINY

ENGINES = [
    ("fsdp2", 2, []),
    ("hsdp2x2", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("ddp2", 2, ["parallel.engine=ddp"]),
    ("ddp2_cp2", 4, ["parallel.engine=ddp", "parallel.cp=2"]),
    # ZeRO-1/2 keep whole parameters on every rank, under DeepSpeed's "module." prefix.
    ("zero2_2", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
]


def _initial_weights(run_dir, overrides, world_size):
    """{meta_init: (full weights, every part's freqs_cis)} of this layout, built as training builds it."""
    from dist_llama.parallel.env import init_distributed
    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    out = {}
    for meta in (False, True):
        cfg, dataset = resolve_config(DEBUG, [*TINY, f"train.run_dir={run_dir}/{meta}", "checkpoint.enabled=false",
                                              f"train.meta_init={meta}", *overrides], world_size)
        trainer = build_trainer(cfg, init_distributed(cfg.train.device), dataset)
        freqs = [b for part in trainer.engine.parts for n, b in part.named_buffers() if n.endswith("freqs_cis")]
        params = gather_full_state_dict(trainer.engine.parts)
        out[meta] = ({k.removeprefix("module."): v for k, v in params.items()}, freqs)
        trainer.close()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return out if rank == 0 else None


def _weights(tmp_path, world, overrides):
    return run_ranks(_initial_weights, world, str(tmp_path), overrides, world, timeout=200)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole model initialised on the device (the path CPU runs took so far)."""
    return _weights(tmp_path_factory.mktemp("ref"), 1, [])[False]


def _assert_same(reference, got, what):
    ref_params, ref_freqs = reference
    params, freqs = got
    assert params.keys() == ref_params.keys(), what
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), (what, k)
    assert freqs and all(torch.equal(f, ref_freqs[0]) for f in freqs), what


def test_one_rank_meta_init_gives_the_same_weights(reference, tmp_path):
    _assert_same(reference, _weights(tmp_path, 1, [])[True], "meta")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,world,overrides", LAYOUTS + ENGINES, ids=[x[0] for x in LAYOUTS + ENGINES])
def test_every_layout_starts_from_the_single_process_weights_on_both_paths(reference, tmp_path, name, world,
                                                                           overrides):
    for meta, got in _weights(tmp_path, world, overrides).items():
        _assert_same(reference, got, f"{name} meta_init={meta}")


def test_weights_depend_on_seed_and_name_only():
    """Different parameters of the same shape draw different values, and another seed other values."""
    from dist_llama.model import ModelArgs, Transformer

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16)
    a, b, c = Transformer(args), Transformer(args), Transformer(args)
    a.init_weights(0)
    del b.layers["0"]  # a pipeline stage holding layer 1 only
    b.init_weights(0)
    c.init_weights(1)
    assert torch.equal(a.layers["1"].attention.wq.weight, b.layers["1"].attention.wq.weight)
    assert not torch.equal(a.layers["0"].attention.wq.weight, a.layers["1"].attention.wq.weight)
    assert not torch.equal(a.layers["1"].attention.wq.weight, c.layers["1"].attention.wq.weight)
