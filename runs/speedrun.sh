#!/usr/bin/env bash
# The reference GPU run: a d20-class ChatGPT clone on one 8xH100 node, about 4 hours (~$100 at ~$24/hour).
#
#   bash runs/speedrun.sh                 # run it (WANDB_RUN=name to log to Weights & Biases)
#   DRY_RUN=1 bash runs/speedrun.sh       # validate every stage's arguments without training (works on a CPU)
#   SKIP_PREFLIGHT=1 bash runs/speedrun.sh  # without checking the node first (python -m scripts.preflight)
#
# Every stage runs with --device-type=cuda: a node whose GPUs torch cannot use (say a driver older than the torch
# wheel's CUDA) stops at the first stage with one line naming both, never trains on its CPUs.
#
# Stages: data (240 shards, downloaded in the background while the tokenizer trains) -> tokenizer on ~2B characters
# -> d20 pretraining on 8 GPUs -> base eval -> SFT -> chat eval -> RL on GSM8K -> chat eval -> report card.
#
# Safe to re-run after a failure: finished stages are skipped (markers in $NANOCHAT_BASE_DIR/stages), and the
# training stages save every SAVE_EVERY / SFT_SAVE_EVERY / RL_SAVE_EVERY steps and resume from their latest complete
# checkpoint, keeping the last two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
WANDB_RUN="${WANDB_RUN:-}"
DRY_RUN="${DRY_RUN:-0}"
NPROC="${NPROC:-8}"
DEPTH="${DEPTH:-20}"
SAVE_EVERY="${SAVE_EVERY:-1000}"
SFT_SAVE_EVERY="${SFT_SAVE_EVERY:-200}"
RL_SAVE_EVERY="${RL_SAVE_EVERY:-60}"
TAG="d${DEPTH}"
STAGES="$NANOCHAT_BASE_DIR/stages"

if [ "$DRY_RUN" = "1" ]; then
    # Every script parses its arguments, derives what it would do, checks its inputs' shape and exits.
    TORCHRUN=(python -m)
    DRY=(--dry-run)
    DEVICE_TYPE="${DEVICE_TYPE:-}"  # any machine (DEVICE_TYPE=cuda checks the GPU too)
else
    DEVICE_TYPE="${DEVICE_TYPE:-cuda}"
    source runs/setup.sh
    # FA3 or stop: a Hopper node would otherwise train for hours on SDPA (ALLOW_SDPA=1 runs anyway)
    [ "${ALLOW_SDPA:-0}" = "1" ] || python -m nanochat.attention --require-fa3
    TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC" -m)
    DRY=()
    mkdir -p "$STAGES"
fi

# stage NAME COMMAND...: run a stage once; a marker file records that it finished (a dry run checks every stage).
stage() {
    local name="$1"; shift
    if [ "$DRY_RUN" != "1" ] && [ -f "$STAGES/$name.done" ]; then
        echo "== $name: done already (delete $STAGES/$name.done to redo it)"
        return
    fi
    echo "+ $*"
    local start=$SECONDS
    "$@"
    if [ "$DRY_RUN" != "1" ]; then
        echo "$((SECONDS - start))" > "$STAGES/$name.done"
    fi
}
RESUME=(--resume-from-step=latest --keep-last=2)
DEVICE=(--device-type="$DEVICE_TYPE")

# Check the node first (versions, GPUs, FA3, compile, all-reduce, speed, memory, predicted time and cost, decode): a few
# minutes that can save hours. SKIP_PREFLIGHT=1 skips it; a dry run checks only its arguments and cheap lines.
# USD_PER_GPU_HOUR prices its prediction.
if [ "${SKIP_PREFLIGHT:-0}" != "1" ]; then
    PREFLIGHT=(--device-type=cuda)
    [ "$DRY_RUN" = "1" ] && PREFLIGHT=(--device-type=cpu --skip compile allreduce train predict decode)
    stage preflight python -m scripts.preflight "${PREFLIGHT[@]}" --depth="$DEPTH" --nproc="$NPROC" \
        --target-param-data-ratio=10.5 --device-batch-size=32 --usd-per-gpu-hour="${USD_PER_GPU_HOUR:-3}" \
        --json="$NANOCHAT_BASE_DIR/preflight.json"
fi

if [ "$DRY_RUN" != "1" ]; then
    stage report_reset python -m nanochat.report reset
    # The tokenizer needs ~8 shards (2B characters); pretraining a d20 needs ~240 more: fetch those in the background
    # (shards already on disk are skipped, so a re-run only fetches what is missing).
    stage data_tokenizer python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 240 &
    DATASET_PID=$!
    stage tok_train python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    stage tok_eval python -m scripts.tok_eval
    echo "waiting for the pretraining shards..."
    wait "$DATASET_PID"
fi

stage "base_train_$TAG" "${TORCHRUN[@]}" scripts.base_train "${DRY[@]}" "${DEVICE[@]}" --depth="$DEPTH" \
    --target-param-data-ratio=10.5 --device-batch-size=auto --model-tag="$TAG" --run="$WANDB_RUN" \
    --save-every="$SAVE_EVERY" "${RESUME[@]}"
stage "base_eval_$TAG" "${TORCHRUN[@]}" scripts.base_eval "${DRY[@]}" "${DEVICE[@]}" --model-tag="$TAG"
stage "chat_sft_$TAG" "${TORCHRUN[@]}" scripts.chat_sft "${DRY[@]}" "${DEVICE[@]}" --model-tag="$TAG" \
    --run="$WANDB_RUN" --save-every="$SFT_SAVE_EVERY" "${RESUME[@]}"
stage "sft_eval_$TAG" "${TORCHRUN[@]}" scripts.chat_eval "${DRY[@]}" "${DEVICE[@]}" -i sft --model-tag="$TAG"
stage "chat_rl_$TAG" "${TORCHRUN[@]}" scripts.chat_rl "${DRY[@]}" "${DEVICE[@]}" --model-tag="$TAG" \
    --run="$WANDB_RUN" --save-every="$RL_SAVE_EVERY" "${RESUME[@]}"
stage "rl_eval_$TAG" "${TORCHRUN[@]}" scripts.chat_eval "${DRY[@]}" "${DEVICE[@]}" -i rl --model-tag="$TAG" -a GSM8K

if [ "$DRY_RUN" != "1" ]; then
    python -m nanochat.report generate
    echo "Done. Talk to it: python -m scripts.chat_web  (then open http://<this machine>:8000)"
fi
