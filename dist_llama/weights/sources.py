"""Where weights come from: a Hugging Face model directory, a Meta original directory, or a
dist_llama checkpoint. Each source knows its architecture (as ModelArgs), the names and shapes of
its tensors in dist_llama's (Meta's) naming, and reads a tensor or a slice of one without reading
the rest: safetensors slices lazily, Meta's .pth files are memory-mapped, DCP reads only the chunks
a request overlaps. Nothing is unpickled beyond what `torch.load(weights_only=True)` allows (DCP's
.metadata: dcp_metadata.SafeReader's restricted unpickler). Nothing a file claims is believed before
it is checked: config.json / params.json values (validate.py), safetensors headers against the file
(safetensors_file.py), Meta shards against each other; every tensor read is checked finite.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from dist_llama.model.args import ModelArgs, ffn_hidden_dim
from dist_llama.model.hf import args_from_hf_config, hf_to_meta_rows, meta_name
from dist_llama.weights.safetensors_file import SafetensorsFile
from dist_llama.weights.validate import WeightsError, check_finite, check_hf_config, check_meta_params
from dist_llama.checkpoint_format.files import member_path

Index = tuple[slice, ...]
"""A box of a tensor: one slice per leading dimension (missing trailing ones: everything)."""


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of a model with these args, in dist_llama's names, and its shape."""
    head_dim = args.dim // args.n_heads
    hidden = ffn_hidden_dim(args)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if args.score_head:  # a reward model
        shapes["score.weight"] = (1, args.dim)
    else:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * head_dim, args.dim),
            p + "attention.wk.weight": (args.kv_heads * head_dim, args.dim),
            p + "attention.wv.weight": (args.kv_heads * head_dim, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * head_dim),
            p + "feed_forward.w1.weight": (hidden, args.dim),
            p + "feed_forward.w2.weight": (args.dim, hidden),
            p + "feed_forward.w3.weight": (hidden, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    return shapes


def tensor_problem(source, args: ModelArgs) -> Optional[str]:
    """What is wrong with the source's tensor names and shapes for a model with `args` (headers
    only), naming the source and the tensor; None when it holds exactly that model's parameters."""
    expected = expected_shapes(args)
    names = set(source.names())
    for name, shape in expected.items():
        if name not in names:
            return f"{source.path}: tensor {name} is missing"
        if tuple(source.shape(name)) != shape:
            return f"{source.path}: tensor {name} has shape {tuple(source.shape(name))}, the model needs {shape}"
    extra = sorted(names - set(expected))
    if extra:
        return f"{source.path}: tensor {extra[0]} is not a parameter of this model ({len(extra)} such)"
    return None


def _box(shape: tuple[int, ...], index: Index) -> list[tuple[int, int]]:
    """(start, stop) per dimension of `index` applied to `shape`."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not readable JSON ({exc})") from None


# --- Hugging Face ---------------------------------------------------------------------------------
class HFSource:
    """A `save_pretrained` directory: config.json + model.safetensors, or shards with
    model.safetensors.index.json. wq/wk rows are permuted back to Meta's RoPE layout on read."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        config = _read_json(path / "config.json")
        check_hf_config(config, path / "config.json")
        try:
            self.args = args_from_hf_config(SimpleNamespace(**config))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path / 'config.json'}: not a Llama config this model can take ({exc})") from None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = _index_files(index)
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json "
                               "(only safetensors weights are read: .bin files would need unpickling)")
        self._where: dict[str, SafetensorsFile] = {}
        for name in files:
            try:  # a regular file in the directory: not /dev/zero, not a FIFO that blocks the open
                member_path(path, name, follow_symlinks=True)
            except (OSError, ValueError) as exc:
                raise WeightsError(f"{path}: weight file {exc}") from None
            handle = SafetensorsFile(path / name)
            for key in handle.tensors:
                if key in self._where:
                    raise WeightsError(f"{path}: tensor {key} is in both {self._where[key].path.name} and {name}")
                self._where[key] = handle
        self._hf_names = {}
        for key in self._where:
            if not key.endswith("rotary_emb.inv_freq"):  # derived, not a parameter
                # a key that is not one of ours keeps its own name, so the check can name it
                self._hf_names[meta_name(key) or key] = key
        if "output.weight" not in self._hf_names and "tok_embeddings.weight" in self._hf_names \
                and not self.args.score_head:
            self._hf_names["output.weight"] = self._hf_names["tok_embeddings.weight"]  # tied embeddings
        self.tokenizer = _hf_tokenizer(path)

    def names(self) -> list[str]:
        return list(self._hf_names)

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._hf_names[name]
        return self._where[key].tensors[key][1]

    def read(self, name: str, index: Index = ()) -> torch.Tensor:
        key = self._hf_names[name]
        file = self._where[key]
        box = _box(self.shape(name), index)
        module = name.split(".")[-2]
        if module not in ("wq", "wk"):
            return check_finite(file.read(key, box), file.path, key)
        # HF rotates half-split pairs: rows are permuted within each head. Read the whole heads
        # the requested rows fall in, permute them back, keep the requested rows.
        head_dim = self.args.dim // self.args.n_heads
        (r0, r1), *rest = box
        h0, h1 = r0 // head_dim, math.ceil(r1 / head_dim)
        block = check_finite(file.read(key, [(h0 * head_dim, h1 * head_dim), *rest]), file.path, key)
        block = hf_to_meta_rows(block, h1 - h0) if h1 > h0 else block
        return block[r0 - h0 * head_dim: r1 - h0 * head_dim]


def _index_files(index: Path) -> list[str]:
    """The weight files a model.safetensors.index.json names: plain file names in its directory."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map must be an object of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or name in (".", ".."):
            raise WeightsError(f"{index}: weight_map names {name!r}, not a file of this directory")
        if not (index.parent / name).is_file():
            raise WeightsError(f"{index}: weight_map names {name}, which is missing (or not a regular file)")
    return files


def _hf_tokenizer(path: Path) -> Optional[str]:
    for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (path / name).is_file():
            return str(path / name)
    return None


# --- Meta -----------------------------------------------------------------------------------------
class MetaSource:
    """Meta's original release: params.json + consolidated.NN.pth, one file per model-parallel rank.
    A tensor split over the files is merged along the dimension its shards differ from the full
    shape in (Llama 2 splits the embedding along dim, Llama 3 along the vocabulary)."""

    kind = "meta"

    def __init__(self, path: Path, max_seq_len: int):
        self.path = path
        params = _read_json(path / "params.json")
        check_meta_params(params, path / "params.json")
        self.files = _meta_files(path)
        # Only the shapes are kept: a mapped file's pages would stay in memory while it is open.
        self.shards = [{name: t.shape for name, t in self._open(f).items()} for f in self.files]
        _check_meta_shards(self.files, self.shards)
        # Llama 2's params.json says vocab_size -1 (the tokenizer's); the output layer knows it,
        # split over the files along the vocabulary.
        vocab = sum(shard.get("output.weight", (0,))[0] for shard in self.shards)
        self.args = _args_from_meta_params(params, max_seq_len, path / "params.json", vocab)
        self.full = expected_shapes(self.args)
        self.tokenizer = str(path / "tokenizer.model") if (path / "tokenizer.model").is_file() else None

    @staticmethod
    def _open(file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 (truncated zip, a pickle that is not plain weights, ...)
            raise WeightsError(f"{file}: not a readable weights-only checkpoint ({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise WeightsError(f"{file}: must hold a dict of tensor name -> tensor, got {type(state).__name__}")
        return state

    def names(self) -> list[str]:
        return [n for n in self.shards[0] if not n.endswith("rope.freqs")]

    def _split_dim(self, name: str) -> Optional[int]:
        piece = self.shards[0][name]
        full = self.full.get(name, piece)
        diff = [d for d, (a, b) in enumerate(zip(piece, full)) if a != b]
        return diff[0] if len(self.shards) > 1 and diff else None

    def shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.shards[0][name])
        dim = self._split_dim(name)
        if dim is not None:
            shape[dim] = sum(s[name][dim] for s in self.shards)
        return tuple(shape)

    def read(self, name: str, index: Index = ()) -> torch.Tensor:
        box = _box(self.shape(name), index)
        dim = self._split_dim(name)
        if dim is None or any(a == b for a, b in box):  # replicated, or an empty shard
            piece = self._open(self.files[0])[name][tuple(slice(a, b) for a, b in box)]
            return check_finite(piece, self.files[0], name).clone()
        pieces, start = [], 0
        for file, shapes in zip(self.files, self.shards):
            stop = start + shapes[name][dim]
            lo, hi = max(box[dim][0], start), min(box[dim][1], stop)
            if lo < hi:
                local = list(box)
                local[dim] = (lo - start, hi - start)
                piece = self._open(file)[name][tuple(slice(a, b) for a, b in local)]
                pieces.append(check_finite(piece, file, name).clone())
            start = stop
        return torch.cat(pieces, dim=dim)


def _meta_files(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, one per model-parallel rank, none missing."""
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise WeightsError(f"{path}: no consolidated.*.pth files")
    numbers = [re.fullmatch(r"consolidated\.(\d+)\.pth", f.name) for f in files]
    for i, (file, m) in enumerate(zip(files, numbers)):
        if m is None or int(m.group(1)) != i:
            raise WeightsError(f"{path}: {len(files)} shard files, but {file.name} is not consolidated.{i:02d}.pth "
                               "(a shard is missing, or a stray file)")
    return files


def _check_meta_shards(files: list[Path], shards: list[dict]) -> None:
    """Every shard holds the same tensors, each shaped like shard 0's except along one dimension
    (the one it was split on)."""
    for file, shard in zip(files, shards):
        for name in sorted(shards[0].keys() ^ shard.keys())[:1]:
            has, lacks = (files[0], file) if name in shards[0] else (file, files[0])
            raise WeightsError(f"{lacks}: tensor {name} is missing (it is in {has.name}; shards must hold the "
                               "same tensors)")
        for name, shape in shard.items():
            first = shards[0][name]
            if len(shape) != len(first) or sum(a != b for a, b in zip(shape, first)) > 1:
                raise WeightsError(f"{file}: tensor {name} has shape {tuple(shape)}, {files[0].name} has "
                                   f"{tuple(first)}; shards may differ along one dimension only")


def _args_from_meta_params(p: dict, max_seq_len: int, where: Path, vocab_from_weights: int) -> ModelArgs:
    vocab = p.get("vocab_size", -1)
    if vocab_from_weights < 1 and vocab < 1:
        raise WeightsError(f"{where}: vocab_size is -1 and there is no output.weight to take it from")
    try:
        args = ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                         n_kv_heads=p.get("n_kv_heads"), vocab_size=vocab if vocab > 0 else vocab_from_weights,
                         multiple_of=p.get("multiple_of", 256), ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
                         norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 10000.0)),
                         max_seq_len=max_seq_len)
    except KeyError as exc:
        raise WeightsError(f"{where}: missing {exc}") from None
    if p.get("use_scaled_rope"):
        # Meta's Llama 3.1 scaling: params.json may hold the factor and the high-frequency factor
        # (llama-models' rope_scaling_factor, rope_high_freq_factor; 8 and 4 when absent); the
        # low-frequency factor 1 and the original context 8192 are constants of Meta's code.
        args.use_scaled_rope = True
        args.rope_scale_factor = float(p.get("rope_scaling_factor") or 8.0)
        args.rope_high_freq_factor = float(p.get("rope_high_freq_factor") or 4.0)
    return args


# --- dist_llama -----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_single_process_load():
    """DCP warns on every no_dist load that it assumes one process, which is what was asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield

def _run_model(config: dict) -> tuple[ModelArgs, Optional[str]]:
    """The architecture and tokenizer a dist_llama run recorded in its config.yaml."""
    model = dict(config.get("model", {}))
    args = ModelArgs(**{k: v for k, v in model.items() if k in ModelArgs.__dataclass_fields__})
    return args, (config.get("data") or {}).get("tokenizer")


class DCPSource:
    """One dist_llama checkpoint in DCP format (any layout): tensors are read from the chunks each
    request overlaps. The architecture comes from the run's config.yaml."""

    kind = "dist_llama"
    PREFIX = "model."

    def __init__(self, step_dir: Path, config: dict):
        from dist_llama.checkpoint_format.dcp_metadata import SafeReader

        self.path = step_dir
        self.args, self.tokenizer = _run_model(config)
        self.reader = SafeReader(str(step_dir))  # load_into reads through it too
        try:
            metadata = self.reader.read_metadata()
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{step_dir / '.metadata'}: not readable ({exc})") from None
        # A PPO run's value model (`value_model.*`) is no part of the policy it holds.
        self._meta = {k[len(self.PREFIX):]: v for k, v in metadata.state_dict_metadata.items()
                      if k.startswith(self.PREFIX) and not k.startswith(self.PREFIX + "value_model.")}

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name].size)

    def read(self, name: str, index: Index = ()) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        meta = self._meta[name]
        full = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with quiet_single_process_load():
            dcp.load({self.PREFIX + name: full}, storage_reader=self.reader, no_dist=True)
        return check_finite(full[tuple(slice(a, b) for a, b in _box(full.shape, index))], self.path, name)


class DeepSpeedSource:
    """A dist_llama checkpoint written by parallel.engine=deepspeed: the fp32 master weights,
    reassembled from every rank's ZeRO partitions by DeepSpeed's own merge (zero_to_fp32), after
    reading each file with weights_only=True. Unlike the other sources this holds the whole model
    in memory (the partitions are flat buffers over all parameters)."""

    kind = "dist_llama"

    def __init__(self, step_dir: Path, config: dict):
        self.path = step_dir
        self.args, self.tokenizer = _run_model(config)
        try:
            self._state = _deepspeed_fp32_state(step_dir / "deepspeed")
        except Exception as exc:  # noqa: BLE001 (missing files, unexpected content)
            raise WeightsError(f"{step_dir}: not a readable DeepSpeed checkpoint ({type(exc).__name__}: {exc})") from None

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def read(self, name: str, index: Index = ()) -> torch.Tensor:
        t = self._state[name]
        return check_finite(t[tuple(slice(a, b) for a, b in _box(t.shape, index))], self.path, name).clone()


def _deepspeed_fp32_state(directory: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 merge on files read with weights_only=True (its own parse functions
    unpickle anything, so they are redone here with the same fields)."""
    from deepspeed.utils import zero_to_fp32 as z

    from dist_llama.checkpoint_format.deepspeed import safe_load

    states = []
    for file in z.get_model_state_files(str(directory)):
        sd = safe_load(file, "cpu")
        states.append(z.zero_model_state(
            buffers={k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items()
                     if k in sd[z.BUFFER_NAMES]},
            param_shapes=sd[z.PARAM_SHAPES], shared_params=[[k, v] for k, v in sd["shared_params"].items()],
            ds_version=sd.get(z.DS_VERSION), frozen_param_shapes=sd.get(z.FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(z.FROZEN_PARAM_FRAGMENTS)))
    optim = [safe_load(f, "cpu")[z.OPTIMIZER_STATE_DICT] for f in z.get_optim_files(str(directory))]
    stage, world = optim[0][z.ZERO_STAGE], optim[0][z.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if world != len(optim):
        raise ValueError(f"{len(optim)} optimizer files for {world} ranks")
    if stage <= 2:
        flat = [o[z.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
        state = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat, states, False,
                                                             optim[0].get(z.PARAM_ALIGNMENT_PADDINGS))
    else:
        flat = [o[z.FP32_FLAT_GROUPS] for o in optim]
        state = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, states, False)
    return {k: v for k, v in z.to_torch_tensor(state).items() if k.endswith(".weight")}
