#!/usr/bin/env bash
# The main job on the embedded default, end to end on a fresh machine (CPU is enough):
#   set up .venv -> [1/3] train a tiny DiT on scikit-learn's digits at 16x16 (2000 steps, on all cores) and export the
#   pipeline -> [2/3] sample 100 images per class with 50 DDPM steps (+ a grid, one row per digit) -> [3/3] report
#   class accuracy and digits-FID (held-out digit classifier at 16 px, as in docs/DIGITS.md) and pixel-FID.
# Each stage shows a progress bar with its ETA; the elapsed time is printed per stage and at the end.
# Re-running continues/re-exports the same run (--resume_from_checkpoint latest). OUT=... picks another folder,
# THREADS=... the CPU threads (default all cores; on a busy machine THREADS=1 is faster), SKIP_SETUP=1 skips
# scripts/setup.sh (an existing .venv), RESOLUTION=8 STEPS=4000 trains on the native 8x8 digits (16 instead of 64 tokens;
# digits-FID 5.3 vs 12.5 for this default, 3 seeds: docs/DIGITS.md; at 2000 steps 8x8 is undertrained, 18.6).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-runs/digits}"
STEPS="${STEPS:-2000}"
THREADS="${THREADS:-$(nproc)}"
RESOLUTION="${RESOLUTION:-16}"
SAMPLE_STEPS="${SAMPLE_STEPS:-50}"  # DDPM steps; 50 instead of 100 moves the metrics less than the seed spread (docs/DIGITS.md)
NUM_PER_CLASS="${NUM_PER_CLASS:-100}"  # 1000 samples, as the documented baseline (FID is biased upwards by fewer)
export OMP_NUM_THREADS="$THREADS"  # accelerate launch alone would pin the training to one thread
start=$SECONDS
stage() { echo; echo "[$1] $2   (elapsed $((SECONDS - start)) s)"; }

stage 1/3 "training --model tiny at ${RESOLUTION}x${RESOLUTION} for $STEPS steps on $THREADS threads -> $OUT"
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$THREADS" \
  scripts/train_sadm.py --model tiny --resolution "$RESOLUTION" --max_train_steps "$STEPS" --output_dir "$OUT" \
  --resume_from_checkpoint latest --checkpointing_steps "$STEPS" --validation_steps 0 --report_to tensorboard

stage 2/3 "sampling $NUM_PER_CLASS images per class ($SAMPLE_STEPS DDPM steps) + grid -> $OUT/samples"
.venv/bin/python scripts/sample.py --pipeline "$OUT" --output_dir "$OUT/samples" --num_per_class "$NUM_PER_CLASS" \
  --num_inference_steps "$SAMPLE_STEPS" --seed 0 --no_png --grid --overwrite

stage 3/3 "metrics of $OUT/samples/samples.npz"
.venv/bin/python scripts/evaluate.py --samples "$OUT/samples/samples.npz" --resolution 16 --feature_network digits \
  --metrics accuracy,fid,precision,recall --output_json "$OUT/metrics.json"
.venv/bin/python scripts/evaluate.py --samples "$OUT/samples/samples.npz" --resolution "$RESOLUTION" --feature_network pixels \
  --metrics fid --output_json "$OUT/metrics_pixels.json"

echo
echo "Done in $((SECONDS - start)) s (after setup)."
echo "Pipeline:       $OUT   (DiffusionPipeline.from_pretrained after 'import sadm')"
echo "Sample grid:    $OUT/samples/grid.png   (one row per digit 0-9)"
echo "Metrics (JSON): $OUT/metrics.json   (accuracy = share of samples a held-out digit classifier reads as the requested digit;"
echo "                fid = digits-FID in that classifier's features at 16 px, comparable to docs/DIGITS.md)"
echo "                $OUT/metrics_pixels.json   (fid = pixel-FID on the raw pixels at the training resolution)"
