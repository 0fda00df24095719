#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs lmtrain with its pinned stack (and test tools).
# Usage: ./setup.sh [extra]   e.g. ./setup.sh gpu   (extras: gpu, tpu; dev is always installed)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=("${PYTHON:-}" python3.12 python3.13 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  # pyenv installs that are not the selected version (as on the project's CPU machines)
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V -r); do
      echo "$(pyenv root)/versions/$v/bin/python3"; return 0
    done
  fi
  # Last resort, asked for by launch scripts on hosts without Python 3.12 (e.g. TPU VM images):
  # uv fetches a standalone CPython 3.12.
  if [ "${LMTRAIN_SETUP_UV:-0}" = 1 ]; then
    python3 -m pip install -q --user uv >&2 && ~/.local/bin/uv python install 3.12 >&2 &&
      ~/.local/bin/uv python find 3.12 && return 0
  fi
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $("$py" --version) ($py)"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras="dev${1:+,$1}"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "setup.sh: ready: $(.venv/bin/python --version), jax $(.venv/bin/python -c 'import jax; print(jax.__version__)')"
