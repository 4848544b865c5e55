"""A Llama 3 tiktoken file as a Hugging Face `tokenizer.json` (the `tokenizers` library's byte-level
BPE), so that AutoTokenizer loads an exported directory with the same ids. As transformers'
TikTokenConverter: tiktoken's ranks become the vocabulary (bytes spelled with GPT-2's byte-to-unicode
alphabet) and each token's merge is recovered by running BPE over its bytes with the lower ranks.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _spell(token: bytes) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in token)


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE joins last to make `token`, using only merges of lower rank."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            break
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def write_tokenizer_json(tok, out: Path) -> None:
    """tokenizer.json for a TiktokenTokenizer `tok` (its ranks, pattern and special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from dist_llama.data.tokenizer import LLAMA3_PAT_STR

    ranks = tok.model._mergeable_ranks
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges = [tuple(map(_spell, _merge_of(ranks, token)))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(sorted(tok.special_tokens, key=tok.special_tokens.get))
    bpe.save(str(out))
