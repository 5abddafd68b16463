#!/usr/bin/env bash
# Set up (if needed) and run the tests offline. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SADM_CACHE="${SADM_CACHE:-$PWD/.cache/sadm}"
.venv/bin/ruff check sadm pipelines scripts tests
.venv/bin/python -m pytest -q "$@"
