"""checkpoint.init_from: check a weight source against the model config before any weight is read,
then load it into this rank's model parts, whatever the layout.

A rank reads only what it holds: a sharded (DTensor) parameter takes the box of the global tensor
its local shard covers (safetensors slices, memory-mapped .pth files, DCP chunks), a pipeline stage
only its own layers.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dist_llama.config import ConfigError
from dist_llama.model.args import ModelArgs, ffn_hidden_dim
from dist_llama.model.init import canonical_name
from dist_llama.weights.sources import DCPSource, quiet_single_process_load
from dist_llama.weights.validate import check_finite

ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                       "norm_eps", "rope_theta", "use_scaled_rope", "rope_scale_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_old_context_len", "context_len")
"""ModelArgs fields a checkpoint determines (max_seq_len and attn_impl are the run's own choice;
context_len is carried along for export, not checked)."""
_ARCHITECTURE = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope")
_SCALED_ROPE = ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_old_context_len")


def check_source(source, args: ModelArgs) -> None:
    """Raise ConfigError unless `source` is a model with `args`: every field that decides a tensor's
    shape, naming the key and both values. Its tensors' names and shapes were checked against its own
    architecture when it was opened (open_weights), so agreeing here is agreeing tensor for tensor."""
    fields = _ARCHITECTURE + (_SCALED_ROPE if args.use_scaled_rope or source.args.use_scaled_rope else ())
    for field in fields:
        ours, theirs = getattr(args, field), getattr(source.args, field)
        if ours != theirs:
            key = "model.n_kv_heads" if field == "kv_heads" else f"model.{field}"
            raise ConfigError(key, f"checkpoint has {theirs}, config has {ours} (checkpoint.init_from={source.path})")
    if source.args.score_head and not args.score_head:
        raise ConfigError("checkpoint.init_from", f"{source.path} is a reward model (a score head, no output "
                          "projection): only train.objective=reward can start from it")
    if ffn_hidden_dim(args) != ffn_hidden_dim(source.args):
        raise ConfigError("model.ffn_dim_multiplier", f"checkpoint's FFN hidden size is {ffn_hidden_dim(source.args)}, "
                          f"the config's (ffn_dim_multiplier={args.ffn_dim_multiplier}, multiple_of="
                          f"{args.multiple_of}) is {ffn_hidden_dim(args)} (checkpoint.init_from={source.path})")


def _local_box(param: DTensor) -> tuple[slice, ...]:
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def new_head(source, args: ModelArgs) -> bool:
    """Whether a model with `args` started from `source` gets a newly initialised score head (a
    reward model from a language model)."""
    return args.score_head and not source.args.score_head


@torch.no_grad()
def load_into(part: nn.Module, source) -> None:
    """Copy the source's values into every parameter of `part` (plain or sharded, any dtype); a
    reward model's score head keeps its initialisation when the source has none.
    WeightsError (naming file and tensor) for a value that is not finite: each rank checks what it
    read, so the caller must agree on the outcome across ranks."""
    params = {canonical_name(name): p for name, p in part.named_parameters()}
    if "score.weight" not in source.names():  # a reward model from a language model: the head stays new
        params.pop("score.weight", None)
    if isinstance(source, DCPSource):
        import torch.distributed.checkpoint as dcp

        # DCP reshards by itself: each rank reads the chunks its DTensor shards overlap.
        with quiet_single_process_load():
            dcp.load({DCPSource.PREFIX + name: p for name, p in params.items()}, storage_reader=source.reader,
                     no_dist=True)
        for name, param in params.items():
            check_finite(param.to_local() if isinstance(param, DTensor) else param, source.path, name)
        return
    for name, param in params.items():
        if isinstance(param, DTensor):
            param.to_local().copy_(source.read(name, _local_box(param)))
        else:
            param.copy_(source.read(name))
