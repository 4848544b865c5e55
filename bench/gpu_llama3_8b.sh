#!/usr/bin/env bash
# One GPU, a Llama-3-8B-shaped model (dim 4096, GQA 32/8, ffn 14336, vocab 128256) cut to a few
# layers, bf16 + FlexAttention document masks + torch.compile per block, 8192-token sequences:
#  1. bench/trainer_vs_bare.py: the trainer vs a bare loop side by side (both models resident, so
#     fewer layers: LAYERS_BENCH);
#  2. the trainer alone with as many layers as fit (LAYERS_TRAIN), steady-state tokens/s and MFU.
#  --quick: the same two steps on CPU with the debug model (seconds): checks the pipeline, not a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LAYERS_BENCH=${LAYERS_BENCH:-3}
LAYERS_TRAIN=${LAYERS_TRAIN:-8}
STEPS=${STEPS:-30}
common=(--config configs/llama3_8b.yaml data.seq_len=8192 train.global_batch_size=1 logging.wandb_mode=disabled)
bench_args=(--steps 5 --rounds 4)
case "${1:-}" in
  --quick) LAYERS_BENCH=1 LAYERS_TRAIN=2 STEPS=3 bench_args=(--quick)
    common=(--config configs/debug.yaml model.dim=64 data.seq_len=64 train.global_batch_size=2
            logging.wandb_mode=disabled logging.console=false) ;;
  "") ;;
  *) echo "usage: $0 [--quick] (settings come from the environment: LAYERS_BENCH, LAYERS_TRAIN, STEPS)" >&2; exit 2 ;;
esac
$PY bench/trainer_vs_bare.py "${common[@]}" model.n_layers="$LAYERS_BENCH" "${bench_args[@]}"
run_dir=$(mktemp -d)
$PY -m dist_llama.train "${common[@]}" model.n_layers="$LAYERS_TRAIN" train.steps="$STEPS" \
    checkpoint.enabled=false train.run_dir="$run_dir" train.log_interval=5
$PY - "$run_dir/metrics.jsonl" "$LAYERS_TRAIN" <<'PYEOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
steady = records[len(records) // 3:]  # drop compile and warm-up steps
tps = statistics.median(r["tokens_per_sec"] for r in steady)
mfu = statistics.median(r["mfu"] for r in steady)
print(f"trainer alone, {sys.argv[2]} layers: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% (PaLM formula, "
      f"989 TFLOP/s), peak memory {records[-1]['mem_gib']:.1f} GiB, loss {records[0]['loss']:.3f} -> "
      f"{records[-1]['loss']:.3f}")
PYEOF
