"""Data: tokenizers, shard preparation, the token dataset, packing and the distributed sampler.

    tok = build_tokenizer("byte")                       # or a tokenizer.json / tokenizer.model path
    ds = open_dataset("kjv", "byte")                    # or a directory from dist-llama-prepare
    loader = PackedLoader(ds, seq_len, global_batch_size, dp_rank, dp_size, seed=0)
    batch = loader.next_batch()                         # tokens, labels, doc_ids, positions
"""

from .dataset import DataError, TokenDataset
from .loader import PackedLoader
from .prepare import InputError, prepare
from .sources import BUILTIN_DATASETS, default_cache_dir, open_dataset
from .tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "TiktokenTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "build_tokenizer",
    "prepare",
    "InputError",
    "DataError",
    "TokenDataset",
    "open_dataset",
    "default_cache_dir",
    "BUILTIN_DATASETS",
    "PackedLoader",
]
