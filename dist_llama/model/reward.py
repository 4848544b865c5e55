"""Reading a reward model: the scalar its `score` head gives a sequence, at the sequence's last
token (for chat data the end-of-turn token that closes the response), as transformers'
LlamaForSequenceClassification reads the last non-padding token."""

from __future__ import annotations

import torch


def last_token_scores(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """fp32 [B] of per-position scores [B, S, 1] (or [B, S]) at position lengths[i] - 1 of row i."""
    scores = scores.reshape(scores.shape[0], scores.shape[1])
    return scores.gather(1, (lengths.to(scores.device).long() - 1).view(-1, 1)).squeeze(1).float()


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """fp32 [N] rewards of whole sequences (prompt and response) under a score-head model on one
    process: right-padded into one batch (causal attention: padding after a token never changes
    its score)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    return last_token_scores(model(tokens), lengths)
