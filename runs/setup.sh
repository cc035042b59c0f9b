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

quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # noise from local indexes

if ! python -c "import torch" >/dev/null 2>&1; then
    if has_gpu; then
        echo "[setup] NVIDIA GPU found: installing the CUDA build of torch==${TORCH_VERSION}"
        pip install -q "torch==${TORCH_VERSION}" 2>&1 | quiet
    elif python -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" \
            >/dev/null 2>&1; then
        # A bare `pip install torch` pulls a multi-GB CUDA build; without a GPU take the CPU build.
        echo "[setup] no GPU: installing the CPU build of torch==${TORCH_VERSION}"
        pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu 2>&1 | quiet
    else
        echo "[setup] no GPU: installing torch==${TORCH_VERSION} from the configured index (expects its CPU build)"
        pip install -q "torch==${TORCH_VERSION}" 2>&1 | quiet
    fi
    python -c "import torch" || { echo "[setup] could not install torch" >&2; exit 1; }
fi

# The Python tool's sandbox (nanochat/sandbox/bwrap.py) is bubblewrap + libseccomp; without them the tool stays off.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "[setup] installing bubblewrap (the sandbox of the model's Python tool)"
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap libseccomp2 \
        >/dev/null) || echo "[setup] could not install bubblewrap: the Python tool will be off (README: Sandbox)"
fi

# With an NVIDIA GPU the `gpu` extra comes too: `kernels` (Flash Attention 3) and `torchao` (fp8); without it attention
# runs on SDPA, several times slower on Hopper.
if has_gpu && [[ ",$EXTRAS," != *",gpu,"* ]]; then
    EXTRAS="${EXTRAS:+$EXTRAS,}gpu"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
echo "[setup] installing nanochat${EXTRAS:+[$EXTRAS]} and its dependencies"
pip install -q -e "$spec" 2>&1 | quiet
if has_gpu; then
    # Which attention kernel this torch gets here: on Hopper, whether a build of FA3 for it exists on the kernel hub
    # (downloaded now, so the stages find it cached); runs/speedrun.sh stops where it does not.
    python -m nanochat.attention || echo "[setup] the attention check failed (see above)"
fi
python -c "import torch, nanochat; print(f'[setup] torch {torch.__version__}, python', __import__('sys').version.split()[0])"
