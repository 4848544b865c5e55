"""Chat templates and the records of ``dist-llama-prepare --format chat|preference``.

A conversation ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` is rendered to
token ids and a per-token mask with the template the tokenizer implies:

- **Llama 3** (the tokenizer has ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``,
  as Meta's tiktoken file and its Hugging Face conversion do)::

      <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>...

- **Llama 2** (any other tokenizer: SentencePiece, the byte tokenizer)::

      <s>[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nUSER [/INST] ASSISTANT </s><s>[INST] ...

Contents are stripped, as Meta's ``ChatFormat`` and ``chat_completion`` do. Special tokens are
inserted by id; the text is encoded as ordinary text, so a special-token string typed in a message
stays text. The mask says what each token is: ``PROMPT`` (0: system and user turns, headers: never
trained), ``RESPONSE`` (1: assistant content) and ``END`` (2: the token that ends an assistant
turn, ``<|eot_id|>`` or ``</s>``: trained by SFT; ``train.dpo.mask_special`` leaves it out of DPO's
log-probabilities, with the headers, which are prompt tokens here). A chat record marks every
assistant turn (SFT trains them all, the common convention); a preference record only its final
answer (earlier assistant turns of the prompt are context: ``final_answer_only``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .preference import record_pairs
from .prepare_inputs import InputError
from .record_checks import check_record, check_turns
from .tokenizer import Tokenizer

__all__ = ["PROMPT", "RESPONSE", "END", "ChatTemplate", "template_for", "FORMATS", "encode_records",
           "final_answer_only"]

PROMPT, RESPONSE, END = 0, 1, 2
FORMATS = ("text", "chat", "preference")
ROLES = ("system", "user", "assistant")
LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class ChatTemplate:
    """The template of one tokenizer: ``render`` makes (ids, mask) of a conversation."""

    tokenizer: Tokenizer
    name: str
    """'llama3' or 'llama2'."""

    @property
    def end_of_turn(self) -> int:
        """The token that ends an assistant turn: generation stops there."""
        if self.name == "llama3":
            return self.tokenizer.special_id("<|eot_id|>")
        return self.tokenizer.eos_id

    def render(self, messages: list[dict], generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of ``messages`` (checked: ValueError names the problem); with
        ``generation_prompt`` the ids end where the next assistant turn's content would start."""
        _check_messages(messages, self.name)
        ids: list[int] = []
        mask: list[int] = []

        def add(piece: list[int], kind: int) -> None:
            ids.extend(piece)
            mask.extend([kind] * len(piece))

        tok = self.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None else []
        if self.name == "llama3":
            start, end = tok.special_id("<|start_header_id|>"), tok.special_id("<|end_header_id|>")
            add(bos, PROMPT)
            for m in messages:
                add([start] + tok.encode(m["role"]) + [end] + tok.encode("\n\n"), PROMPT)
                text = tok.encode(m["content"].strip())
                if m["role"] == "assistant":
                    add(text, RESPONSE)
                    add([self.end_of_turn], END)
                else:
                    add(text + [self.end_of_turn], PROMPT)
            if generation_prompt:
                add([start] + tok.encode("assistant") + [end] + tok.encode("\n\n"), PROMPT)
            return ids, mask
        # Llama 2: the system prompt goes inside the first user turn; one [INST] block per exchange,
        # encoded as one string as Meta's chat_completion does (a SentencePiece model puts a space
        # before every string it encodes, so an answer encoded alone would start with an extra one).
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        for k in range(0, len(messages), 2):
            user = messages[k]["content"].strip()
            if k == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt = tok.encode(f"[INST] {user} [/INST]")
            if k + 1 == len(messages):
                add(bos + prompt, PROMPT)
                break
            exchange = tok.encode(f"[INST] {user} [/INST] {messages[k + 1]['content'].strip()} ")
            n = _common_prefix(prompt, exchange)  # the answer starts where the two part
            add(bos + exchange[:n], PROMPT)
            add(exchange[n:], RESPONSE)
            add([tok.eos_id], END)
        return ids, mask


def template_for(tokenizer: Tokenizer) -> ChatTemplate:
    """Llama 3's template when the tokenizer has its header and end-of-turn tokens, else Llama 2's."""
    if all(tokenizer.special_id(t) is not None for t in LLAMA3_SPECIALS):
        return ChatTemplate(tokenizer, "llama3")
    return ChatTemplate(tokenizer, "llama2")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_messages(messages, template: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i} must be {{\"role\": {'|'.join(ROLES)}, \"content\": string}}, got {m!r}")
    check_turns(messages)  # both templates: [INST] blocks need it, and Llama 3 chats are served so


def _json_object(line: bytes, path: str, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}:{lineno}: bad JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _record_documents(obj: dict, fmt: str, template: ChatTemplate) -> tuple[list, list]:
    """The documents of one record: a conversation (chat), or per pair prompt+better then
    prompt+worse (preference: a pair stays adjacent, documents 2k and 2k+1); and each pair's
    (rating index, margin) (data/preference.py)."""
    check_record(obj, fmt)
    if fmt == "chat":
        if "messages" not in obj:
            raise ValueError(f"no key 'messages' (keys: {', '.join(map(str, obj)) or 'none'})")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in obj["messages"] or []):
            raise ValueError("no assistant message: nothing to train on")
        return [template.render(obj["messages"])], []
    if "prompt" not in obj:
        raise ValueError("no key 'prompt' (a preference record is {prompt: [messages], chosen: str, rejected: str}, "
                         "or {prompt, responses: [best, ..., worst]})")
    pairs = record_pairs(obj)
    prompt = obj["prompt"]
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
            or prompt[-1].get("role") != "user":
        raise ValueError("'prompt' must be a list of messages ending with a user message")
    docs = []
    for better, worse, _, _ in pairs:
        for text in (better, worse):
            ids, mask = template.render(prompt + [{"role": "assistant", "content": text}])
            docs.append((ids, final_answer_only(mask).tolist()))
    return docs, [(rating, margin) for _, _, rating, margin in pairs]


def final_answer_only(mask) -> np.ndarray:
    """A preference document's mask with every turn before the final answer marked PROMPT: earlier
    assistant turns of a multi-turn prompt are context, not the response DPO scores (SFT, by
    contrast, trains every assistant turn of a conversation)."""
    mask = np.asarray(mask, dtype=np.uint8)
    prompt = np.flatnonzero(mask == PROMPT)
    out = mask.copy()
    if len(prompt):
        out[:prompt[-1]] = PROMPT
    return out


def encode_records(items, tokenizer: Tokenizer, fmt: str) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple]]:
    """(ids, mask) arrays of every document in a batch's items (JSON lines; see prepare_inputs),
    and for preference data each pair's (file, line, rating index, margin); InputError naming the
    file and line of a bad record."""
    template = template_for(tokenizer)
    ids, masks, pairs = [], [], []
    for kind, path, where, payload in items:
        if kind != "json":
            raise InputError(f"{path}: --format {fmt} reads .jsonl / .jsonl.gz records only")
        obj = _json_object(payload, path, where)
        try:
            docs, labels = _record_documents(obj, fmt, template)
        except ValueError as e:
            raise InputError(f"{path}:{where}: {e}") from None
        for doc_ids, doc_mask in docs:
            ids.append(np.asarray(doc_ids, dtype=np.int64))
            masks.append(np.asarray(doc_mask, dtype=np.uint8))
        pairs += [(path, where, rating, margin) for rating, margin in labels]
    return ids, masks, pairs
