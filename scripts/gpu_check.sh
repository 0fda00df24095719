#!/usr/bin/env bash
# Measures lmtrain on a Hopper GPU in one go: the GPU-marked tests, the three kernel benchmark
# tables and the trainer's MFU on configs/gpt125m.py; a summary (test result, every table, the
# MFU lines) is printed last, and docs/benchmarks.md says how to record it. On a machine without
# a package index, first copy over the wheels made by `bash scripts/gpu_wheels.sh` (.whl/).
#   bash scripts/gpu_check.sh
# Parts can be named to run fewer (default: all, in this order; 500 s at most):
#   bash scripts/gpu_check.sh tests blockwise linear sparse mfu
# Full logs and the JSON rows land in $OUT (8 files at most come back: 5 logs + 3 JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Every runtime dependency importable? (A missing one would fail each part on its own.)
python3 - <<'PY'
import importlib
need = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "absl",
        "tensorboardX", "tensorboard", "matplotlib", "PIL", "hypothesis", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("missing modules (carry their wheels: bash scripts/gpu_wheels.sh):" if missing
      else "all runtime modules importable", " ".join(missing))
peers = {m: importlib.util.find_spec(m) is not None for m in ("fla", "tokamax", "torch")}
print("peers:", peers)
PY

part() {  # part NAME SECONDS COMMAND...: runs it under a timeout, its log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $?"
}

bench() {  # bench FAMILY SECONDS [ARGS...]: rows also go to stderr as measured, so a family cut
  local family=$1 limit=$2  # by its timeout still reports them in its log
  shift 2
  part "$family" "$limit" python3 -m pallas_kernels.bench --family "$family" --iters 5 \
    --json "$OUT/$family.json" "$@"
}

for p in ${*:-tests blockwise linear sparse mfu}; do
  case $p in
    # -v: each test's verdict is printed as it finishes, so a run cut by the limit still tells;
    # with pytest-timeout (in the image) a test that hangs ends the run at 60 s, not at 140.
    tests) hang=$(python3 -c "import pytest_timeout" 2>/dev/null &&
                  echo "--timeout=60 --timeout-method=thread")
           part tests 140 python3 -m pytest -v --tb=short -m gpu -p no:cacheprovider $hang tests ;;
    blockwise) bench blockwise 90 ;;
    # fla (the peer) autotunes for minutes on first use: two lengths, its rows after ours.
    linear) bench linear 80 --lengths 8192,32768 ;;
    sparse) bench sparse 80 --lengths 8192,32768,65536 ;;
    # MFU of configs/gpt125m.py with cuDNN attention, then with our Pallas kernel.
    mfu) part mfu 110 bash -c 'for impl in cudnn pallas; do rm -rf /tmp/gpt125m
           echo "### model.attention.impl=$impl"
           timeout 55 python3 -m lmtrain.train --config configs/gpt125m.py \
             --workdir /tmp/gpt125m --config.model.attention.impl=$impl \
             --config.train.steps=40 --config.train.warmup_steps=10 \
             --config.train.log_every=10 --config.train.eval_every=1000 \
             --config.train.checkpoint_every=1000 2>&1 || echo "exit $?"; done' ;;
    *) echo "unknown part $p (tests blockwise linear sparse mfu)"; exit 2 ;;
  esac
done

echo
echo "################ summary"
[ -f "$OUT/tests.log" ] && { grep -E "FAILED|ERROR" "$OUT/tests.log" | head -n 20; tail -n 3 "$OUT/tests.log"; }
for family in blockwise linear sparse; do
  [ -f "$OUT/$family.log" ] || continue
  if grep -q '^## ' "$OUT/$family.log"; then
    sed -n '/^## /,$p' "$OUT/$family.log"
  else  # cut by its timeout: the rows it measured
    echo "## $family (incomplete)"; grep '^row ' "$OUT/$family.log"; tail -n 3 "$OUT/$family.log"
  fi
done
[ -f "$OUT/mfu.log" ] && grep -E "###|compiled|MFU|Error|error|exit" "$OUT/mfu.log" | tail -n 16
exit 0
