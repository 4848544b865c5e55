"""DeepSpeed's checkpoint files, read without running their pickles' code."""

from __future__ import annotations

import torch


def safe_load(path, map_location=None):
    """A DeepSpeed checkpoint file with weights_only=True: tensors and plain containers, plus the
    three DeepSpeed types its files hold, allowed by name (DeepSpeed's own loader unpickles anything)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)
