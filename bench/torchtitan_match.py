"""torchtitan's side of bench/gpu_vs_torchtitan.sh: a torchtitan (0.3.0) config registry whose one
config, `dist_llama_match`, is torchtitan's own llama3_8b cut to the layers, sequence length, batch,
activation checkpointing, compile and float8 settings of the dist_llama run beside it. torchtitan's
command line cannot change the number of layers, hence a registry module; the settings come from
the environment the script sets (LAYERS, SEQ, BATCH, AC, COMPILE, FLOAT8, STEPS, ASSETS, DATA, OUT).

  torchrun --nproc_per_node 1 -m torchtitan.train --module torchtitan_match --config dist_llama_match

Data: the same King James text dist_llama trains on (DATA: a directory holding it as train.jsonl),
through a byte-level tokenizer written by the script (ASSETS): token ids differ from dist_llama's byte
tokenizer, shapes and work do not (both use the 128,256-row vocabulary of the 8B model).
"""

from __future__ import annotations

import os

from torchtitan.components.quantization import Float8LinearConverter
from torchtitan.config import CompileConfig
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_8b


def dist_llama_match():
    env = os.environ
    compile_on = env.get("COMPILE", "1") == "1"
    config = llama3_8b()
    converters = None
    if env.get("FLOAT8", "0") == "1":
        # torchtitan's float8 converter offers the rowwise recipes only; dist_llama uses torchao's
        # tensorwise default (see the script's notes). The output projection stays bf16 in both.
        converters = [Float8LinearConverter.Config(filter_fqns=["lm_head"], model_compile_enabled=compile_on)]
    spec = model_registry("8B", converters=converters)
    spec.model.layers = spec.model.layers[: int(env["LAYERS"])]
    config.model_spec = spec
    config.hf_assets_path = env["ASSETS"]
    config.dump_folder = env["OUT"]
    config.dataloader.dataset = "c4_test"  # its loader reads a local directory of JSON lines
    config.dataloader.dataset_path = env["DATA"]
    config.training.seq_len = int(env["SEQ"])
    config.training.local_batch_size = int(env["BATCH"])
    config.training.steps = int(env["STEPS"])
    config.activation_checkpoint = {"none": None, "full": FullAC.Config()}[env.get("AC", "none")]
    config.compile = CompileConfig(enable=compile_on, components=["model", "loss"])
    config.checkpoint.interval = 10**9
    config.validator.freq = 10**9
    config.profiler.enable_profiling = False
    config.metrics.enable_tensorboard = False
    config.metrics.log_freq = 1
    return config
