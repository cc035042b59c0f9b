#!/usr/bin/env bash
# The reference GPU run: a d20-class ChatGPT clone on one 8xH100 node, about 4 hours (~$100 at ~$24/hour).
#
#   bash runs/speedrun.sh                 # run it (WANDB_RUN=name to log to Weights & Biases)
#   DRY_RUN=1 bash runs/speedrun.sh       # validate every stage's arguments without training (works on a CPU)
#
# Stages: data (240 shards, downloaded in the background while the tokenizer trains) -> tokenizer on ~2B characters
# -> d20 pretraining on 8 GPUs -> base eval -> SFT -> chat eval -> RL on GSM8K -> chat eval -> report card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
WANDB_RUN="${WANDB_RUN:-}"
DRY_RUN="${DRY_RUN:-0}"
NPROC="${NPROC:-8}"
DEPTH="${DEPTH:-20}"
TAG="d${DEPTH}"

if [ "$DRY_RUN" = "1" ]; then
    # Every script parses its arguments, derives what it would do, checks its inputs' shape and exits.
    TORCHRUN=(python -m)
    DRY=(--dry-run)
else
    source runs/setup.sh
    TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC" -m)
    DRY=()
fi
run() { echo "+ $*"; "$@"; }

if [ "$DRY_RUN" != "1" ]; then
    python -m nanochat.report reset
    # The tokenizer needs ~8 shards (2B characters); pretraining a d20 needs ~240 more: fetch those in the background.
    python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 240 &
    DATASET_PID=$!
    run python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    run python -m scripts.tok_eval
    echo "waiting for the pretraining shards..."
    wait "$DATASET_PID"
fi

run "${TORCHRUN[@]}" scripts.base_train "${DRY[@]}" --depth="$DEPTH" --target-param-data-ratio=10.5 \
    --device-batch-size=32 --model-tag="$TAG" --run="$WANDB_RUN"
run "${TORCHRUN[@]}" scripts.base_eval "${DRY[@]}" --model-tag="$TAG"
run "${TORCHRUN[@]}" scripts.chat_sft "${DRY[@]}" --model-tag="$TAG" --run="$WANDB_RUN"
run "${TORCHRUN[@]}" scripts.chat_eval "${DRY[@]}" -i sft --model-tag="$TAG"
run "${TORCHRUN[@]}" scripts.chat_rl "${DRY[@]}" --model-tag="$TAG" --run="$WANDB_RUN"
run "${TORCHRUN[@]}" scripts.chat_eval "${DRY[@]}" -i rl --model-tag="$TAG" -a GSM8K

if [ "$DRY_RUN" != "1" ]; then
    python -m nanochat.report generate
    echo "Done. Talk to it: python -m scripts.chat_web  (then open http://<this machine>:8000)"
fi
