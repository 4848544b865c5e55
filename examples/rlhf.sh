#!/usr/bin/env bash
# Llama 2-Chat's loop on 2 gloo ranks: pretrain → SFT → reward model → rejection sampling → SFT on the
# best answers → PPO against the reward model (train.objective=ppo), each started from the previous run.
#   examples/rlhf.sh CHAT.jsonl PREFS.jsonl [TOKENIZER]
# CHAT.jsonl's conversations are the SFT data and, without their final answers, the prompts of
# rejection sampling and PPO; PREFS.jsonl the reward model's pairs. The PPO run's metrics.jsonl has
# reward_raw, kl, rollout_share per iteration; the last lines print them.
# The settings are for the debug model on CPU ranks: Llama 2's own are optim.lr=1e-6 (constant),
# train.global_batch_size=512, train.ppo.mini_batch_size=64, train.ppo.kl_coef=0.01 (0.005 for 34B/70B).
set -euo pipefail
CHAT=$1 PREFS=$2 TOKENIZER=${3:-byte}
RUNS=${RUNS:-runs/rlhf}
TRAIN=(torchrun --standalone --nproc_per_node 2 -m dist_llama.train --config configs/debug.yaml
       data.tokenizer="$TOKENIZER" parallel.dp_shard=2 train.device=cpu data.eval_fraction=0 logging.console=false)
ROUNDS=(torchrun --standalone --nproc_per_node 2 -m dist_llama.rejection)

dist-llama-prepare --tokenizer "$TOKENIZER" --format chat --out "$RUNS/data/chat" --force "$CHAT"
dist-llama-prepare --tokenizer "$TOKENIZER" --format preference --out "$RUNS/data/prefs" --force "$PREFS"

"${TRAIN[@]}" train.steps=${PRETRAIN_STEPS:-100} train.run_dir="$RUNS/pretrained"   # data.path=kjv: any text corpus
"${TRAIN[@]}" train.objective=sft checkpoint.init_from="$RUNS/pretrained" data.path="$RUNS/data/chat" \
    train.steps=60 optim.lr=1e-3 optim.warmup_steps=5 train.run_dir="$RUNS/sft"
"${TRAIN[@]}" train.objective=reward checkpoint.init_from="$RUNS/sft" data.path="$RUNS/data/prefs" \
    train.steps=40 optim.lr=1e-4 optim.warmup_steps=5 train.run_dir="$RUNS/reward"

# Rejection sampling: 4 answers per prompt from the SFT model, the reward model keeps the best.
"${ROUNDS[@]}" --policy "$RUNS/sft" --reward "$RUNS/reward" --prompts "$CHAT" --samples 4 --max-new-tokens 24 \
    --temperature 1.0 --out "$RUNS/rs/samples.jsonl" --sft-out "$RUNS/rs/best.jsonl"
dist-llama-prepare --tokenizer "$TOKENIZER" --format chat --out "$RUNS/data/best" --force "$RUNS/rs/best.jsonl"
"${TRAIN[@]}" train.objective=sft checkpoint.init_from="$RUNS/sft" data.path="$RUNS/data/best" \
    train.steps=30 optim.lr=3e-4 optim.warmup_steps=5 train.run_dir="$RUNS/sft2"

# PPO: policy and reference from the second SFT, the value model from the reward model (InstructGPT),
# rewards as Llama 2 (whitened logit of the score, minus β·KL per token); a constant LR.
"${TRAIN[@]}" train.objective=ppo checkpoint.init_from="$RUNS/sft2" data.path="$RUNS/data/chat" \
    train.ppo.reward="$RUNS/reward" train.ppo.value_init=reward train.ppo.kl_coef=0.05 \
    train.global_batch_size=16 train.ppo.mini_batch_size=8 train.ppo.max_new_tokens=24 \
    train.steps=${PPO_STEPS:-20} optim.lr=1e-4 train.ppo.value_lr=1e-4 optim.warmup_steps=0 optim.min_lr_ratio=1 \
    checkpoint.interval=10 train.run_dir="$RUNS/ppo"
python - "$RUNS/ppo/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"iteration {r['step']:3d}  reward {r['reward_raw']:.3f}  kl {r['kl']:+.3f}  rollout share {r['rollout_share']:.2f}")
PY
