"""Training objectives behind one interface (base.Objective): pretraining and SFT (pretrain.py),
DPO (dpo.py). `build_objective` builds the one train.objective names, through the torch-free
registry in dist_llama.config.objectives (the only place that compares the name)."""

from __future__ import annotations

import importlib

from dist_llama.config.objectives import objective_spec
from dist_llama.train.objectives.base import BuildContext, Objective

__all__ = ["Objective", "BuildContext", "build_objective"]


def build_objective(cfg) -> Objective:
    """The objective of cfg.train.objective, from the class its registry entry names."""
    spec = objective_spec(cfg.train.objective)
    module, name = spec.implementation.split(":")
    return getattr(importlib.import_module(module), name)(cfg, spec)
