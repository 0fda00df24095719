#!/usr/bin/env bash
# Trains the tiny model once per attention kind, runs every eval on each, and compares them.
# Usage: scripts/sweep.sh [OUT_DIR]   (default runs/sweep; about 20 minutes on 2 CPU cores)
# Re-running resumes: finished runs restore their last checkpoint and only re-evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/sweep}
py=${PYTHON:-.venv/bin/python}
kinds=${KINDS:-"softmax linear gla sliding_window block_sparse moba hybrid"}
for kind in $kinds; do
  echo "== $kind"
  "$py" -m lmtrain.train --config "configs/sweep.py:attention=$kind" --workdir "$out/$kind"
  "$py" -m lmtrain.evaluate --config "configs/sweep.py:attention=$kind" --workdir "$out/$kind"
done
dirs=()
for kind in $kinds; do dirs+=("$out/$kind"); done
"$py" -m lmtrain.compare "${dirs[@]}" --out "$out/comparison"
