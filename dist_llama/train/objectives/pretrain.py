"""Pretraining (every token's next-token loss) and SFT (the same loss on the assistant tokens of
--format chat data only: prompt labels are -100, so they neither add loss nor count)."""

from __future__ import annotations

from dist_llama.train.objectives.base import Objective


class Pretrain(Objective):
    """The base class's choices, as they are."""


class SFT(Objective):
    loss_mask = True
