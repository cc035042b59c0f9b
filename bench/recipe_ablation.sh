#!/usr/bin/env bash
# The smear/backout/MuonEq ablation of docs/recipe.md on the d4 CPU benchmark configuration: 60 steps of 16x512 tokens,
# compiled, bf16 autocast where the CPU has native bf16, val bpb over 262,144 tokens. One JSON line per run.
#
#   flock /tmp/nanochat-bench.lock bash bench/recipe_ablation.sh                  # five variants (see the end)
#   BEFORE_TREE=/tmp/base-checkout flock /tmp/nanochat-bench.lock bash bench/recipe_ablation.sh   # + an older tree
#
# Needs a 32,768-token tokenizer and the shards in $NANOCHAT_BASE_DIR (python -m nanochat.dataset -n 4;
# python -m scripts.tok_train --max-chars=50000000). Runs one after another; each writes $NANOCHAT_BASE_DIR/ab_NAME.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR to the folder holding the tokenizer and the shards}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
if [ -z "${NANOCHAT_DTYPE:-}" ] && grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then
    export NANOCHAT_DTYPE=bf16
fi
ARGS=(--depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 --device-batch-size=16 --total-batch-size=8192
      --num-iterations=60 --eval-every=-1 --eval-tokens=262144 --sample-every=-1 --core-metric-every=-1 --compile=on)

run() {  # NAME TREE [FLAGS...]
    local name=$1 tree=$2; shift 2
    local log="$NANOCHAT_BASE_DIR/ab_$name.log" start=$SECONDS
    (cd "$tree" && PYTHONPATH="$tree" python -m scripts.base_train "${ARGS[@]}" --model-tag="ab_$name" "$@") > "$log" 2>&1
    local bpb
    bpb=$(grep -o "val bpb [0-9.]*" "$log" | tail -1 | cut -d' ' -f3)
    echo "{\"run\": \"$name\", \"val_bpb\": ${bpb:-null}, \"dtype\": \"${NANOCHAT_DTYPE:-fp32}\", \"wall_s\": $((SECONDS - start))}"
}

if [ -n "${BEFORE_TREE:-}" ]; then
    run before "$BEFORE_TREE"
fi
run baseline "$PWD" --no-smear --no-backout
run smear "$PWD" --smear --no-backout
run backout "$PWD" --no-smear --backout
run both "$PWD" --smear --backout
run both_no_muon_eq "$PWD" --smear --backout --no-muon-eq
