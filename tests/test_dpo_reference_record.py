"""DPO's reference (the starting weights, rebuilt at every restart) is recorded in the run directory
at the first start: a resume whose checkpoint.init_from now holds other weights is refused (exit 2,
naming dpo_reference.json and both identities) before any process group; untouched weights resume."""

from __future__ import annotations

import shutil

import pytest
import torch

from test_dpo import prefs  # noqa: F401  (the fixture: 200 synthetic pairs, Llama 3-style tokenizer)
from trainrun import DEBUG, TINY, train

MODEL_REFERENCE = ["train.dpo.reference=model", "train.peak_flops=1e12"]


@pytest.mark.timeout(300)
def test_swapped_init_weights_refuse_the_resume_and_untouched_ones_resume(prefs, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from dist_llama.train.cli import main
    from dist_llama.weights.export import main as export

    start, hf, run = tmp_path / "start", tmp_path / "hf", tmp_path / "run"
    train(1, *prefs, *MODEL_REFERENCE, "train.steps=1", f"train.run_dir={start}")
    assert export(["--checkpoint", str(start), "--out", str(hf)]) == 0
    dpo = [*prefs, *MODEL_REFERENCE, f"checkpoint.init_from={hf}", f"train.run_dir={run}"]
    losses, _ = train(1, *dpo, "train.steps=2")
    assert len(losses) == 2 and (run / "checkpoints" / "step-00000002").is_dir()

    weights = next(hf.glob("*.safetensors"))
    original = tmp_path / "original.safetensors"
    shutil.copy(weights, original)
    swapped = {k: v + 0.01 for k, v in load_file(weights).items()}  # same names and shapes, other values
    save_file(swapped, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["--config", DEBUG, *TINY, *dpo, "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dpo_reference.json" in err[0] and err[0].count("sha256 ") == 2, err
    assert not (run / "checkpoints" / "step-00000003").exists()

    shutil.copy(original, weights)  # the same content again (a new mtime: hashed, and equal)
    resumed, _ = train(1, *dpo, "train.steps=3")
    assert len(resumed) == 1, "resumed from step 2, not started over"
    assert torch.isfinite(torch.tensor(resumed)).all()
