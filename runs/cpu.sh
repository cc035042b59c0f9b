#!/usr/bin/env bash
# The whole nanochat lifecycle at toy scale on a CPU, sized to a time budget (15 minutes by default):
# data -> tokenizer -> pretraining -> base eval -> SFT -> chat eval -> RL -> chat eval -> report card.
#
#   bash runs/cpu.sh                                    # downloads from the Hugging Face Hub
#   NANOCHAT_MIRROR=../shared/mirror bash runs/cpu.sh   # offline, from a local mirror of the datasets
#   TIME_BUDGET_MIN=30 bash runs/cpu.sh                 # a longer budget: more pretraining steps
#   DRY_RUN=1 bash runs/cpu.sh                          # measure this CPU and print the plan, run nothing
#
# Before the first stage, scripts/budget.py measures this CPU's matmul speed and picks BASE_STEPS (and, on slow
# machines, SFT_STEPS, RL_STEPS, MAX_PER_TASK, CHAT_PROBLEMS) so that the stages after setup take about
# TIME_BUDGET_MIN; it prints the measurement, the choice and each stage's expected time, and records them in the
# report. Safe to re-run: the plan is kept in $NANOCHAT_BASE_DIR/stages/plan.json, finished stages are skipped, an
# interrupted pretraining run resumes from its last checkpoint.
# Knobs (environment): NANOCHAT_BASE_DIR (where everything is written), TIME_BUDGET_MIN, DEPTH, and, to fix them
# instead of planning them, BASE_STEPS, SFT_STEPS, RL_STEPS, MAX_PER_TASK, CHAT_PROBLEMS; SKIP_SETUP=1 (use the
# active Python environment as is).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${SKIP_SETUP:-0}" != "1" ]; then
    source runs/setup.sh
fi

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
if [ -n "${NANOCHAT_MIRROR:-}" ]; then
    # The mirror has no FineWeb-Edu; its pretraining shards are a sample of real educational text.
    export NANOCHAT_DATASET="${NANOCHAT_DATASET:-nanochat-mirror/docs-dictionary-sample}"
fi
# CPUs with native bf16 (AVX512-BF16 / AMX) run the matmuls in bf16 with fp32 master weights; others stay in fp32.
if [ -z "${NANOCHAT_DTYPE:-}" ] && grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then
    export NANOCHAT_DTYPE=bf16
fi

DEPTH="${DEPTH:-4}"
SEQ_LEN="${SEQ_LEN:-512}"
VOCAB="${VOCAB:-8192}"
TOK_CHARS="${TOK_CHARS:-50000000}"
DEVICE_BATCH="${DEVICE_BATCH:-16}"
BASE_EVAL_EVERY="${BASE_EVAL_EVERY:-100}"
SAVE_EVERY="${SAVE_EVERY:-100}"
COMPILE="${COMPILE:-on}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-128}"
TIME_BUDGET_MIN="${TIME_BUDGET_MIN:-15}"
TAG="d${DEPTH}"
STAGES="$NANOCHAT_BASE_DIR/stages"
mkdir -p "$STAGES"

# The plan: knobs set in the environment are kept, the others are sized to the budget on this machine.
overrides=()
for knob in BASE_STEPS SFT_STEPS RL_STEPS MAX_PER_TASK CHAT_PROBLEMS; do
    if [ -n "${!knob:-}" ]; then overrides+=(--set "$knob=${!knob}"); fi
done
plan_args=(--minutes="$TIME_BUDGET_MIN" --dtype="${NANOCHAT_DTYPE:-fp32}" --depth="$DEPTH" --vocab-size="$VOCAB"
           --seq-len="$SEQ_LEN" --device-batch="$DEVICE_BATCH" "${overrides[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
    python -m scripts.budget "${plan_args[@]}"
    echo "dry run: nothing was run"
    exit 0
fi
plan="$(python -m scripts.budget "${plan_args[@]}" --plan-file="$STAGES/plan.json")"
eval "$plan"

# run_stage NAME COMMAND...: run a stage once; a marker file records that it finished.
run_stage() {
    local name="$1"; shift
    if [ -f "$STAGES/$name.done" ]; then
        echo "== $name: done already (delete $STAGES/$name.done to redo it)"
        return
    fi
    echo "== $name: $*"
    local start=$SECONDS
    "$@"
    echo "$((SECONDS - start))" > "$STAGES/$name.done"
    echo "== $name: finished in $((SECONDS - start)) s"
}

T0=$SECONDS
run_stage report_reset python -m nanochat.report reset
run_stage plan_report python -m scripts.budget "${plan_args[@]}" --plan-file="$STAGES/plan.json" --report >/dev/null
run_stage data        python -m nanochat.dataset -n "${DATA_SHARDS:-4}"
run_stage tok_train   python -m scripts.tok_train --max-chars="$TOK_CHARS" --vocab-size="$VOCAB"
run_stage tok_eval    python -m scripts.tok_eval
run_stage "base_train_$TAG"  python -m scripts.base_train --depth="$DEPTH" --head-dim=64 --window-pattern=L \
    --max-seq-len="$SEQ_LEN" --device-batch-size="$DEVICE_BATCH" --total-batch-size=$((DEVICE_BATCH * SEQ_LEN)) \
    --num-iterations="$BASE_STEPS" --eval-every="$BASE_EVAL_EVERY" --eval-tokens=$((64 * SEQ_LEN)) \
    --sample-every=-1 --core-metric-every=-1 --save-every="$SAVE_EVERY" --resume-from-step=latest \
    --compile="$COMPILE" --model-tag="$TAG"
run_stage "base_eval_$TAG"   python -m scripts.base_eval --model-tag="$TAG" --max-per-task="$MAX_PER_TASK" \
    --bpb-tokens="${BPB_TOKENS:-131072}"
run_stage "chat_sft_$TAG"    python -m scripts.chat_sft --model-tag="$TAG" --num-iterations="$SFT_STEPS" \
    --device-batch-size=8 --max-seq-len="$SEQ_LEN" --eval-every=-1 --eval-steps=8 --eval-metrics-every=-1 \
    --save-every="$SFT_STEPS" --resume-from-step=latest
run_stage "sft_eval_$TAG"    python -m scripts.chat_eval -i sft --model-tag="$TAG" --max-problems="$CHAT_PROBLEMS" \
    --max-new-tokens="$MAX_NEW_TOKENS"
run_stage "chat_rl_$TAG"     python -m scripts.chat_rl --model-tag="$TAG" --num-steps="$RL_STEPS" \
    --examples-per-step=4 --num-samples=4 --max-new-tokens="$MAX_NEW_TOKENS" --eval-every=-1 \
    --eval-examples="$CHAT_PROBLEMS" --eval-k=4
run_stage "rl_eval_$TAG"     python -m scripts.chat_eval -i rl --model-tag="$TAG" -a GSM8K --max-problems="$CHAT_PROBLEMS" \
    --max-new-tokens="$MAX_NEW_TOKENS"
python -m nanochat.report generate

echo
echo "nanochat pipeline finished in $(( (SECONDS - T0) / 60 )) min $(( (SECONDS - T0) % 60 )) s."
echo "Report card: $NANOCHAT_BASE_DIR/report/report.md"
echo "Talk to your model:"
echo "  source .venv/bin/activate"
echo "  python -m scripts.chat_cli -p \"Why is the sky blue?\"     # one answer in the terminal"
echo "  python -m scripts.chat_cli                                 # interactive chat"
echo "  python -m scripts.chat_web                                 # web UI at http://localhost:8000"
