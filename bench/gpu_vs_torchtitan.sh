#!/usr/bin/env bash
# torchtitan and dist_llama on the same GPU, side by side from one run: the same Llama-3-8B-shaped
# model (dim 4096, GQA 32/8, ffn 14336, vocab 128256) cut to LAYERS layers, the same sequence length,
# batch, activation checkpointing, compile and float8 settings, the same text (the King James corpus
# dist_llama ships), bf16 and FlexAttention document masks in both. Prints tokens/s, MFU and peak
# memory of each and their ratios.
#
#   bench/gpu_vs_torchtitan.sh                        # 8 layers, 8192 tokens, batch 1, compile, bf16
#   FLOAT8=1 bench/gpu_vs_torchtitan.sh               # float8 linear layers in both
#   LAYERS=16 AC=full bench/gpu_vs_torchtitan.sh      # more layers with full activation checkpointing
#   CHECK=1 bench/gpu_vs_torchtitan.sh                # no GPU: validate dist_llama's side of the config only
#   bench/gpu_vs_torchtitan.sh --quick                # the same check (CPU, seconds; what tests/test_bench.py runs)
#
# torchtitan and torchao are installed from the package index into a venv under WORK that sees this
# environment's packages (a .pth file naming its site-packages) with torch pinned to the version
# installed here, so both trainers run on the same torch build and pip never swaps it; nothing is
# installed into the current environment. Both runs use one process on GPU 0.
# Not matched, and shown in the table's notes: float8 recipes (torchtitan 0.3's converter offers
# rowwise scaling only; dist_llama uses torchao's tensorwise default with float8 FSDP all-gather),
# and what is compiled (torchtitan: the blocks and the loss; dist_llama: the blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --quick) CHECK=1 ;;  # nothing here runs without a GPU and the index: check what can be checked
  "") ;;
  *) echo "usage: $0 [--quick] (settings come from the environment: LAYERS, SEQ, ...)" >&2; exit 2 ;;
esac
ROOT=$PWD
PY=${PYTHON:-python3}
LAYERS=${LAYERS:-8}
SEQ=${SEQ:-8192}
BATCH=${BATCH:-1}
STEPS=${STEPS:-30}
AC=${AC:-none}          # none | full (dist_llama's "selective" is not torchtitan's, so it is not offered)
COMPILE=${COMPILE:-1}
FLOAT8=${FLOAT8:-0}
TORCHTITAN=${TORCHTITAN:-torchtitan==0.3.0}
TORCHAO=${TORCHAO:-torchao==0.18.0}
WORK=${WORK:-$(mktemp -d)}
case "$AC" in none|full) ;; *) echo "AC must be none or full, got $AC" >&2; exit 2 ;; esac
bool() { [ "$1" = 1 ] && echo true || echo false; }

dist_llama_args=(--config configs/llama3_8b.yaml model.n_layers="$LAYERS" data.path=kjv data.tokenizer=byte
  data.seq_len="$SEQ" train.global_batch_size="$BATCH" train.steps="$STEPS" parallel.ac="$AC"
  train.compile="$(bool "$COMPILE")" train.float8="$(bool "$FLOAT8")" train.dtype=bf16
  model.attn_impl=flex optim.warmup_steps=10 checkpoint.enabled=false logging.wandb_mode=disabled
  logging.console=false train.log_interval=1 train.run_dir="$WORK/dist_llama")

if [ "${CHECK:-0}" = 1 ]; then  # everything dist_llama checks before a process group, on this machine
  PYTHONPATH=$ROOT $PY - "${dist_llama_args[@]}" train.device=cpu train.float8=false <<'PYEOF'
import sys
from dist_llama.train.cli import parse_args, resolve_config
cfg, _ = resolve_config(*parse_args(sys.argv[1:]), world_size=1)
m = cfg.model
print(f"dist_llama side valid: {m.n_layers} layers, dim {m.dim}, vocab {m.vocab_size}, seq {cfg.data.seq_len}, "
      f"batch {cfg.train.global_batch_size}, ac {cfg.parallel.ac}, compile {cfg.train.compile}")
PYEOF
  exit 0
fi

echo "work directory: $WORK"
$PY -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
# (--system-site-packages would show the base interpreter's packages, not a venv's: torch unseen,
# and pip would pull another, multi-GB, torch for torchtitan's torch>=2.11 requirement.)
$PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
  > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_dist_llama_env.pth"
$PY -c "import torch; print(f'torch=={torch.__version__}')" > "$WORK/constraints.txt"
"$VPY" -m pip install -q -c "$WORK/constraints.txt" "$TORCHTITAN" "$TORCHAO"
"$VPY" -c "import torch, torchtitan, torchao; print('torch', torch.__version__, '| torchtitan', \
torchtitan.__version__, '| torchao', torchao.__version__, '|', torch.cuda.get_device_name(0))"

# torchtitan's inputs: the corpus as JSON lines, a byte-level tokenizer (256 byte tokens, BOS, EOS).
mkdir -p "$WORK/data" "$WORK/assets"
"$VPY" - "$WORK" <<'PYEOF'
import gzip, json, shutil, sys
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
work = Path(sys.argv[1])
with gzip.open("dist_llama/data/corpus/kjv.jsonl.gz", "rb") as src, open(work / "data/train.jsonl", "wb") as dst:
    shutil.copyfileobj(src, dst)
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
tok.save(str(work / "assets/tokenizer.json"))
(work / "assets/tokenizer_config.json").write_text(json.dumps(
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}))
PYEOF

echo "== dist_llama"
PYTHONPATH=$ROOT "$VPY" -m dist_llama.train "${dist_llama_args[@]}"
echo "== torchtitan"
LAYERS=$LAYERS SEQ=$SEQ BATCH=$BATCH STEPS=$STEPS AC=$AC COMPILE=$COMPILE FLOAT8=$FLOAT8 \
  ASSETS=$WORK/assets DATA=$WORK/data OUT=$WORK/torchtitan PYTHONPATH=$ROOT/bench \
  "$WORK/venv/bin/torchrun" --nproc_per_node 1 --standalone -m torchtitan.train \
  --module torchtitan_match --config dist_llama_match 2>&1 | tee "$WORK/torchtitan.log"

PYTHONPATH=$ROOT "$VPY" bench/gpu_vs_torchtitan_table.py "$WORK/dist_llama/metrics.jsonl" "$WORK/torchtitan.log" \
  "${dist_llama_args[@]}"
