#!/usr/bin/env bash
# Starts N lmtrain processes on this machine as one multi-process JAX job (CPU, gloo
# collectives), the way a multi-host pod runs: process 0 coordinates on localhost:PORT.
# Usage: launch/local.sh N [--port P] [--devices-per-process D] -- TRAIN_ARGS...
#   launch/local.sh 2 -- --config configs/tiny.py --workdir runs/two-procs
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: launch/local.sh N [--port P] [--devices-per-process D] -- TRAIN_ARGS...}
shift
port=12355
devices=1
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    *) echo "launch/local.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
py=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$py" -m lmtrain.train "$@" --coordinator_address="localhost:$port" \
    --num_processes="$n" --process_id="$i" > >(sed "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
