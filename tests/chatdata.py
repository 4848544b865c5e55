"""Chat and preference data made in the test: a tiny Llama 3-style tokenizer (bytes plus the chat
special tokens, a Hugging Face tokenizer.json) and synthetic conversations whose answers copy a
word from the prompt, written as JSONL and prepared with dist-llama-prepare."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "jade"]


def llama3_tokenizer(path: Path) -> str:
    """A byte-level tokenizer.json without merges (ids 0..255 are the bytes) whose ids 256.. are
    Llama 3's BOS, EOS, header and end-of-turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return str(path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character map, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def copy_task(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: the answer is the word the question names."""
    rng = random.Random(seed)
    return [(f"say {a}", a) for a in (rng.choice(WORDS) for _ in range(n))]


def write_chat(path: Path, n: int, seed: int = 0) -> Path:
    with open(path, "w") as f:
        for q, a in copy_task(n, seed):
            f.write(json.dumps({"messages": [{"role": "system", "content": "copy"},
                                             {"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def write_preferences(path: Path, n: int, seed: int = 0) -> Path:
    """Chosen: the named word; rejected: the word spelled backwards."""
    with open(path, "w") as f:
        for q, a in copy_task(n, seed):
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": a[::-1]}) + "\n")
    return path
