#!/usr/bin/env bash
# The main job on the embedded default, end to end on a fresh machine (CPU is enough):
#   set up .venv -> train a tiny DiT on scikit-learn's digits (2000 steps) -> export the pipeline
#   -> sample 10 images per class + a grid -> report class accuracy (held-out digit classifier) and digits-FID.
# Re-running continues/re-exports the same run (--resume_from_checkpoint latest). OUT=... picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-runs/digits}"
STEPS="${STEPS:-2000}"

.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  scripts/train_sadm.py --model tiny --max_train_steps "$STEPS" --output_dir "$OUT" \
  --resume_from_checkpoint latest --validation_steps 500 --report_to tensorboard

.venv/bin/python scripts/sample.py --pipeline "$OUT" --output_dir "$OUT/samples" --num_per_class 10 \
  --num_inference_steps 250 --grid --overwrite

.venv/bin/python scripts/evaluate.py --samples "$OUT" --num_samples 1000 --num_inference_steps 250 \
  --metrics accuracy,fid,kid,precision,recall --output_json "$OUT/metrics.json"

echo
echo "Pipeline:       $OUT   (DiffusionPipeline.from_pretrained after 'import sadm')"
echo "Sample grid:    $OUT/samples/grid.png   (one row per digit 0-9)"
echo "Metrics (JSON): $OUT/metrics.json   (accuracy = share of samples a held-out digit classifier reads as the requested digit)"
