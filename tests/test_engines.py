"""Each real engine saves and loads its state through the interface the checkpointer uses: a model
trained one step and saved, loaded into a differently initialised model of the same engine, gives
back exactly the saved weights and the same next step."""

from __future__ import annotations

import pytest
import torch

from trainrun import DEBUG, TINY
from dist_llama.testing import run_ranks


def _weights(engine) -> dict:
    from dist_llama.testing import gather_full_state_dict
    from dist_llama.train.engines import ZeroEngine

    if isinstance(engine, ZeroEngine):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.engine.module.named_parameters()}
    return gather_full_state_dict(engine.parts)


def _save_then_load(run_dir, overrides, world_size):
    import torch.distributed as dist

    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    env = init_distributed("cpu")
    trainers = {}
    for seed in (0, 1):  # two differently initialised models of the same engine and layout
        cfg, dataset = resolve_config(DEBUG, [*TINY, f"train.seed={seed}", f"train.run_dir={run_dir}",
                                              "checkpoint.async_save=false", *overrides], world_size)
        trainers[seed] = build_trainer(cfg, env, dataset)
    saver, loader = trainers[0], trainers[1]
    batch = saver.parts.loader.next_batch()
    saver.train_step(batch)
    saver.parts.checkpointer.save(1, saver.engine, {"step": 1})
    saved = _weights(saver.engine)
    before = _weights(loader.engine)
    path = loader.parts.checkpointer.latest()
    loader.parts.checkpointer.load(path, loader.engine)
    loaded = _weights(loader.engine)
    next_losses = [t.train_step(batch)[0].item() for t in (saver, loader)]
    engine = type(saver.engine).__name__
    for t in trainers.values():
        t.close()
    dist.destroy_process_group()
    return {"engine": engine, "differed": any(not torch.equal(before[k], saved[k]) for k in saved),
            "equal": all(torch.equal(loaded[k], saved[k]) for k in saved), "next_losses": next_losses}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,overrides,engine", [
    (1, [], "LocalEngine"),
    (2, ["parallel.engine=fsdp"], "FSDPEngine"),
    (2, ["parallel.engine=ddp"], "DDPEngine"),
    (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"], "ZeroEngine"),
])
def test_engine_state_saves_and_loads_through_the_interface(tmp_path, world_size, overrides, engine):
    for r in run_ranks(_save_then_load, world_size, str(tmp_path), overrides, world_size, timeout=240):
        assert r["engine"] == engine
        assert r["differed"] and r["equal"]
        assert r["next_losses"][0] == r["next_losses"][1]
