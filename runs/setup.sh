#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment in .venv with the right PyTorch build, then activate it.
# Sourced by runs/cpu.sh and runs/test.sh: `source runs/setup.sh [extras]`, e.g. `source runs/setup.sh dev`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRAS="${1:-}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $(python3 --version)"
    python3 -m venv .venv
fi
source .venv/bin/activate

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! python -c "import torch" >/dev/null 2>&1; then
    if has_gpu; then
        echo "[setup] NVIDIA GPU found: installing the CUDA build of torch==${TORCH_VERSION}"
        pip install -q "torch==${TORCH_VERSION}"
    else
        # A bare `pip install torch` pulls a multi-GB CUDA build; on a machine without a GPU take the CPU build.
        echo "[setup] no GPU: installing the CPU build of torch==${TORCH_VERSION}"
        if python -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" >/dev/null 2>&1; then
            pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
        else
            pip install -q "torch==${TORCH_VERSION}"   # a local/proxied index that serves the CPU wheel
        fi
    fi
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
echo "[setup] installing nanochat${EXTRAS:+[$EXTRAS]} and its dependencies"
pip install -q -e "$spec" 2>&1 | grep -vE "is ignored: it is neither a file nor a directory" || true
python -c "import torch, nanochat; print(f'[setup] torch {torch.__version__}, python', __import__('sys').version.split()[0])"
