"""Typed configuration: schema, loading (preset + overrides), validation, run record.

Everything a user can set lives in the dataclasses of schema.py; omegaconf rejects unknown keys and
wrong types while merging (loading.py), and `validate` rejects impossible combinations
(validation.py). Both happen before any process group exists, and both raise `ConfigError`, which
the CLI turns into one line and exit code 2. Nothing here imports torch: the names checked against
(names.py, fault_specs.py) are defined on this side and imported by the modules that act on them.
"""

from dist_llama.config.errors import EXIT_CONFIG, EXIT_FILE_ENV, ConfigError
from dist_llama.config.loading import CONFIG_DIR, explicit_keys, load, save_resolved, to_object
from dist_llama.config.schema import (CheckpointConfig, Config, DataConfig, Degrees, HealthConfig, LoggingConfig,
                                      OptimConfig, ParallelConfig, TrainConfig)
from dist_llama.config.validation import (micro_batches, micro_rows, resolve_parallel, validate, validate_device,
                                          validate_model)
from dist_llama.model.args import ModelArgs

__all__ = [
    "EXIT_CONFIG", "EXIT_FILE_ENV", "ConfigError",
    "Config", "ModelArgs", "ParallelConfig", "DataConfig", "OptimConfig", "TrainConfig", "CheckpointConfig",
    "HealthConfig", "LoggingConfig", "Degrees",
    "CONFIG_DIR", "load", "to_object", "save_resolved", "explicit_keys",
    "validate", "validate_device", "validate_model", "resolve_parallel", "micro_batches", "micro_rows",
]
