#!/usr/bin/env bash
# Set up, then train the debug Llama on the embedded King James corpus on 2 gloo CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
rm -rf runs/quickstart
export WANDB_MODE=${WANDB_MODE:-disabled}
bash launch/train.sh -n 2 --config configs/debug.yaml train.steps=60 train.run_dir=runs/quickstart "$@"
echo "run directory: runs/quickstart (config.yaml, metrics.jsonl, events.jsonl, checkpoints/, logs/)"
