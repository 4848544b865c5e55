"""Batched generation with the KV cache, as Meta's reference `generate` batches prompts: every row
shares the positions; the prompts are right-padded, the first `min(prompt lengths)` positions run
through the model at once, and from there each step feeds one position, where a row still inside
its own prompt takes its prompt's token instead of a sampled one. K samples of a prompt share its
prefill: the prompts run once, then their keys and values are repeated K times.

Each row draws from its own generator, seeded by its own seed, and only once it is past its
prompt: a row's tokens depend on its seed and its logits, never on how many draws the other rows
made. Token ids in, token ids out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .generation import filter_logits
from .llama import Transformer


@dataclass
class Completion:
    ids: list[int]
    """The new tokens (a stop token, when reached, is the last)."""
    finish: str
    """"end_of_turn" when the last id is a stop id, else "length"."""


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    seeds: Optional[Sequence[int]] = None,
    stop_ids: Sequence[int] = (),
) -> list[Completion]:
    """`samples` completions of each prompt, rows ordered prompt-major (row i*samples + j is sample
    j of prompt i); `seeds`: one per row (default: the row index). Greedy at temperature 0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows = len(prompts) * samples
    seeds = list(range(rows)) if seeds is None else list(seeds)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    lengths = [len(p) for p in prompts for _ in range(samples)]
    total = max(lengths) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt ({max(lengths)}) + new tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.args.max_seq_len}")
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(rows, total, dtype=torch.long, device=device)
    for r, k in enumerate(range(0, rows, samples)):
        tokens[k : k + samples, : len(prompts[r])] = torch.as_tensor(list(prompts[r]), dtype=torch.long)
    in_prompt = torch.arange(total, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        start = min(lengths)
        cache = model.new_cache(len(prompts), total)
        logits = model(tokens[::samples, :start], start_pos=0, cache=cache)[:, -1].repeat_interleave(samples, 0)
        for layer in cache.values():  # the prompts' keys and values, once per sample
            layer.cache_k = layer.cache_k.repeat_interleave(samples, 0)
            layer.cache_v = layer.cache_v.repeat_interleave(samples, 0)
        new: list[list[int]] = [[] for _ in range(rows)]
        done = [max_new_tokens == 0] * rows
        for pos in range(start, total):
            drawing = [r for r in range(rows) if not done[r] and not in_prompt[r, pos]]
            chosen = tokens[:, pos].clone()
            if drawing:
                chosen[drawing] = _draw(logits[drawing], temperature, top_k, top_p, [generators[r] for r in drawing])
            tokens[:, pos] = chosen
            for r in drawing:
                new[r].append(int(chosen[r]))
                done[r] = len(new[r]) == max_new_tokens or bool((stops == chosen[r]).any())
            if all(done) or pos + 1 == total:
                break
            logits = model(tokens[:, pos : pos + 1], start_pos=pos, cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return [Completion(ids, "end_of_turn" if ids and ids[-1] in stop_ids else "length") for ids in new]


def _draw(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: float,
          generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of logits [n, vocab]: the argmax at temperature 0, else a draw from the
    distribution `filter_logits` leaves, each row with its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
