#!/usr/bin/env bash
# What the training image runs (docker/train.Dockerfile; the Vertex AI custom job of `make train-cloud`):
# the teacher, the student distilled from it, and the serving archive, as `make train archive` does locally.
#   DATA_ROOT            GTSRB root (torchvision layout); on Vertex AI /gcs/BUCKET/data, Cloud Storage mounted
#   OUTPUT               where the results go: runs/ (both run folders), models/gtsrb*.{pt,json}, model_store/gtsrb.mar
#   MLFLOW_TRACKING_URI  the MLflow store both runs log to (training/tracking.py); the student is registered there
#   TRAIN_ARGS           extra flags for both training runs, e.g. "--epochs 1" for a smoke job
# Runs are written to local disk first and copied to OUTPUT at the end: many small writes through the Cloud
# Storage mount are slow, and a job that fails leaves no half-written model behind.
set -euo pipefail
: "${DATA_ROOT:?the GTSRB root}" "${OUTPUT:?where the results go}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
read -r -a extra <<< "${TRAIN_ARGS:-}"

python -m training.train -c training/configs/teacher.yaml --data-root "$DATA_ROOT" --output "$work/runs/teacher" \
  "${extra[@]}"
python -m training.train -c training/configs/gtsrb.yaml --data-root "$DATA_ROOT" --output "$work/runs/gtsrb" \
  --teacher "$work/runs/teacher/latest/best.pth" --export "$work/models/gtsrb.pt" --register gtsrb "${extra[@]}"
# The archive's version: the model's hash, after its registered MLflow version (read from models/gtsrb_lineage.json).
python -m tools.archive --model "$work/models/gtsrb.pt" --export-path "$work/model_store"

mkdir -p "$OUTPUT"
cp -r "$work/runs" "$work/models" "$work/model_store" "$OUTPUT/"
echo "results in $OUTPUT: $(cd "$work" && ls models/gtsrb.pt model_store/gtsrb.mar | tr '\n' ' ')"
