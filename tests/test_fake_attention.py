"""The fake step's CUDA attention (plan/fake_attention.py) against what FlexAttention allocates,
written out here: the output [B, Hq, S, D] in the inputs' dtype and the fp32 log-sum-exp [B, Hq, S]
kept for backward; dq, dk, dv (K/V at their own head count) in backward; no S x S tensor."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dist_llama.model.llama import CoreAttention
from dist_llama.plan.fake_attention import cuda_attention
from dist_llama.plan.memtrack import MemoryTracker

B, S, HQ, HKV, D = 2, 1024, 8, 2, 64


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = CoreAttention()


@pytest.mark.timeout(30)
def test_attention_allocates_output_and_logsumexp_only():
    holder = _Holder()
    with FakeTensorMode():
        q = torch.empty(B, S, HQ, D, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(B, S, HKV, D, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(B, S, HKV, D, dtype=torch.bfloat16, requires_grad=True)
        tracker = MemoryTracker([holder], [])
        tracker.register(q, k, v)
        inputs = tracker.total
        with cuda_attention([holder]), tracker:
            out = holder.core(q, k, v, None)
            after_forward = dict(tracker.current)
            out.sum().backward()
    saved = B * HQ * S * D * 2 + B * HQ * S * 4          # output (bf16) + log-sum-exp (fp32)
    assert after_forward["activations"] == saved
    # Forward's peak adds the fp32 row maxima; backward's adds dq, dk, dv and the fp32 row sums
    # (and the sum's gradient broadcast to the output's shape): all linear in S.
    grads = B * HQ * S * D * 2 + 2 * B * HKV * S * D * 2
    assert tracker.report.peak <= inputs + saved + grads + 2 * B * HQ * S * D * 2 + 2 * B * HQ * S * 4
    assert tracker.report.peak < B * HQ * S * S * 2  # one bf16 score matrix would exceed it
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.timeout(30)
def test_swap_is_undone():
    holder = _Holder()
    with cuda_attention([holder]):
        assert "forward" in vars(holder.core)
    assert "forward" not in vars(holder.core)


@pytest.mark.timeout(90)
def test_cli_memory_dry_run_prints_no_library_warnings():
    # tp2 x dp2 x pp2 on a CUDA target: FSDP2 warns that the stage returned a view and DTensor
    # that the 2-D gradient norm takes two all-reduces, in every fake run unless silenced.
    import subprocess
    import sys

    from conftest import ROOT

    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "--gpus", "8", "--rank", "0", "--hardware", "h100",
            "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=258",
            "data.seq_len=64", "train.global_batch_size=4", "parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2",
            "--dry-run", "--memory"]
    proc = subprocess.run([sys.executable, "-m", "dist_llama.plan.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory dry run" in proc.stdout
    assert proc.stderr == ""
