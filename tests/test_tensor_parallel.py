"""Tensor + sequence parallelism (and FSDP x TP) against an independent single-process reference.

The reference runs in the pytest process; the ranks are fork-started gloo processes that build the
same model from the same seed, parallelise it, and return full (gathered) logits, gradients, grad
norm and updated parameters for comparison.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from sharp import randomize_
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dist_llama.testing import run_ranks
from dist_llama.model import ModelArgs, Transformer
from dist_llama.parallel.dims import ParallelDims
from dist_llama.parallel.tensor import apply_tp, loss_parallel_context, token_loss_sum
from dist_llama.train.optim import build_optimizer, clip_grad_norm_

VOCAB = 300
SEQ = 16
MAX_NORM = 0.5  # below the reference grad norm, so clipping really scales the update
# Adam's first update is lr * g / (|g| + eps), about lr * sign(g): for gradients near eps it turns the
# fp32 reduction-order differences of a sharded run (~1e-6 of the largest gradient) into differences
# of a good fraction of lr. An eps well above those differences keeps the comparison well-posed.
OPTIM = SimpleNamespace(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-5, weight_decay=0.1)
# Document lengths per row (2-3 documents each); RoPE positions restart at every document.
DOCS = [[5, 7, 4], [9, 7], [3, 10, 3], [16]]


def tiny_args(n_kv_heads: int = 2) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB,
                     multiple_of=32, max_seq_len=64, rope_theta=10000.0, attn_impl="sdpa")


def build_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Weights large enough that attention is far from uniform (masks and RoPE matter), and norm
    gains away from 1 (a wrong norm shard would show)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    return randomize_(model, seed)


def make_batch(rows: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (rows, SEQ), generator=g)
    labels = torch.randint(VOCAB, (rows, SEQ), generator=g)
    labels[0, 2] = -100  # an ignored token
    doc_ids = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(DOCS[r])])[None]
                         for r in range(rows)])
    positions = torch.cat([torch.cat([torch.arange(n) for n in DOCS[r]])[None] for r in range(rows)])
    return dict(tokens=tokens, labels=labels, doc_ids=doc_ids, positions=positions)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def reference(args: ModelArgs, batch: dict) -> dict:
    """Single process: logits, summed loss, grads of (loss / tokens), clipped norm, one AdamW step."""
    model = build_model(args)
    logits = model(batch["tokens"], batch["doc_ids"], batch["positions"])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
    n_tokens = (batch["labels"] != -100).sum().item()
    (loss / n_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    build_optimizer(model, OPTIM).step()
    return dict(logits=logits.detach(), loss=loss.item(), grads=grads, norm=norm.item(),
                params={n: p.detach().clone() for n, p in model.named_parameters()})


def _train_step(args: ModelArgs, batch: dict, dp_shard: int, tp: int, loss_parallel: bool) -> dict:
    """One rank: TP (then FSDP over dp_shard), forward on this dp rank's rows, the trainer's loss
    expression under loss_parallel, backward, clip_grad_norm_, AdamW step. Returns full tensors."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    try:
        meshes = ParallelDims(pp=1, dp_replicate=1, dp_shard=dp_shard, cp=1, tp=tp).build_mesh("cpu")
        model = build_model(args)  # identical full weights on every rank (the CPU path)
        apply_tp(model, meshes["tp"], loss_parallel=loss_parallel)
        if dp_shard > 1:
            for block in model.layers.values():
                fully_shard(block, mesh=meshes.dp_shard_cp)
            fully_shard(model, mesh=meshes.dp_shard_cp)
        placements = {n: tuple(p.placements) for n, p in model.named_parameters()}

        rows = batch["tokens"].shape[0] // dp_shard
        dp_rank = meshes.dp.get_local_rank()
        mb = {k: v[dp_rank * rows:(dp_rank + 1) * rows] for k, v in batch.items()}
        n_tokens = (batch["labels"] != -100).sum().item()  # global, as the trainer's tokens_per_step
        scale = dp_shard / n_tokens  # FSDP averages gradients over dp

        logits = model(mb["tokens"], mb["doc_ids"], mb["positions"])
        logits_is_dtensor = isinstance(logits, DTensor)
        with loss_parallel_context(loss_parallel):
            loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="sum")
            helper_loss = token_loss_sum(logits, mb["labels"])
            (loss * scale).backward()
        loss_local = full(loss).detach().clone()
        assert torch.equal(full(helper_loss).detach(), loss_local)
        dist.all_reduce(loss_local, group=meshes.dp.get_group())

        grad_types = {type(p.grad).__name__ for p in model.parameters()}
        # a gradient whose local shard is larger than its parameter's wastes memory (not math); norm
        # weights' gradients stay Partial (the same size) until clipping and the step reduce them
        misplaced = [n for n, p in model.named_parameters() if p.grad.to_local().shape != p.to_local().shape]
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        norm = clip_grad_norm_(params, MAX_NORM)
        build_optimizer(model, OPTIM).step()
        return dict(logits=full(logits).detach(), logits_is_dtensor=logits_is_dtensor,
                    loss=loss_local.item(), grads=grads, grad_types=grad_types, misplaced=misplaced,
                    norm=norm.item(), norm_type=type(norm).__name__, placements=placements,
                    params={n: full(p).detach().clone() for n, p in model.named_parameters()})
    finally:
        dist.destroy_process_group()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(results: list, ref: dict, dp_shard: int, loss_parallel: bool) -> None:
    rows = ref["logits"].shape[0] // dp_shard
    for rank, out in enumerate(results):
        dp_rank = rank // (len(results) // dp_shard)  # tp innermost
        ref_logits = ref["logits"][dp_rank * rows:(dp_rank + 1) * rows]
        assert out["logits_is_dtensor"] == loss_parallel
        assert rel_err(out["logits"], ref_logits) <= 1e-5, f"rank {rank} logits"
        assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"rank {rank} loss"
        assert out["grad_types"] == {"DTensor"}, out["grad_types"]
        assert out["misplaced"] == [], f"rank {rank}: gradients larger than their parameters' shards"
        assert out["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert rel_err(out["grads"][name], g) <= 1e-4, f"rank {rank} grad {name}"
        assert out["norm"] == pytest.approx(ref["norm"], rel=1e-5), f"rank {rank} grad norm"
        for name, p in ref["params"].items():
            assert rel_err(out["params"][name], p) <= 1e-4, f"rank {rank} param {name}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,n_kv_heads,loss_parallel", [(2, 2, True), (4, 4, True), (2, 2, False)],
                         ids=["tp2", "tp4", "tp2-no-loss-parallel"])
def test_tp_matches_single_process(tp, n_kv_heads, loss_parallel):
    args, batch = tiny_args(n_kv_heads), make_batch(2)
    ref = reference(args, batch)
    assert ref["norm"] > MAX_NORM  # clipping is exercised
    results = run_ranks(_train_step, tp, args, batch, 1, tp, loss_parallel, timeout=100)
    check(results, ref, dp_shard=1, loss_parallel=loss_parallel)
    placements = results[0]["placements"]
    assert placements["layers.0.attention.wq.weight"] == (Shard(0),)
    assert placements["layers.0.attention.wo.weight"] == (Shard(1),)
    assert placements["layers.0.attention_norm.weight"] == (Replicate(),)
    assert placements["tok_embeddings.weight"] == (Shard(0),)


@pytest.mark.timeout(120)
def test_fsdp_x_tp_matches_single_process():
    args, batch = tiny_args(2), make_batch(4)
    ref = reference(args, batch)
    assert ref["norm"] > MAX_NORM
    results = run_ranks(_train_step, 4, args, batch, 2, 2, True, timeout=100)
    check(results, ref, dp_shard=2, loss_parallel=True)
    # [dp_shard, tp] placements; FSDP shards dim 0 on top of TP's (a _StridedShard where TP also
    # shards dim 0).
    placements = results[0]["placements"]
    for name, tp_placement in [("layers.0.attention.wq.weight", Shard(0)),
                               ("layers.0.attention.wo.weight", Shard(1)), ("norm.weight", Replicate())]:
        assert getattr(placements[name][0], "dim", None) == 0, placements[name]
        assert placements[name][1] == tp_placement, placements[name]


def _meta_and_stages(args: ModelArgs, batch: dict) -> dict:
    """(a) apply_tp on a meta-device model, to_empty, init_weights (runs on DTensors), then load the
    reference weights shard by shard; (b) the model cut into two pipeline stages, each TP-ed."""
    dist.init_process_group("gloo")
    try:
        mesh = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=2).build_mesh("cpu")["tp"]
        src = build_model(args)
        with torch.device("meta"):
            model = Transformer(args)
        apply_tp(model, mesh)
        model.to_empty(device="cpu")
        model.init_weights(buffer_device=torch.device("cpu"))
        model(batch["tokens"]).sum().backward()  # an initialised meta-built model trains
        model.zero_grad()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.to_local().copy_(distribute_tensor(src.get_parameter(name).detach(), mesh,
                                                     p.placements).to_local())
        meta_logits = model(batch["tokens"], batch["doc_ids"], batch["positions"]).full_tensor()

        stage0, stage1 = copy.deepcopy(src), copy.deepcopy(src)
        del stage0.layers["1"]
        stage0.norm = stage0.output = None
        del stage1.layers["0"]
        stage1.tok_embeddings = None
        apply_tp(stage0, mesh)
        apply_tp(stage1, mesh)
        hidden = stage0(batch["tokens"], batch["doc_ids"], batch["positions"])
        hidden_shape, hidden_type = tuple(hidden.shape), type(hidden).__name__
        logits = stage1(hidden, doc_ids=batch["doc_ids"], positions=batch["positions"])
        with loss_parallel_context(True):
            token_loss_sum(logits, batch["labels"]).backward()
        grads = {n: p.grad.full_tensor() for stage in (stage0, stage1) for n, p in stage.named_parameters()}
        return dict(meta_logits=meta_logits.detach(), stage_logits=logits.full_tensor().detach(),
                    hidden_shape=hidden_shape, hidden_type=hidden_type, grads=grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_meta_device_and_pipeline_stages():
    args, batch = tiny_args(2), make_batch(2)
    model = build_model(args)
    ref_logits = model(batch["tokens"], batch["doc_ids"], batch["positions"])
    F.cross_entropy(ref_logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").backward()
    for out in run_ranks(_meta_and_stages, 2, args, batch, timeout=100):
        assert rel_err(out["meta_logits"], ref_logits.detach()) <= 1e-5
        # Plain local sequence shards travel between stages.
        assert out["hidden_type"] == "Tensor" and out["hidden_shape"] == (2, SEQ // 2, args.dim)
        assert rel_err(out["stage_logits"], ref_logits.detach()) <= 1e-5
        for name, p in model.named_parameters():
            assert rel_err(out["grads"][name], p.grad) <= 1e-4, name


def _apply_bad_tp(args: ModelArgs) -> str:
    dist.init_process_group("gloo")
    try:
        mesh = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=2).build_mesh("cpu")["tp"]
        with torch.device("meta"):
            model = Transformer(args)
        try:
            apply_tp(model, mesh)
        except ValueError as e:
            return str(e)
        return "no error"
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_tp_must_divide_n_kv_heads():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=VOCAB, multiple_of=32)
    messages = run_ranks(_apply_bad_tp, 2, args, timeout=50)
    assert all("n_kv_heads" in m for m in messages), messages
