#!/usr/bin/env bash
# Create .venv (if missing) and install sadm with its test extras. Idempotent; ~2 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision resolve to a matching pair (timm needs torchvision); on CPU-only machines this is a CUDA build that runs on the CPU.
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import sadm, torch, diffusers, accelerate, timm; print('sadm', sadm.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
