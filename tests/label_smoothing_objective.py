"""A new objective is one module (this one) and one registry line (the test adds it): pretraining
with label-smoothed cross-entropy, on the model's plain logits."""

import torch.nn.functional as F

from dist_llama.train.objectives.base import IGNORE_INDEX, Objective

SMOOTHING = 0.1


class LabelSmoothed(Objective):
    def micro_loss(self, step, model, mb):
        with step.autocast():
            logits = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=SMOOTHING, reduction="sum")
        return loss * step.scale
