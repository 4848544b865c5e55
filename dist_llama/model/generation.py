"""Autoregressive generation: greedy, or temperature / top-k / top-p sampling, with or without the
KV cache (Meta's generate loop, one prompt at a time).

With the cache, the prompt runs through the model once and each new token costs one position;
without it every step recomputes the whole sequence (the reference the cache is tested against).
Token ids in, token ids out: tokenizers and checkpoints are the caller's business.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .llama import Transformer


def filter_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """fp32 scores [..., vocab] of softmax(logits / temperature) restricted to the top_k most likely
    tokens, then to the smallest set of those whose renormalised probability reaches top_p; -inf
    elsewhere. The order and arithmetic of transformers' TemperatureLogitsWarper → TopKLogitsWarper →
    TopPLogitsWarper, so the eligible set is exactly theirs (ties at the k-th score stay in; the
    nucleus is cut on the ascending cumulative sum; the most likely token always stays)."""
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the renormalised top-k mass
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """One token id from next-token logits [vocab]: the argmax when temperature is 0, else a draw
    from the distribution `filter_logits` leaves (temperature, then top-k, then top-p)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, the fp32 logits [vocab] it was drawn from) for each new token of one prompt,
    up to max_new_tokens, ending after the first token in stop_ids (which is yielded)."""
    device = model.tok_embeddings.weight.device
    total = len(prompt) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + new tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.args.max_seq_len}")
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    cache = model.new_cache(1, total) if use_cache else None
    start_pos = 0  # positions before this one are in the cache
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(tokens[:, start_pos:], start_pos=start_pos, cache=cache)[0, -1]
            start_pos = tokens.shape[1]
        else:
            logits = model(tokens)[0, -1]
        token = sample(logits, temperature, top_k, top_p, generator)
        yield token, logits
        if token in stop_ids:
            return
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (a stop token, when reached, is the last). Sampling draws
    from one generator seeded with `seed` on the model's device, so a call is reproducible."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return [[token for token, _ in stream(model, p, max_new_tokens, temperature, top_k, top_p, generator,
                                              stop_ids, use_cache)]
                for p in prompts]
    finally:
        model.train(was_training)
