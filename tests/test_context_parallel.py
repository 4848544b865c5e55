"""Context parallelism: logits, losses and gradients of cp ranks (gloo, fork-started) against the
single-process model on the full sequence, with and without document masks."""


import pytest
import torch

from sharp import randomize_
import torch.distributed as dist
import torch.nn.functional as F

from dist_llama.testing import run_ranks
from dist_llama.model import ModelArgs, Transformer
from dist_llama.parallel.context import (
    CPAttentionMask,
    CPCoreAttention,
    apply_cp,
    cp_gathered_indices,
    cp_global_indices,
    cp_shard,
    cp_shard_batch,
    cp_unshard,
)

pytestmark = pytest.mark.timeout(60)

VOCAB, SEQ, ROWS = 300, 32, 2  # ROWS per data-parallel replica


def build_model(seed: int = 0) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                     max_seq_len=64, attn_impl="sdpa")
    torch.manual_seed(seed)
    model = Transformer(args)
    return randomize_(model, seed)


def packed(lengths_per_row: list[list[int]], first_doc: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (global document indices, as the loader gives them) and positions restarting per document."""
    doc_ids, positions, doc = [], [], first_doc
    for lengths in lengths_per_row:
        assert sum(lengths) == SEQ
        doc_ids.append(torch.cat([torch.full((n,), doc + i) for i, n in enumerate(lengths)]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
        doc += len(lengths)
    return torch.stack(doc_ids), torch.stack(positions)


# Boundaries at 3, 9, 22 (inside 4- and 8-token chunks); the 13-token document spans several chunks
# and ranks; the second rows have a 1-token document and one covering all but the tail.
DOCS = {
    "causal": None,
    "docs": [[3, 6, 13, 10], [1, 27, 4]],
    "docs_b": [[17, 15], [5, 5, 5, 5, 5, 7]],
}


def make_batch(case: str, replica: int) -> dict:
    g = torch.Generator().manual_seed(100 + replica)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    if DOCS[case] is None:
        return {"tokens": tokens, "labels": labels, "doc_ids": None, "positions": None}
    doc_ids, positions = packed(DOCS[case], first_doc=1000 + 50 * replica)
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids, "positions": positions}


def forward_backward(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cp_rank_fn(cp: int, dp: int, cases: list[str], checkpoint: bool):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
        cp_mesh, replica = mesh["cp"], mesh["dp"].get_local_rank()
        cp_rank, cp_group = cp_mesh.get_local_rank(), cp_mesh.get_group()
        model = build_model()
        keys_before = list(model.state_dict().keys())
        apply_cp(model, cp_mesh)
        assert list(model.state_dict().keys()) == keys_before
        assert isinstance(model.mask, CPAttentionMask)
        assert all(isinstance(layer.attention.core, CPCoreAttention) for layer in model.layers.values())
        if checkpoint:  # after CP, as the parallelize order has it: recomputation gathers again
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for name in list(model.layers.keys()):
                model.layers[name] = checkpoint_wrapper(model.layers[name])
        out = {}
        for case in cases:
            batch = cp_shard_batch(make_batch(case, replica), cp_rank, cp)
            logits, loss, grads = forward_backward(model, batch)
            for g in grads.values():
                dist.all_reduce(g, group=cp_group)  # the trainer's dp_cp reduction, cp part
            grads = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads.items()}
            out[case] = dict(logits=logits, loss=loss, grads=grads)
        return dict(replica=replica, cp_rank=cp_rank, out=out)
    finally:
        dist.destroy_process_group()


def reference(case: str, replica: int):
    return forward_backward(build_model(), make_batch(case, replica))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cp,dp,checkpoint", [(2, 1, False), (4, 1, False), (2, 2, True)],
                         ids=["cp2", "cp4", "dp2xcp2-ac"])
def test_cp_matches_single_process(cp, dp, checkpoint):
    cases = list(DOCS)
    results = run_ranks(cp_rank_fn, cp * dp, cp, dp, cases, checkpoint, timeout=50)
    worst = dict(logits=0.0, loss=0.0, grads=0.0)
    for replica in range(dp):
        ranks = sorted((r for r in results if r["replica"] == replica), key=lambda r: r["cp_rank"])
        assert [r["cp_rank"] for r in ranks] == list(range(cp))
        for case in cases:
            ref_logits, ref_loss, ref_grads = reference(case, replica)
            logits = cp_unshard([r["out"][case]["logits"] for r in ranks], dim=1)
            loss = sum(r["out"][case]["loss"] for r in ranks)
            errs = dict(logits=rel(logits, ref_logits), loss=abs((loss - ref_loss) / ref_loss).item(),
                        grads=max(rel(ranks[0]["out"][case]["grads"][n], g) for n, g in ref_grads.items()))
            assert errs["logits"] <= 1e-5, (case, replica, errs)
            assert errs["loss"] <= 1e-5, (case, replica, errs)
            assert errs["grads"] <= 1e-4, (case, replica, errs)
            for r in ranks[1:]:  # all-reduced: every cp rank holds the same sum
                for n, g in r["out"][case]["grads"].items():
                    assert torch.allclose(g, ranks[0]["out"][case]["grads"][n], rtol=0, atol=1e-6), n
            worst = {k: max(worst[k], v) for k, v in errs.items()}
    print(f"cp={cp} dp={dp} ac={checkpoint}: max rel err logits {worst['logits']:.2e}, "
          f"loss {worst['loss']:.2e}, grads {worst['grads']:.2e}")

    # Not vacuous: the document masks change the reference (so they are what CP reproduced).
    with torch.no_grad():
        model, batch = build_model(), make_batch("docs", 0)
        leaky = model(batch["tokens"], positions=batch["positions"])
        masked = model(batch["tokens"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    assert rel(leaky, masked) > 1e-2


# ---------------------------------------------------------------- sharding helpers (no process group)


def test_cp_shard_chunk_assignment():
    for cp in (1, 2, 3, 4):
        for seq in (2 * cp, 4 * cp, 24 * cp):
            chunk = seq // (2 * cp)
            x = torch.arange(seq).view(1, seq).expand(3, seq) * 10 + torch.arange(3).view(3, 1)  # [3, seq]
            parts = []
            for rank in range(cp):
                want = [i for c in (rank, 2 * cp - 1 - rank) for i in range(c * chunk, (c + 1) * chunk)]
                assert cp_global_indices(seq, rank, cp).tolist() == want
                local = cp_shard(x, rank, cp)
                assert torch.equal(local, x[:, want])
                assert torch.equal(cp_shard(x.t(), rank, cp, dim=0), x.t()[want])
                parts.append(local)
            gathered = torch.cat([cp_global_indices(seq, r, cp) for r in range(cp)])
            assert torch.equal(cp_gathered_indices(seq, cp), gathered)
            assert torch.equal(cp_unshard(parts, dim=1), x)
    # Load balance: every rank holds the same number of causal (query, key) pairs.
    seq, cp = 64, 4
    work = [sum(int(i) + 1 for i in cp_global_indices(seq, r, cp)) for r in range(cp)]
    assert len(set(work)) == 1


def test_cp_shard_requires_divisible_seq():
    with pytest.raises(ValueError, match=r"seq_len=12.*2\*cp=8"):
        cp_shard(torch.zeros(2, 12), 0, 4)
    with pytest.raises(ValueError, match=r"seq_len=6.*2\*cp=4"):
        cp_global_indices(6, 1, 2)
    cp_shard(torch.zeros(2, 16), 3, 4)  # divisible: fine


def test_cp_shard_batch_fills_positions():
    tokens = torch.arange(16).view(2, 8)
    out = cp_shard_batch({"tokens": tokens, "labels": tokens + 1, "doc_ids": None, "positions": None}, 1, 2)
    assert out["doc_ids"] is None
    assert out["positions"].tolist() == [[2, 3, 4, 5]] * 2
    assert out["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]


# ---------------------------------------------------------------- FlexAttention path (CUDA only)


@pytest.mark.gpu  # deselected by default; run on a GPU machine with: pytest -m gpu tests
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seq,cp", [(512, 2), (1024, 4), (256, 4)])  # 256/4: 64-token queries, < one block
@pytest.mark.parametrize("docs", [False, True])
def test_cp_flex_block_mask_matches_full_attention(seq, cp, docs):
    """Each cp rank's BlockMask (Q_LEN=S_loc, KV_LEN=S_full) against gathered K/V, simulated in one
    process, reproduces full-sequence attention and its gradients."""
    from dist_llama.model.llama import CoreAttention, build_attention_mask
    from dist_llama.parallel.context import build_cp_attention_mask

    dev, B, Hq, Hkv, D = torch.device("cuda"), 2, 4, 2, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, seq, h, D, device=dev, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    doc_ids = None
    if docs:  # boundaries off the chunk edges, one document across several chunks
        cuts = torch.tensor([0, 37, 41, seq // 2 + 3, seq - 5, seq])
        lengths = cuts.diff()
        doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), lengths),
                               torch.repeat_interleave(torch.arange(len(lengths)), lengths.flip(0))]).to(dev)
    core = CoreAttention()
    ref = core(q, k, v, build_attention_mask(doc_ids, seq, dev, "sdpa"))
    grad_out = torch.randn(ref.shape, device=dev, generator=g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)

    k_all = torch.cat([cp_shard(k, r, cp) for r in range(cp)], 1)  # gathered order
    v_all = torch.cat([cp_shard(v, r, cp) for r in range(cp)], 1)
    full_doc_ids = None if doc_ids is None else torch.cat([cp_shard(doc_ids, r, cp) for r in range(cp)], 1)
    outs = []
    for r in range(cp):
        local_doc_ids = None if doc_ids is None else cp_shard(doc_ids, r, cp)
        mask = build_cp_attention_mask(local_doc_ids, full_doc_ids, seq // cp, r, cp, dev, "flex")
        assert mask.seq_lengths == (seq // cp, seq)
        outs.append(core(cp_shard(q, r, cp), k_all, v_all, mask))
    out = cp_unshard(outs, dim=1)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert rel(out, ref) <= 1e-4, rel(out, ref)
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) <= 1e-4, rel(a, b)
