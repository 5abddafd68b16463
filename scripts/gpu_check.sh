#!/usr/bin/env bash
# The GPU check: everything the CPU test suite cannot show, in <= 8 minutes on ONE CUDA device.
#   bash scripts/gpu_check.sh            # after `bash scripts/setup.sh`; PYTHON=... picks another interpreter
# Parts, each with its own time limit (seconds; the sum is 465):
#   gpu_tests  (140)  pytest -m gpu (all but tests/test_fsdp.py): bf16, fp16 + GradScaler, fused AdamW, SDPA
#                     kernels, torch.compile (tests/test_gpu.py)
#   fsdp       (110)  pytest -m gpu tests/test_fsdp.py: single-process FSDP through accelerate's FSDP plugin
#                     (configs/accelerate/fsdp_1gpu.yaml): train, checkpoint (gathered full state dict), resume,
#                     export, sample; DSM and SADM + Diffusion-GAN
#   speed_B2   (75)   benchmark_speed.py, DiT-B/2 at 32x32x4 latents (256 px images), batch 32, bf16:
#                     bare loop, dsm, +SADM structure term, +Diffusion-GAN term, both; img/s and peak CUDA memory
#   speed_XL2  (120)  the same for DiT-XL/2
#   report     (20)   writes the `## GPU` section of docs/PERFORMANCE.md (scripts/gpu_check_report.py)
# A part that fails or runs out of time is reported as such and the others still run; the exit status is non-zero
# when any part failed. Logs: $LOG_DIR (default runs/gpu_check). Without a CUDA device it stops at once (exit 1),
# running nothing and changing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: stopped: no CUDA device (torch.cuda.is_available() is False for $PYTHON)." >&2
  echo "This check needs one GPU; nothing was run and docs/PERFORMANCE.md is unchanged." >&2
  exit 1
fi
if ! "$PYTHON" -c "import sadm.pipelines" 2>/dev/null; then
  echo "gpu_check.sh: stopped: sadm is not importable with $PYTHON; run bash scripts/setup.sh first." >&2
  exit 1
fi

LOG="${LOG_DIR:-runs/gpu_check}"
DOCS="${DOCS:-docs/PERFORMANCE.md}"
rm -rf "$LOG"
mkdir -p "$LOG"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one device, whatever the machine has
export SADM_CACHE="${SADM_CACHE:-$PWD/.cache/sadm}"
failed=0
start_all=$SECONDS

# part NAME LIMIT_S COMMAND...: run with a time limit, log to $LOG/NAME.log, record `name<TAB>status<TAB>seconds`
part() {
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "[gpu_check] $name (limit ${limit} s, elapsed $((SECONDS - start_all)) s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
  status=$?
  set -e
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$LOG/parts.tsv"
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "[gpu_check] $name: exit $status (124: time limit); last lines of $LOG/$name.log:"
    tail -n 15 "$LOG/$name.log"
  fi
}

PYTEST=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfEs)
part gpu_tests 140 "${PYTEST[@]}" tests --ignore tests/test_fsdp.py --junitxml "$LOG/gpu_tests_1.xml"
part fsdp 110 "${PYTEST[@]}" tests/test_fsdp.py --junitxml "$LOG/gpu_tests_2_fsdp.xml"

SPEED=(scripts/benchmark_speed.py --device cuda --mixed_precision bf16 --spaces latent --latent_size 32
  --batch_size 32 --arms bare dsm sadm gan both --steps 10 --warmup_steps 3 --repeats 1
  --sample_batch 8 --sample_steps 10 --sample_repeats 1)
part speed_B2 75 "$PYTHON" "${SPEED[@]}" --presets DiT-B/2 --write_docs "$LOG/benchmark_1_DiT-B2.md"
part speed_XL2 120 "$PYTHON" "${SPEED[@]}" --presets DiT-XL/2 --write_docs "$LOG/benchmark_2_DiT-XL2.md"

part report 20 "$PYTHON" scripts/gpu_check_report.py --log_dir "$LOG" --docs "$DOCS"
echo "[gpu_check] done in $((SECONDS - start_all)) s; $DOCS updated (section '## GPU'); logs in $LOG"
cat "$LOG/parts.tsv"
exit "$failed"
