"""torchtitan's side of bench/gpu_vs_torchtitan.sh: a torchtitan (0.3.0) config registry whose one
config, `dist_llama_match`, is torchtitan's own llama3_8b cut to the layers, sequence length, batch,
activation checkpointing, compile and float8 settings of the dist_llama run beside it. torchtitan's
command line cannot change the number of layers, hence a registry module; the settings come from
the environment the script sets (LAYERS, SEQ, BATCH, AC, COMPILE, FLOAT8, STEPS, ASSETS, DATA, OUT).

  torchrun --nproc_per_node 1 -m torchtitan.train --module torchtitan_match --config dist_llama_match
  python bench/torchtitan_match.py --quick    # the settings, and the config where torchtitan is installed

Data: the same King James text dist_llama trains on (DATA: a directory holding it as train.jsonl),
through a byte-level tokenizer written by the script (ASSETS): token ids differ from dist_llama's byte
tokenizer, shapes and work do not (both use the 128,256-row vocabulary of the 8B model).
"""

from __future__ import annotations

import os
import sys


def settings(env) -> dict:
    """The run's settings from the environment the script sets; ValueError/KeyError when one is bad."""
    ac = env.get("AC", "none")
    if ac not in ("none", "full"):
        raise ValueError(f"AC must be none or full, got {ac!r}")
    return {"layers": int(env["LAYERS"]), "seq": int(env["SEQ"]), "batch": int(env["BATCH"]),
            "steps": int(env["STEPS"]), "ac": ac, "compile": env.get("COMPILE", "1") == "1",
            "float8": env.get("FLOAT8", "0") == "1", "assets": env["ASSETS"], "data": env["DATA"], "out": env["OUT"]}


def dist_llama_match():
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_8b

    run = settings(os.environ)
    config = llama3_8b()
    converters = None
    if run["float8"]:
        # torchtitan's float8 converter offers the rowwise recipes only; dist_llama uses torchao's
        # tensorwise default (see the script's notes). The output projection stays bf16 in both.
        converters = [Float8LinearConverter.Config(filter_fqns=["lm_head"], model_compile_enabled=run["compile"])]
    spec = model_registry("8B", converters=converters)
    spec.model.layers = spec.model.layers[: run["layers"]]
    config.model_spec = spec
    config.hf_assets_path = run["assets"]
    config.dump_folder = run["out"]
    config.dataloader.dataset = "c4_test"  # its loader reads a local directory of JSON lines
    config.dataloader.dataset_path = run["data"]
    config.training.seq_len = run["seq"]
    config.training.local_batch_size = run["batch"]
    config.training.steps = run["steps"]
    config.activation_checkpoint = {"none": None, "full": FullAC.Config()}[run["ac"]]
    config.compile = CompileConfig(enable=run["compile"], components=["model", "loss"])
    config.checkpoint.interval = 10**9
    config.validator.freq = 10**9
    config.profiler.enable_profiling = False
    config.metrics.enable_tensorboard = False
    config.metrics.log_freq = 1
    return config


def _quick() -> None:
    """What can run without torchtitan: the settings of the script's defaults; and the config itself
    where torchtitan is installed."""
    env = {"LAYERS": "8", "SEQ": "8192", "BATCH": "1", "STEPS": "30", "ASSETS": "assets", "DATA": "data",
           "OUT": "out", **os.environ}
    print(f"settings: {settings(env)}")
    try:
        import torchtitan  # noqa: F401
    except ImportError:
        print("torchtitan is not installed here: the settings were checked, not torchtitan's config")
        return
    os.environ.update(env)
    config = dist_llama_match()
    print(f"torchtitan config: {len(config.model_spec.model.layers)} layers, seq {config.training.seq_len}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--quick"]:
        sys.exit("usage: python bench/torchtitan_match.py --quick (torchtitan imports this module as --module)")
    _quick()
