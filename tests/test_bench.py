"""Every script under bench/ runs in its --quick mode (tiny sizes, seconds): a benchmark that nobody
runs for a while still works when someone does. Parametrised over the files found in bench/, so a
new script without --quick fails here."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_quick(script, tmp_path):
    path = BENCH / script
    assert '"--quick"' in path.read_text() or "--quick)" in path.read_text(), f"{script} has no --quick mode"
    runner = ["bash"] if path.suffix == ".sh" else [sys.executable]
    # TMPDIR: what the scripts leave in temporary directories goes with the test's. Inductor's cache
    # (bench/compile_speed.py) is kept apart from it, so that only the first run compiles cold.
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path),
           "PYTHON": sys.executable, "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "inductor")}
    proc = subprocess.run([*runner, str(path), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=140)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.strip(), proc.stderr[-3000:]  # it reports something
