"""Tensor + sequence parallelism (Megatron-style, with DTensor's parallelize_module), and loss parallel.

The plan is torchtitan's Llama plan. Per block, the residual stream is sharded on the sequence dim
(Shard(1)) between the projections; RMSNorms run on sequence shards (SequenceParallel); attention and
the FFN all-gather their input (Shard(1) -> Replicate), run column-parallel wq/wk/wv/w1/w3 on their
slice of the heads / hidden units, and row-parallel wo/w2 reduce-scatter back to sequence shards.
The output projection is column-parallel over the vocabulary: with loss parallel the logits stay
sharded on the vocab dim (a DTensor) and cross-entropy runs on the shards (no vocab all-gather).

One difference from torchtitan: the residual stream is kept as a DTensor (Shard(1)) rather than
the rank's local sequence slice, because Transformer.forward reads the sequence length off the hidden
state (RoPE table slice, attention mask), and a DTensor reports the global shape. So:
- tok_embeddings and wo/w2 return DTensors (use_local_output=False);
- a pipeline stage without tok_embeddings receives the rank's local sequence slice [B, S/tp, dim]
  as a plain tensor and wraps it (forward pre-hook); a stage without output returns the local slice
  [B, S/tp, dim] as a plain tensor (forward hook), so plain tensors travel between stages.

After apply_tp every parameter is a DTensor on the tp mesh: the RMSNorm weights and a reward model's
score head Replicate(),
tok_embeddings Shard(0) (vocab rows), wq/wk/wv/w1/w3/output Shard(0) (output features), wo/w2
Shard(1) (input features). Their gradients are DTensors with the same placements.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


class _PrepareHiddenInput(PrepareModuleInput):
    """PrepareModuleInput for the hidden-state argument only: the first positional argument (or the
    keyword `name`) goes Shard(1) -> Replicate (an all-gather over the sequence); every other
    argument (freqs_cis, mask: plain tensors, None or a BlockMask) passes through untouched, whatever
    the number of arguments. (Stock PrepareModuleInput requires the positional arity to equal
    len(input_layouts) exactly and ignores keyword arguments unless they are declared.)"""

    def __init__(self, name: str = "x"):
        super().__init__(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                         input_kwarg_layouts={name: Shard(1)},
                         desired_input_kwarg_layouts={name: Replicate()})

    def _prepare_input_fn(self, inputs, device_mesh):
        if not isinstance(inputs, tuple):
            inputs = (inputs,)
        if not inputs:
            return inputs
        first = self._prepare_input_arg(inputs[0], device_mesh, Shard(1), Replicate())
        return (first, *inputs[1:])


def _keep_grad_sharded_like(param: DTensor) -> None:
    """The vocab-parallel embedding's backward yields a Replicate (full-vocab) gradient for a Shard(0)
    weight, which would keep vocab x dim fp32 per TP rank (8.4 GB for 405B); slicing it back to the
    weight's placement is local. (FSDP2, when applied on top, replaces the parameter and does this itself.)"""
    def to_param_placement(grad):
        return grad if grad.placements == param.placements else grad.redistribute(placements=param.placements)

    param.register_hook(to_param_placement)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Shard `model` (a dist_llama Transformer, possibly a pipeline stage with some of tok_embeddings,
    norm, output set to None and layers removed) over the 1-D `tp_mesh`, in place.

    Works on a meta-device model (materialise with to_empty + init_weights afterwards) and on a
    materialised model whose ranks hold identical full weights (every rank's shard is then exactly
    the single-process slice; Replicate norms are taken as they are, not broadcast).

    loss_parallel=True: the logits are a DTensor [B, S, vocab] sharded on the vocab dim (Shard(2));
    compute the loss inside `torch.distributed.tensor.parallel.loss_parallel()` (see token_loss_sum)
    and run backward inside it too. False: the logits are a plain, full (replicated) tensor.
    The sequence length must be divisible by the tp degree.
    """
    tp = tp_mesh.size()
    args = model.args
    if args.n_heads % tp != 0 or args.kv_heads % tp != 0:
        raise ValueError(f"tensor parallel degree {tp} must divide n_kv_heads ({args.kv_heads}) "
                         f"and n_heads ({args.n_heads})")
    if tp == 1:
        return

    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                 use_local_output=False)
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if model.score is not None:
        _replicate_head(model.score, tp_mesh)
    if model.tok_embeddings is not None:
        _keep_grad_sharded_like(model.tok_embeddings.weight)

    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": _PrepareHiddenInput("x"),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": _PrepareHiddenInput("x"),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        if block is not None:
            parallelize_module(block, tp_mesh, block_plan)

    # Pipeline stages: plain local sequence slices travel between stages (see module docstring).
    if model.tok_embeddings is None:
        model.register_forward_pre_hook(_wrap_hidden_input(tp_mesh), with_kwargs=True)
    else:
        model.register_forward_pre_hook(_check_seq_len(tp), with_kwargs=True)
    if model.output is None and model.score is None:
        model.register_forward_hook(_unwrap_hidden_output)


def apply_tp_inference(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism for generation, in place, on a whole (meta or full) model:
    each rank holds its slice of the heads, hidden units and vocabulary rows; activations between
    the projections are plain full tensors (no sequence parallelism, so one new token a step works),
    the logits are gathered whole, and norms and a score head are replicated. The KV cache then holds
    each rank's share of the key/value heads."""
    tp = tp_mesh.size()
    args = model.args
    if args.n_heads % tp or args.kv_heads % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide n_kv_heads ({args.kv_heads}) and n_heads "
                         f"({args.n_heads})")
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if model.output is not None:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    block_plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                  "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                  "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(),
                  "feed_forward.w3": ColwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)


def _replicate_head(head: nn.Module, tp_mesh: DeviceMesh) -> None:
    """A reward model's score head (dim → 1) whole on every TP rank: one output feature cannot be
    sharded. Its input, the sequence-sharded norm output, is gathered first; its output is a plain
    full tensor, the same on every rank (and so its weight's gradient: no reduction needed)."""
    def gather(module, inputs, mesh):
        return tuple(x.redistribute(placements=(Replicate(),)) if isinstance(x, DTensor) else x for x in inputs)

    distribute_module(head, tp_mesh, input_fn=gather, output_fn=lambda module, out, mesh: out.to_local())


def _check_seq_len(tp: int):
    def hook(module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]
        if tokens.shape[1] % tp != 0:
            raise ValueError(f"sequence length {tokens.shape[1]} is not divisible by the tensor "
                             f"parallel degree {tp} (sequence parallelism shards it)")
    return hook


def _wrap_hidden_input(tp_mesh: DeviceMesh):
    def hook(module, args, kwargs):
        if args:
            h = args[0]
            if isinstance(h, torch.Tensor) and not isinstance(h, DTensor):
                h = DTensor.from_local(h, tp_mesh, (Shard(1),), run_check=False)
            return (h, *args[1:]), kwargs
        h = kwargs["tokens"]
        if isinstance(h, torch.Tensor) and not isinstance(h, DTensor):
            kwargs = {**kwargs, "tokens": DTensor.from_local(h, tp_mesh, (Shard(1),), run_check=False)}
        return args, kwargs
    return hook


def _unwrap_hidden_output(module, args, output):
    if isinstance(output, DTensor):
        return output.redistribute(placements=(Shard(1),)).to_local()
    return output


def loss_parallel_context(enabled: bool):
    """`loss_parallel()` when the logits are vocab-sharded DTensors, else a no-op context.
    Wrap both the loss computation and backward in it."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy over all tokens, for plain logits or vocab-sharded DTensor logits.

    logits: [B, S, vocab]; labels: [B, S] plain int64 tensor. With DTensor logits this must run
    inside `loss_parallel()` (and so must backward); the result is then a replicated scalar DTensor
    (call .full_tensor() or .to_local() for a plain tensor, e.g. for logging).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                           ignore_index=ignore_index)


def enable_async_tp() -> None:
    """Async tensor parallelism (parallel.async_tp): Inductor's micro-pipelining pass splits every
    all-gather → matmul and matmul → reduce-scatter pair of a compiled block into chunks, so each
    chunk's communication (through symmetric memory) overlaps the previous chunk's matmul. Only
    compiled graphs get it, hence validation's requirement of train.compile, CUDA and tp > 1.
    (torch >= 2.9 enables symmetric memory for every group itself: torchtitan's
    enable_symm_mem_for_group call is deprecated and no longer needed.)"""
    import torch._inductor.config

    # A process-wide Inductor switch, as torch offers it; every compiled block of this process is a
    # tensor-parallel one when it is set.
    torch._inductor.config._micro_pipeline_tp = True
