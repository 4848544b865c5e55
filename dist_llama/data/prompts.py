"""Prompts for PPO rollouts, from a chat dataset (``dist-llama-prepare --format chat``).

The prompt of a conversation is everything up to its final assistant turn's first content token
(the assistant header included, as a chat model sees it before answering); the answer recorded in
the data is not used, the policy writes its own. Row ``i`` of a batch is one prompt, right-padded
with the end-of-text id; ``prompt_len`` says how long it is, ``index`` which conversation it is.

Order, a pure function of (seed, position) as in PairLoader: global sample ``k`` is conversation
``perm(k mod n)`` of epoch ``k // n``; step ``s`` takes samples ``[s*B, (s+1)*B)``, and data-parallel
rank ``r`` the samples ``k ≡ r (mod dp)`` among them, so a mini-batch taken in order from each rank's
rows holds the same prompts for every data-parallel degree. The state is the sample count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .chat import END, PROMPT
from .permutation import EpochOrder, restored_consumed

__all__ = ["PromptLoader", "prompt_length"]


def prompt_length(mask: np.ndarray) -> int:
    """Tokens before the final assistant turn's content: the start of the last run of response tokens."""
    answer = np.asarray(mask) != PROMPT
    starts = np.flatnonzero(answer & ~np.concatenate([[False], answer[:-1]]))
    return int(starts[-1]) if len(starts) else len(answer)


class PromptLoader:
    def __init__(self, data, max_prompt_len: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int = 0,
                 name: str = "data"):
        """data: a TokenDataset of kind 'chat'. Every prompt must be at most max_prompt_len tokens
        (ValueError naming the conversation otherwise)."""
        if getattr(data, "kind", "text") != "chat":
            raise ValueError(f"{data!r} is not chat data (prepare the prompts with --format chat)")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        self.data, self.name = data, name
        self.n = data.n_docs
        if self.n < 1:
            raise ValueError(f"{data!r} holds no conversation")
        bounds = np.append(np.asarray(data.doc_starts, dtype=np.int64), len(data))
        self._bounds = bounds
        self.lengths = np.array([prompt_length(data.loss_mask(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])])
        if self.lengths.max() > max_prompt_len:
            k = int(np.argmax(self.lengths))
            raise ValueError(f"conversation {k} of {data!r} has a prompt of {int(self.lengths[k])} tokens, more than "
                             f"data.seq_len - train.ppo.max_new_tokens = {max_prompt_len}")
        self.stop_ids = self._stop_ids()
        self.max_prompt_len, self.global_batch_size = int(max_prompt_len), int(global_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.pad_id = int(data.meta.get("eos_id") or 0)
        self.seq_len = self.max_prompt_len
        self.consumed = 0
        self.new_epochs: list[tuple[str, int]] = []
        self._order = EpochOrder(self.n, self.seed, 0x990)

    def _stop_ids(self) -> list[int]:
        """The end-of-turn token (what closes an assistant answer in the data), then end of text."""
        stops = []
        for a, b in zip(self._bounds[:-1], self._bounds[1:]):
            mask = self.data.loss_mask(int(a), int(b))
            ends = np.flatnonzero(mask == END)
            if len(ends):
                stops.append(int(self.data.tokens(int(a) + int(ends[0]), int(a) + int(ends[0]) + 1)[0]))
                break
        eos = self.data.meta.get("eos_id")
        return stops + ([int(eos)] if eos is not None and int(eos) not in stops else [])

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def tokens_by_source(self) -> dict[str, int]:
        return {self.name: self.consumed * self.max_prompt_len}

    def _conversation(self, k: int) -> int:
        return self._order(k)

    def next_batch(self) -> dict:
        """This rank's prompts of the next global batch: prompt [b, max_prompt_len] (right-padded),
        prompt_len [b], index [b] (the conversation), sample [b] (the global sample number k)."""
        import torch

        B, first = self.global_batch_size, self.consumed
        ks = list(range(first + self.dp_rank, first + B, self.dp_size))
        docs = [self._conversation(k) for k in ks]
        prompt = np.full((len(ks), self.max_prompt_len), self.pad_id, dtype=np.int64)
        for i, d in enumerate(docs):
            n = int(self.lengths[d])
            prompt[i, :n] = self.data.tokens(int(self._bounds[d]), int(self._bounds[d]) + n)
        self.new_epochs = [(self.name, e) for e in range(max(1, -(-first // self.n)), (first + B - 1) // self.n + 1)]
        self.consumed += B
        return {"prompt": torch.from_numpy(prompt), "prompt_len": torch.from_numpy(self.lengths[docs].astype(np.int64)),
                "index": torch.tensor(docs, dtype=torch.long), "sample": torch.tensor(ks, dtype=torch.long)}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "dataset": self.data.fingerprint,
                "global_batch_size": self.global_batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at the saved position; the dataset and seed must match (ValueError naming the key)."""
        self.consumed = restored_consumed(sd, self.state_dict(), ("dataset", "seed"))
