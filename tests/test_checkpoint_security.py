"""A checkpoint directory is untrusted input: a crafted DCP .metadata (a pickle that would run a
command when unpickled), with manifest.json rewritten so that its size and sha256 match, runs
nothing on resume, init_from, export or generate. Resume skips that checkpoint with an event and
falls back to the older one; the weight readers exit 2 naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

import rundir
from trainrun import DEBUG, TINY, train

RUN = ["train.steps=4", "checkpoint.interval=2", "checkpoint.async_save=false"]


class _Payload:
    """Unpickling this calls os.system: what a plain pickle.load of .metadata would run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _craft(step_dir, marker) -> None:
    """Replace .metadata by the payload and make manifest.json agree with it (size and sha256)."""
    data = pickle.dumps(_Payload(f"touch {marker}"))
    (step_dir / ".metadata").write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_the_restricted_unpickler_reads_real_metadata_and_refuses_the_rest(tmp_path):
    import torch.distributed.checkpoint as dcp

    from dist_llama.checkpoint_format.dcp_metadata import MetadataError, load_metadata, read_metadata

    state = {"w": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.zeros(2), "step": 3, "name": "x"}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    metadata = read_metadata(tmp_path / "ck")
    assert metadata.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert tuple(metadata.state_dict_metadata["w"].size) == (3, 4)
    marker = tmp_path / "pwned"
    for payload in (_Payload(f"touch {marker}"), {"not": "metadata"}):
        with pytest.raises(MetadataError, match="evil/.metadata"):
            load_metadata(pickle.dumps(payload), "evil/.metadata")
    with pytest.raises(MetadataError, match="refused global posix.system"):
        load_metadata(pickle.dumps(_Payload(f"touch {marker}")))
    assert not marker.exists()


@pytest.mark.timeout(300)
def test_crafted_metadata_runs_nothing_and_the_checkpoint_is_skipped(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    from dist_llama.config import EXIT_CONFIG
    from dist_llama.generate import main as generate_main
    from dist_llama.train.cli import main as train_main
    from dist_llama.weights.export import main as export_main

    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(1, f"train.run_dir={run}", *RUN)
    step4 = run / "checkpoints" / "step-00000004"
    _craft(step4, marker)
    crafted = tmp_path / "crafted"
    shutil.copytree(run, crafted)  # resume below saves step 4 again

    # The weight readers: exit 2 naming the file, nothing run.
    readers = {
        "export": lambda: export_main(["--checkpoint", str(crafted / "checkpoints" / "step-00000004"),
                                       "--out", str(tmp_path / "x")]),
        "generate": lambda: generate_main(["--checkpoint", str(crafted), "--prompt", "hi", "--max-new-tokens", "1",
                                           "--device", "cpu"]),
    }
    for who, reader in readers.items():
        code = reader()
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG and ".metadata" in err and "refused global" in err, (who, err)
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = train_main(["--config", DEBUG, f"train.run_dir={tmp_path / 'fresh'}", *TINY,
                       f"checkpoint.init_from={crafted / 'checkpoints' / 'step-00000004'}"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and ".metadata" in err and "Traceback" not in err, err
    assert not dist.is_initialized()
    assert not marker.exists()

    # Resume: step 4 is skipped (naming why), training goes on from step 2 exactly as an
    # uninterrupted run does.
    losses, params = train(1, f"train.run_dir={run}", *RUN[1:], "train.steps=5")
    assert not marker.exists()
    skipped = rundir.events(run, "checkpoint_skipped")
    assert [e["step"] for e in skipped] == [4] and "unsafe .metadata" in skipped[0]["reason"], skipped
    assert "refused global" in skipped[0]["reason"]
    ref_losses, ref_params = train(1, f"train.run_dir={tmp_path / 'ref'}", *RUN[1:], "train.steps=5")
    assert losses == ref_losses[2:]
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)
