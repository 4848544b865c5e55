#!/usr/bin/env bash
# Post-training on 2 gloo ranks: pretrain, then SFT on chat data, then DPO and a reward model on preference pairs,
# each started from the previous run (checkpoint.init_from), resumable, and answers in the chat
# template. TOKENIZER must have a chat template the data needs: a Llama 3 tokenizer (headers,
# <|eot_id|>) or any other (Llama 2's [INST] format, e.g. "byte").
#   examples/post_train.sh CHAT.jsonl PREFS.jsonl [TOKENIZER]
set -euo pipefail
CHAT=$1 PREFS=$2 TOKENIZER=${3:-byte}
RUNS=${RUNS:-runs/post_train}
TRAIN=(torchrun --standalone --nproc_per_node 2 -m dist_llama.train --config configs/debug.yaml
       data.tokenizer="$TOKENIZER" parallel.dp_shard=2 train.device=cpu data.eval_fraction=0)

dist-llama-prepare --tokenizer "$TOKENIZER" --format chat --out "$RUNS/data/chat" --force "$CHAT"
dist-llama-prepare --tokenizer "$TOKENIZER" --format preference --out "$RUNS/data/prefs" --force "$PREFS"

"${TRAIN[@]}" train.steps=100 train.run_dir="$RUNS/pretrained"      # data.path=kjv: any text corpus
"${TRAIN[@]}" train.objective=sft checkpoint.init_from="$RUNS/pretrained" data.path="$RUNS/data/chat" \
    train.steps=60 optim.lr=1e-3 optim.warmup_steps=5 train.run_dir="$RUNS/sft"
# The reference model is the SFT weights (init_from), frozen; Llama 3's options: NLL term, eot masked.
# train.dpo.reference=precomputed would score every pair once before training instead, and hold
# no reference model (the table stays in the run directory for resumes).
"${TRAIN[@]}" train.objective=dpo checkpoint.init_from="$RUNS/sft" data.path="$RUNS/data/prefs" \
    train.dpo.beta=0.1 train.dpo.nll_coef=0.2 train.dpo.mask_special=true \
    train.steps=40 optim.lr=1e-4 optim.warmup_steps=5 train.run_dir="$RUNS/dpo"

# A reward model from the same SFT weights (a new scalar head), on the same pairs; its accuracy on them.
# With "rating" fields in PREFS, train.reward.margin=small|large adds Llama 2's margins.
"${TRAIN[@]}" train.objective=reward checkpoint.init_from="$RUNS/sft" data.path="$RUNS/data/prefs" \
    train.steps=40 optim.lr=1e-4 optim.warmup_steps=5 train.run_dir="$RUNS/reward"
dist-llama-score --checkpoint "$RUNS/reward" --input "$PREFS" | tail -n 1

dist-llama-generate --checkpoint "$RUNS/dpo" --tokenizer "$TOKENIZER" --chat --prompt "say red" --max-new-tokens 16
