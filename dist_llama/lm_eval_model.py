"""An lm-evaluation-harness model (`lm_eval.api.model.TemplateLM`) over a dist_llama Transformer and
tokenizer, so the harness's own tasks, request building and metrics score dist_llama checkpoints
without an export step (dist-llama-eval) and the live model during training (train.downstream_*).

Requests follow lm-eval's Hugging Face backend (HFLM), so the two agree on an exported model: texts
are encoded with BOS (as Llama's tokenizers do by default), an empty context is the BOS token (else EOS), a context + continuation too
long for the model is cut from the left, rolling log-likelihoods use lm-eval's disjoint windows, and
generation is greedy, cut at the first `until` string. `forward(tokens)` gives fp32 logits of a
batch of right-padded rows: the plain model on one process, or whatever the caller passes (the
trainer passes its live, sharded model, every rank with the same rows).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from lm_eval import utils
from lm_eval.api.model import TemplateLM


class DistLlamaLM(TemplateLM):
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, max_length: int,
                 device: torch.device, batch_size: int = 16, rank: int = 0, world_size: int = 1,
                 generate: Optional[Callable] = None):
        """forward: fp32 logits [B, S, vocab] of token ids [B, S]; generate(prompts, max_new_tokens,
        stop_ids) -> list of new-token lists (greedy), for generate_until."""
        super().__init__()
        self._forward, self.tok, self.max_length = forward, tokenizer, max_length
        self._device, self.batch_size = device, batch_size
        self._rank, self._world_size = rank, world_size
        self._generate = generate

    # --- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # BOS unless told otherwise, as a Llama tokenizer does by default (and as training data starts)
        has_bos = self.tok.bos_id is not None
        return self.tok.encode(string, bos=has_bos if add_special_tokens is None else add_special_tokens and has_bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # --- scoring --------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in chunk]
            width = max(len(r) for r in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                tokens[i, : len(r)] = torch.tensor(r)
            with torch.no_grad():
                logits = self._forward(tokens.to(self._device)).float().cpu()
            logprobs = torch.log_softmax(logits, dim=-1)
            for i, ((_, cont), row) in enumerate(zip(chunk, rows)):
                n = len(cont)
                lp = logprobs[i, len(row) - n : len(row)]
                target = torch.tensor(cont)
                out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._generate is None:
            raise NotImplementedError("generate_until needs a generate function (dist-llama-eval gives one)")
        out = []
        for context, kwargs in [req.args for req in requests]:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            text = self.tok.decode(self._generate([prompt], max_new, [self.eot_token_id])[0])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    # --- ranks (lm-eval's convention: each rank scores its share, rank 0 gathers) ----------------
    def all_gather(self, tensor):
        if self._world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self._world_size == 1:
            return [obj]
        parts = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()


def offline() -> None:
    """Nothing downloads at run time: tasks read local data files (datasets' json builder)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
