#!/usr/bin/env bash
# Trains the tiny model once per attention kind, runs every eval on each, and compares them.
# Usage: scripts/sweep.sh [OUT_DIR]   (default runs/sweep)
# The kinds are every registered mixer and its ready variants (python -m lmtrain.sweep list);
# KINDS="softmax gla" picks some. DRY_RUN=1 prints the commands instead of running them.
# Re-running resumes: finished runs restore their last checkpoint and only re-evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/sweep}
py=${PYTHON:-.venv/bin/python}
kinds=${KINDS:-$("$py" -m lmtrain.sweep list)}
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }
dirs=()
for kind in $kinds; do
  echo "== $kind"
  run "$py" -m lmtrain.train --config "configs/sweep.py:attention=$kind" --workdir "$out/$kind"
  run "$py" -m lmtrain.evaluate --config "configs/sweep.py:attention=$kind" --workdir "$out/$kind"
  dirs+=("$out/$kind")
done
run "$py" -m lmtrain.compare "${dirs[@]}" --out "$out/comparison"
