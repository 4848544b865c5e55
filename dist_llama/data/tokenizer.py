"""Tokenizers: a small common interface over bytes, tiktoken (Llama 3), SentencePiece (Llama 2) and
Hugging Face files. ``build_tokenizer`` tells the file formats apart by content, not by file name
(Llama 2 and Llama 3 both call theirs ``tokenizer.model``).

Every tokenizer has ``encode(text, bos=False, eos=False) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id``, ``eos_id`` and ``name``. ``name`` is a short fingerprint that changes
when the tokenizer changes (it is stored in prepared datasets and checked when they are opened).

Text that happens to contain special-token strings (``<|end_of_text|>``, ``</s>``...) is encoded
as ordinary text, as Meta does for pretraining data: only ``bos=True`` / ``eos=True`` add them.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "TiktokenTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "build_tokenizer",
    "LLAMA3_PAT_STR",
    "LLAMA3_SPECIAL_TOKENS",
]


class Tokenizer(abc.ABC):
    """Base class and protocol of every tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS prepended / EOS appended when asked."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens included as their strings)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-text id, or None if this tokenizer has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short fingerprint, e.g. ``"byte"`` or ``"tiktoken:<sha256 prefix of the file>"``."""

    def special_id(self, token: str) -> int | None:
        """The id of a special token by its string (``"<|eot_id|>"``), or None if this tokenizer has
        none: chat templates insert such tokens by id, never by encoding their text."""
        return None

    def encode_arrays(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        """Bulk path used by dataset preparation: one int64 array per text.

        Subclasses override it with something faster (vectorized / multi-threaded)."""
        return [np.asarray(self.encode(t, bos=bos, eos=eos), dtype=np.int64) for t in texts]

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name} has no BOS token (prepare the data without BOS)")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, BOS = 256, EOS = 257 (vocab_size 258)."""

    BOS = 256
    EOS = 257

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._frame(list(text.encode("utf-8")), bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def encode_arrays(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        out = []
        for t in texts:
            body = np.frombuffer(t.encode("utf-8"), dtype=np.uint8)
            arr = np.empty(len(body) + int(bos) + int(eos), dtype=np.int64)
            if bos:
                arr[0] = self.BOS
            if eos:
                arr[-1] = self.EOS
            arr[int(bos) : int(bos) + len(body)] = body
            out.append(arr)
        return out

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def name(self) -> str:
        return "byte"


# Llama 3 pre-tokenizer regex and special tokens, as in meta-llama/llama-models
# (models/llama3_1/api/tokenizer.py; later Llama 3.2+ files insert "<|image|>" at index 11, which
# shifts the reserved tokens by one — Llama 3.1's order is used here).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED))
]

# tiktoken cannot encode more than ~400k characters at once, and is very slow on long runs of
# whitespace / non-whitespace (openai/tiktoken#195): split such text first, as Meta does.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_TIKTOKEN_MAX_RUN + 1, _TIKTOKEN_MAX_RUN + 1))


def _tiktoken_pieces(text: str) -> list[str]:
    """Cut ``text`` into pieces tiktoken handles well (no-op for normal text)."""
    cuts = set(range(_TIKTOKEN_MAX_CHARS, len(text), _TIKTOKEN_MAX_CHARS))
    for m in _LONG_RUN.finditer(text):
        cuts.update(range(m.start() + _TIKTOKEN_MAX_RUN, m.end(), _TIKTOKEN_MAX_RUN))
    if not cuts:
        return [text]
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _file_sha256(path: str) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


class TiktokenTokenizer(Tokenizer):
    """A Llama 3 ``tokenizer.model`` (tiktoken BPE: lines ``base64(token) rank``).

    The 256 Llama 3.1 special tokens follow the base vocabulary: ``<|begin_of_text|>`` = base + 0
    (BOS), ``<|end_of_text|>`` = base + 1 (EOS), ``<|eot_id|>`` = base + 9, ...
    """

    def __init__(self, path: str | os.PathLike):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"tiktoken tokenizer file not found: {path}")
        _, sha = _file_sha256(path)
        # expected_hash makes tiktoken's path-keyed file cache safe when the file at `path` changes.
        try:
            ranks = load_tiktoken_bpe(path, expected_hash=sha)
        except Exception as e:  # tiktoken raises ValueError / binascii errors on malformed files
            raise ValueError(f"{path}: not a tiktoken BPE file (lines 'base64(token) rank'): {e}") from None
        if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: BPE ranks must be exactly 0..N-1 (got {len(ranks)} entries)")
        n_base = len(ranks)
        self.path = path
        self.n_base = n_base
        self.special_tokens: dict[str, int] = {t: n_base + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._name = f"tiktoken:{sha[:16]}"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in _tiktoken_pieces(text):
            # encode_ordinary == encode(allowed_special=set(), disallowed_special=()):
            # special-token strings in the text are plain text.
            ids.extend(self.model.encode_ordinary(piece))
        return self._frame(ids, bos, eos)

    def encode_arrays(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        pieces, owner = [], []
        for i, t in enumerate(texts):
            for p in _tiktoken_pieces(t):
                pieces.append(p)
                owner.append(i)
        encoded = self.model.encode_ordinary_batch(pieces) if pieces else []
        per_text: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, encoded):
            per_text[i].extend(ids)
        return [np.asarray(self._frame(ids, bos, eos), dtype=np.int64) for ids in per_text]

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode([int(i) for i in ids])

    def special_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)

    @property
    def vocab_size(self) -> int:
        return self.n_base + LLAMA3_NUM_SPECIAL_TOKENS

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def name(self) -> str:
        return self._name


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[EOS]")


class _FileTokenizer(Tokenizer):
    """A tokenizer that reads its vocabulary size, BOS, EOS and name from a file once, at construction."""

    _vocab_size: int
    _bos: int | None
    _eos: int
    _name: str

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def name(self) -> str:
        return self._name


class HFTokenizer(_FileTokenizer):
    """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library).

    BOS / EOS come from ``bos_id`` / ``eos_id`` when given, else from the first of the usual names
    found in the vocabulary (``<|begin_of_text|>``, ``<s>``, ... / ``<|end_of_text|>``, ``</s>``,
    ``<|endoftext|>``, ...). A tokenizer without BOS is allowed (``bos_id`` None); without EOS
    it is an error. The tokenizer's own post-processor (automatic BOS) is not applied.
    """

    def __init__(self, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _HFTok

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"Hugging Face tokenizer file not found: {path}")
        _, sha = _file_sha256(path)
        try:
            self.model = _HFTok.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json: {e}") from None
        # Special-token strings inside the text are encoded as plain text (like tiktoken above).
        self.model.encode_special_tokens = True
        self.path = path
        self._vocab_size = self.model.get_vocab_size(with_added_tokens=True)

        def find(names):
            for n in names:
                i = self.model.token_to_id(n)
                if i is not None:
                    return i
            return None

        overridden = bos_id is not None or eos_id is not None
        self._bos = bos_id if bos_id is not None else find(_BOS_NAMES)
        self._eos = eos_id if eos_id is not None else find(_EOS_NAMES)
        if self._eos is None:
            raise ValueError(
                f"{path}: cannot determine the EOS token (none of {', '.join(_EOS_NAMES)} is in the "
                "vocabulary); pass eos_id explicitly"
            )
        for what, i in (("bos_id", self._bos), ("eos_id", self._eos)):
            if i is not None and not 0 <= i < self._vocab_size:
                raise ValueError(f"{path}: {what}={i} is outside the vocabulary (size {self._vocab_size})")
        self._name = f"hf:{sha[:16]}" + (f":bos={self._bos}:eos={self._eos}" if overridden else "")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._frame(list(self.model.encode(text, add_special_tokens=False).ids), bos, eos)

    def encode_arrays(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        encs = self.model.encode_batch(list(texts), add_special_tokens=False) if texts else []
        return [np.asarray(self._frame(list(e.ids), bos, eos), dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_id(self, token: str) -> int | None:
        # added (special) tokens only: a merge that happens to spell "<|eot_id|>" is ordinary text
        for i, added in self.model.get_added_tokens_decoder().items():
            if added.content == token and added.special:
                return i
        return None


class _NotSentencePiece(ValueError):
    """The file does not parse as a SentencePiece model (as opposed to a model that is unusable)."""


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (a serialized ``ModelProto``): Llama 2's ``tokenizer.model``.

    Ids are the library's own ``encode`` with BOS / EOS framed around them as Meta's Llama 2
    tokenizer does; BOS / EOS / vocabulary come from the model (Llama 2: unk 0, BOS 1, EOS 2, no
    pad, 32000 ids). Control symbols in the text (``<s>``, ``</s>``) stay plain text, as
    SentencePiece never produces them from text. Round trips are exact for models trained like
    Llama 2's (identity normalization, no whitespace folding, byte fallback), except for the
    library's own whitespace marker U+2581 in the text, which comes back as a space; a model that
    NFKC-normalizes or folds whitespace changes the text by design.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"SentencePiece model file not found: {path}")
        # Loaded from the bytes that were hashed, so the name always describes the loaded model.
        data, sha = _file_sha256(path)
        try:
            if not data:  # the library would silently skip loading empty bytes
                raise ValueError("the file is empty")
            self.model = sentencepiece.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # RuntimeError from the C++ parser (which also checks the model)
            raise _NotSentencePiece(f"{path}: not a SentencePiece model (serialized ModelProto): {e}") from None
        self.path = path
        self._vocab_size = self.model.vocab_size()
        bos, eos = self.model.bos_id(), self.model.eos_id()
        self._bos = bos if bos >= 0 else None
        if eos < 0:
            raise ValueError(f"{path}: the SentencePiece model has no EOS token (eos_id=-1); documents "
                             "need one to be separated in the token stream")
        self._eos = eos
        # sentencepiece's decode drops control ids (BOS / EOS); the other tokenizers show them as
        # text, so decode splits around them.
        self._control = frozenset(i for i in range(self._vocab_size) if self.model.is_control(i))
        self._name = f"sentencepiece:{sha[:16]}"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._frame(list(self.model.encode(text)), bos, eos)

    def encode_arrays(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        encoded = self.model.encode(list(texts)) if texts else []  # multi-threaded in the library
        return [np.asarray(self._frame(ids, bos, eos), dtype=np.int64) for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._control:
                out += [self.model.decode(run), self.model.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self.model.decode(run))
        return "".join(out)


_FORMATS = (
    "a Hugging Face tokenizer.json (JSON), a tiktoken BPE file (Llama 3 tokenizer.model: lines "
    "'base64(token) rank') or a SentencePiece model (Llama 2 tokenizer.model: a serialized ModelProto)"
)
# The first line of a tiktoken file: printable ASCII only. JSON starts with "{", and a SentencePiece
# ModelProto's first record holds the binary score and type of its first piece (NUL bytes and
# control codes), so none of the three formats is mistaken for another.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")


def _sniff(path: str) -> str:
    """``"hf"``, ``"tiktoken"`` or ``"sentencepiece"`` (the last one to be confirmed by loading)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "hf"
    first = head.lstrip(b" \t\r\n").split(b"\n", 1)[0]  # tiktoken skips blank lines
    if _TIKTOKEN_LINE.fullmatch(first):
        return "tiktoken"
    return "sentencepiece"


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` → ByteTokenizer; an existing file → HFTokenizer, TiktokenTokenizer or
    SentencePieceTokenizer, whichever format its content is in (not its name). Anything else →
    ValueError naming the file and the accepted formats."""
    spec = os.fspath(spec)
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise ValueError(
            f"unknown tokenizer {spec!r}: expected 'byte' or a tokenizer file ({_FORMATS}); no such file exists"
        )
    kind = _sniff(spec)
    if kind == "hf":
        return HFTokenizer(spec)
    if kind == "tiktoken":
        return TiktokenTokenizer(spec)
    try:
        return SentencePieceTokenizer(spec)
    except _NotSentencePiece:
        raise ValueError(f"{spec}: not a tokenizer file; expected 'byte' or {_FORMATS}") from None
