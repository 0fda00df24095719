#!/usr/bin/env bash
# One device call: the GPU-marked tests, then the benchmark tables (printed last).
# On the lent GPU machine (no registry there): carry .whl/ (made by ../shared/tools/device-wheels.sh)
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 120 python3 -m pytest -q -m gpu tests || echo "gpu tests: exit $?"
mkdir -p "${OUT:-/tmp}/bench"
# Each row is also printed to stderr as it is measured, so a family cut by its timeout still
# reports its rows (fla autotunes for minutes on first use: it runs last, at two lengths).
for family in blockwise sparse; do
  timeout 130 python3 -m pallas_kernels.bench --family "$family" --iters 5 \
    --json "${OUT:-/tmp}/bench/$family.json" || echo "bench $family: exit $?"
done
timeout 130 python3 -m pallas_kernels.bench --family linear --iters 5 --lengths 8192,32768 \
  --json "${OUT:-/tmp}/bench/linear.json" || echo "bench linear: exit $?"
