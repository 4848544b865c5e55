#!/usr/bin/env bash
# Create .venv (if missing) and install dist_llama with its test dependencies.
# torch is pinned to 2.13.0 here (a CPU wheel on these machines); the package itself accepts newer
# builds, so GPU users can install a CUDA torch first and then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
