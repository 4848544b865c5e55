"""Chat and preference data made in the test: tiny Llama 3-style tokenizers (bytes, or one token
per word, plus the chat special tokens; Hugging Face tokenizer.json files) and synthetic
conversations whose answers copy a word from the prompt, written as JSONL for dist-llama-prepare."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "jade"]
FILLERS = ["please", "say", "the", "word", "now", "then", "just", "it"]
COLOURS = WORDS + ["navy", "rose", "plum", "sand"]


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


def word_tokenizer(path: Path) -> str:
    """One token per whitespace-separated word of a closed vocabulary (roles, FILLERS, COLOURS),
    then Llama 3's BOS, EOS, header and end-of-turn tokens: a copy task a tiny model learns in
    tens of steps, as no answer has to be spelled."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "system", "user", "assistant", *FILLERS, *COLOURS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return str(path)


def copy_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer): three filler words with one colour put at a random place among them;
    the answer is the colour."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(FILLERS) for _ in range(3)]
        colour = rng.choice(COLOURS)
        words.insert(rng.randrange(4), colour)
        out.append((" ".join(words), colour))
    return out


def write_conversations(path: Path, pairs: list[tuple[str, str]], system: str | None = None) -> Path:
    """One chat record per (user, assistant) pair."""
    with open(path, "w") as f:
        for q, a in pairs:
            head = [{"role": "system", "content": system}] if system is not None else []
            f.write(json.dumps({"messages": head + [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]}) + "\n")
    return path


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
    return write_conversations(path, copy_task(n, seed), system="copy")


def write_preferences(path: Path, n: int, seed: int = 0) -> Path:
    """Chosen: the named word; rejected: the word spelled backwards."""
    with open(path, "w") as f:
        for q, a in copy_task(n, seed):
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": a[::-1]}) + "\n")
    return path
