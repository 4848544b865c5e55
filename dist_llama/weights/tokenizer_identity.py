"""Which tokenizer a weight source was trained with, and whether it is the one a run will feed it.

A Hugging Face directory carries its tokenizer files (tokenizer.json, tokenizer.model, Meta's
original/tokenizer.model, an export's original_tokenizer.model), a Meta directory its
tokenizer.model, a dist_llama run the data.tokenizer of its config. Two tokenizers are the same
vocabulary when their fingerprints (file content hashes) are equal, or, across formats (a tiktoken
file and the tokenizer.json converted from it), when they agree on the number of ids, BOS, EOS and
the ids of a probe text covering ASCII, digits, tab and newline, accents, CJK, emoji and special-token
strings. A source whose tokenizer cannot be read carries no identity: only the vocabulary size is
checked then (config validation).
"""

from __future__ import annotations

from typing import Optional

# Single spaces only: converters disagree on runs of spaces (SentencePiece vs its tokenizer.json).
PROBE = ("The quick brown fox jumps over the lazy dog. 0123456789 3.14159, -42%\n\tdef f(x): return x**2 "
         "naïve café Ünïcödé 東京タワー 서울 Привет мир 🚀🦙 <|begin_of_text|> <s> </s> [INST] <|eot_id|>")

_HF_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model", "original_tokenizer.model")


def source_tokenizers(source) -> list[str]:
    """The tokenizer specs a weight source carries, best first."""
    if source.kind == "hf":
        return [str(source.path / name) for name in _HF_FILES if (source.path / name).is_file()]
    return [source.tokenizer] if source.tokenizer else []


def same_vocabulary(a, b) -> bool:
    if a.name == b.name:
        return True
    return (a.vocab_size, a.bos_id, a.eos_id) == (b.vocab_size, b.bos_id, b.eos_id) and \
        a.encode(PROBE) == b.encode(PROBE)


def tokenizer_mismatch(source, tokenizer) -> Optional[str]:
    """None when `source` carries no readable tokenizer or one with `tokenizer`'s vocabulary; else
    what it carries ("spec (fingerprint, N ids)")."""
    from dist_llama.data import build_tokenizer

    seen = []
    for spec in source_tokenizers(source):
        try:
            theirs = build_tokenizer(spec)
        except (ValueError, OSError):
            continue
        if same_vocabulary(theirs, tokenizer):
            return None
        seen.append(f"{spec} ({theirs.name}, {theirs.vocab_size} ids)")
    return seen[0] if seen else None
