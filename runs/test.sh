#!/usr/bin/env bash
# Set up the environment and run the whole test suite (the same command CI runs).
# The browser test needs Chromium; it is installed from Debian's packages when missing and we may use apt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "[test] installing chromium (for the web UI browser test)"
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
        || echo "[test] could not install chromium: the browser test will be skipped"
fi
source runs/setup.sh dev
exec python -m pytest -q "$@"
