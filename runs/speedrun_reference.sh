#!/usr/bin/env bash
# The reference design's current speedrun recipe, for figures comparable with its leaderboard: a d24 on ClimbMix,
# 8 tokens per parameter, fp8 matmuls, SSSL windows, device batch 16, on one 8xH100 node. runs/speedrun.sh stays the
# project's d20 run on FineWeb-Edu; this one differs from it only in the flags the reference's own script passes.
#
#   bash runs/speedrun_reference.sh              # run it (WANDB_RUN=name to log to Weights & Biases)
#   DRY_RUN=1 bash runs/speedrun_reference.sh    # validate every stage's arguments without training (works on a CPU)
#
# Stages: ClimbMix data (170 shards, downloaded in the background while the tokenizer trains) -> tokenizer on ~2B
# characters -> d24 pretraining on 8 GPUs -> base eval -> SFT -> chat eval. Like the reference's script it stops
# after SFT's evaluation (no RL stage).
#
# Safe to re-run after a failure: finished stages are skipped (markers in $NANOCHAT_BASE_DIR/stages), and the
# training stages save every SAVE_EVERY / SFT_SAVE_EVERY steps and resume from their latest complete checkpoint,
# keeping the last two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATASET=climbmix  # every stage (tokenizer, pretraining, base eval) reads ClimbMix
WANDB_RUN="${WANDB_RUN:-}"
DRY_RUN="${DRY_RUN:-0}"
NPROC="${NPROC:-8}"
DEPTH="${DEPTH:-24}"
SAVE_EVERY="${SAVE_EVERY:-1000}"
SFT_SAVE_EVERY="${SFT_SAVE_EVERY:-200}"
TAG="d${DEPTH}"
STAGES="$NANOCHAT_BASE_DIR/stages"

if [ "$DRY_RUN" = "1" ]; then
    # Every script parses its arguments, derives what it would do, checks its inputs' shape and exits.
    TORCHRUN=(python -m)
    DRY=(--dry-run)
else
    source runs/setup.sh
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
FP8=(--fp8)
CAN_FP8="from nanochat.fp8 import fp8_unavailable_reason as why; exit(why() is not None)"
if [ "$DRY_RUN" = "1" ] && ! python -c "$CAN_FP8"; then
    echo "dry run: this machine cannot train in fp8 (base_train refuses --fp8 here); checking the rest without it"
    FP8=()
fi

if [ "$DRY_RUN" != "1" ]; then
    stage report_reset python -m nanochat.report reset
    stage data_tokenizer python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 170 &
    DATASET_PID=$!
    stage tok_train python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    stage tok_eval python -m scripts.tok_eval
    echo "waiting for the pretraining shards..."
    wait "$DATASET_PID"
fi

stage "base_train_$TAG" "${TORCHRUN[@]}" scripts.base_train "${DRY[@]}" --depth="$DEPTH" \
    --target-param-data-ratio=8 --device-batch-size=16 "${FP8[@]}" --window-pattern=SSSL --model-tag="$TAG" \
    --run="$WANDB_RUN" --save-every="$SAVE_EVERY" "${RESUME[@]}"
stage "base_eval_$TAG" "${TORCHRUN[@]}" scripts.base_eval "${DRY[@]}" --model-tag="$TAG" --device-batch-size=16
stage "chat_sft_$TAG" "${TORCHRUN[@]}" scripts.chat_sft "${DRY[@]}" --model-tag="$TAG" --run="$WANDB_RUN" \
    --save-every="$SFT_SAVE_EVERY" "${RESUME[@]}"
stage "sft_eval_$TAG" "${TORCHRUN[@]}" scripts.chat_eval "${DRY[@]}" -i sft --model-tag="$TAG"

if [ "$DRY_RUN" != "1" ]; then
    python -m nanochat.report generate
    echo "Done. Talk to it: python -m scripts.chat_web  (then open http://<this machine>:8000)"
fi
