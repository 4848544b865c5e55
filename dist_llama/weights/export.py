"""dist-llama-export: any checkpoint dist_llama can read (a run or step directory of any layout, a
Hugging Face or Meta directory) → a Hugging Face directory that transformers loads as it is, or
Meta's original format.

Hugging Face output: config.json (rope_scaling of type llama3 when the model scales RoPE),
generation_config.json, model.safetensors or shards of at most --max-shard-gb with their index, and
the tokenizer files when the run's tokenizer can be carried over. The safetensors files are written
by streaming: every header is computed from the shapes first, then tensors are read, converted and
written one at a time, so peak memory is about one tensor (twice, while it is converted), not the
model. Meta output holds the whole model in memory: torch.save writes one pickle of a dict.

Everything is written into a directory beside --out that is renamed to --out at the end (`staged`):
a failed export leaves nothing at --out. Reading a run that is still training holds the checkpoint
being read (weights/run_source.py): the run's retention leaves it until the export is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from dist_llama.config import EXIT_CONFIG
from dist_llama.config.errors import ArgumentParser as OneLineParser
from dist_llama.model.args import ModelArgs, context_length, ffn_hidden_dim
from dist_llama.model.hf import hf_name, meta_to_hf_rows, rope_heads
from dist_llama.weights import WeightsError, expected_shapes, open_weights

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": ffn_hidden_dim(args), "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.dim // args.n_heads, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": context_length(args),
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "rope_scaling": None,
    }
    if args.score_head:  # a reward model: transformers' sequence classifier, one label
        # HF reads the score at the last token that is not pad_token_id: BOS starts sequences but
        # never ends one (EOS may: Llama 2's turns end with </s>).
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                      id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=bos_id if bos_id is not None else 0)
    if args.use_scaled_rope:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                                  "low_freq_factor": args.rope_low_freq_factor,
                                  "high_freq_factor": args.rope_high_freq_factor,
                                  "original_max_position_embeddings": args.rope_old_context_len}
    return config


def _converted(source, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = source.read(name).to(dtype)
    heads = rope_heads(name, source.args)
    return (meta_to_hf_rows(t, heads) if heads else t).contiguous()


def write_safetensors_streaming(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                                produce) -> None:
    """A safetensors file of `tensors` (name, shape), all of `dtype`, whose data `produce(name)`
    returns one at a time: the header first (offsets follow from the shapes), then each tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors:
            t = produce(name)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, name
            f.write(t.view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else t.numpy().tobytes())


def export_hf(source, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> list[Path]:
    """Write the Hugging Face directory; returns the weight files written."""
    args = source.args
    shapes = expected_shapes(args)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = [out / "model.safetensors"] if len(shards) == 1 else [
        out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    ours_by_hf = {hf_name(n): n for n in shapes}
    for file, shard in zip(files, shards):
        write_safetensors_streaming(file, [(hf_name(n), s) for n, s in shard], dtype,
                                    lambda key: _converted(source, ours_by_hf[key], dtype))
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())},
                 "weight_map": {hf_name(n): f.name for f, shard in zip(files, shards) for n, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    bos, eos = _tokenizer_ids(source.tokenizer)
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype, bos, eos), indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    copy_tokenizer(source.tokenizer, out)
    return files


META_ROPE_CONSTANTS = {"rope_low_freq_factor": 1.0, "rope_old_context_len": 8192}
"""Llama 3.1 scaling values Meta's code fixes (params.json cannot say otherwise)."""


def meta_params(args: ModelArgs) -> dict:
    """Meta's params.json of `args`: every scaling value its convention holds (use_scaled_rope,
    rope_scaling_factor, rope_high_freq_factor); WeightsError naming a value it cannot hold."""
    if args.score_head:
        raise WeightsError("--format meta: this is a reward model (a score head), which Meta's format has no "
                           "place for; export --format hf (LlamaForSequenceClassification)")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": args.use_scaled_rope}
    if args.use_scaled_rope:
        for field, fixed in META_ROPE_CONSTANTS.items():
            if getattr(args, field) != fixed:
                raise WeightsError(f"--format meta: the model's {field} is {getattr(args, field)}, but Meta's "
                                   f"params.json cannot hold it (Meta's code fixes it at {fixed}); export "
                                   "--format hf instead, whose rope_scaling holds every value")
        params.update(rope_scaling_factor=args.rope_scale_factor, rope_high_freq_factor=args.rope_high_freq_factor)
    return params


def export_meta(source, out: Path, dtype: torch.dtype) -> list[Path]:
    args = source.args
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2))
    state = {name: source.read(name).to(dtype).contiguous() for name in expected_shapes(args)}
    torch.save(state, out / "consolidated.00.pth")
    if source.tokenizer and Path(source.tokenizer).is_file() and not source.tokenizer.endswith(".json"):
        shutil.copyfile(source.tokenizer, out / "tokenizer.model")
    return [out / "consolidated.00.pth"]


def _tokenizer_ids(spec: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if not spec:
        return None, None
    from dist_llama.data import build_tokenizer

    try:
        tok = build_tokenizer(spec)
    except (ValueError, OSError):
        return None, None
    return tok.bos_id, tok.eos_id


def copy_tokenizer(spec: Optional[str], out: Path) -> Optional[str]:
    """Carry the run's tokenizer over in the form AutoTokenizer loads; returns what was written."""
    if not spec or not Path(spec).is_file():
        return None  # the byte tokenizer, or none recorded: transformers has no equivalent to write
    from dist_llama.data import build_tokenizer

    tok = build_tokenizer(spec)
    if spec.endswith(".json"):
        shutil.copyfile(spec, out / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    elif tok.name.startswith("tiktoken"):
        from dist_llama.weights.hf_tokenizer import write_tokenizer_json

        write_tokenizer_json(tok, out / "tokenizer.json")
        shutil.copyfile(spec, out / "original_tokenizer.model")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}
    else:
        shutil.copyfile(spec, out / "tokenizer.model")
        # Llama 2's tokenizer prepends BOS to every text, as LlamaTokenizer does when told so.
        config = ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
                  if tok.name.startswith("sentencepiece") else {"tokenizer_class": "PreTrainedTokenizerFast"})
    decode = tok.decode
    config.update(bos_token=decode([tok.bos_id]) if tok.bos_id is not None else None,
                  eos_token=decode([tok.eos_id]), model_max_length=1 << 30)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.name


@contextlib.contextmanager
def staged(out: Path):
    """A directory beside `out` to write the export into, renamed to `out` once every file is
    written: a failed export (a tokenizer that cannot be copied, a full disk) leaves no
    complete-looking directory and no truncated file at `out`. `out` is absent or empty."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # the empty directory --out named
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="dist-llama-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory, step directory, HF or Meta directory")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32 (default: lossless, the training master weights) or bf16 (half the size)")
    parser.add_argument("--format", choices=("hf", "meta"), default="hf")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (hf format)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise WeightsError(f"--out {out}: exists and is not an empty directory")
        if not 0 < args.max_shard_gb < float("inf"):  # nan too
            raise WeightsError(f"--max-shard-gb: must be a positive finite number, got {args.max_shard_gb}")
        source = open_weights(args.checkpoint)  # every tensor checked against the architecture it reads
        if args.format == "meta":
            meta_params(source.args)  # refused before anything is written
    except WeightsError as exc:
        print(f"dist-llama-export: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    dtype = DTYPES[args.dtype]
    try:
        with staged(out) as tmp:
            if args.format == "hf":
                files = export_hf(source, tmp, dtype, int(args.max_shard_gb * 2**30))
            else:
                files = export_meta(source, tmp, dtype)
            total = sum(f.stat().st_size for f in files)
    except (ValueError, OSError) as exc:  # a tokenizer that is not one, a full disk: nothing at --out
        print(f"dist-llama-export: {exc} (nothing written to {out})", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ValueError) else 1
    print(f"exported {source.kind} weights from {source.path} to {out} ({args.format}, {args.dtype}, "
          f"{len(files)} file(s), {total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
