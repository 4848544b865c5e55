#!/usr/bin/env bash
# Train with torchrun on this machine: launch/train.sh -n RANKS --config configs/X.yaml [key=value ...]
# Multi-node: the same on every node, plus --nnodes N --rdzv-endpoint HOST:PORT --rdzv-id JOB.
# See dist_llama/launch/local.py (or --help) for the options and where logs go.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$here/.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m dist_llama.launch.local "$@"
