#!/usr/bin/env bash
# Runs lmtrain on a Cloud TPU pod slice: create (or reuse) the TPU VM, copy this checkout to
# every worker, install, run `python -m lmtrain.train` on all workers at once (jax.distributed
# finds the pod by itself), stream the logs, and delete the slice afterwards.
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [--version V]
#                          [--project P] [--queued] [--spot] [--keep] [--allow-dirty]
#                          [--dry-run] -- TRAIN_ARGS...
#   launch/tpu_pod.sh --name lm-v5p --zone us-east5-a --accelerator v5p-64 --dry-run -- \
#       --config configs/tiny.py --workdir /mnt/bucket/runs/tiny
# --queued asks for a queued resource (waits for capacity); --keep leaves the slice up;
# --dry-run prints every command and runs none. What is shipped is the committed HEAD; a tree
# with uncommitted changes is refused unless --allow-dirty, which ships the working tree as it is
# (tracked files and untracked, non-ignored ones). Either way the run records the commit and the
# dirty flag (LMTRAIN_GIT_COMMIT / LMTRAIN_GIT_DIRTY), and the log goes to
# ${LMTRAIN_LOG_DIR:-runs}/launch-NAME.log. The workdir must be a filesystem every worker
# sees (e.g. a GCS bucket mounted with gcsfuse, or a Filestore share) so that all workers write
# one checkpoint together.
set -euo pipefail
cd "$(dirname "$0")/.."

name="" zone="" accel="" version="" project="" queued=0 spot=0 keep=0 dry=0 allow_dirty=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accel=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry=1; shift ;;
    --allow-dirty) allow_dirty=1; shift ;;
    *) echo "launch/tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
for required in name zone accel; do
  if [ -z "${!required}" ]; then
    echo "launch/tpu_pod.sh: --${required/accel/accelerator} is required" >&2; exit 2
  fi
done
[ $# -gt 0 ] || { echo "launch/tpu_pod.sh: give the training arguments after --" >&2; exit 2; }
commit=$(git rev-parse HEAD)
changes=$(git status --porcelain)
dirty=0
[ -n "$changes" ] && dirty=1
if [ "$dirty" = 1 ] && [ "$allow_dirty" = 0 ]; then
  echo "launch/tpu_pod.sh: the checkout has uncommitted changes ($(echo "$changes" | head -3 |
    awk '{print $2}' | paste -sd, -)$([ "$(echo "$changes" | wc -l)" -gt 3 ] && echo ", ...")); commit them, or pass --allow-dirty to ship the working tree as it is" >&2
  exit 2
fi
if [ -z "$version" ]; then
  case "$accel" in
    v6e*) version=v2-alpha-tpuv6e ;;
    v5p*) version=v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
gc=(gcloud)
[ -n "$project" ] && gc+=(--project "$project")
tpu=("${gc[@]}" compute tpus tpu-vm)
qr=("${gc[@]}" compute tpus queued-resources)
train_args=$(printf '%q ' "$@")

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$dry" = 0 ]; then "$@"; fi
}

exists=0
if [ "$dry" = 0 ] && "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  exists=1
  echo "launch/tpu_pod.sh: reusing TPU VM $name"
fi
if [ "$exists" = 0 ]; then
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  if [ "$queued" = 1 ]; then
    run "${qr[@]}" create "$name" --node-id "$name" --zone "$zone" --accelerator-type "$accel" \
      --runtime-version "$version" "${extra[@]}"
    # wait until the queued resource is ACTIVE
    run bash -c "until ${qr[*]} describe $name --zone $zone --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done"
  else
    run "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "$version" "${extra[@]}"
  fi
fi

archive=/tmp/lmtrain-$name.tgz
if [ "$dirty" = 0 ]; then
  echo "launch/tpu_pod.sh: shipping commit $commit (clean)"
  run git archive --format=tar.gz -o "$archive" HEAD
else
  echo "launch/tpu_pod.sh: shipping the working tree: commit $commit plus uncommitted changes"
  run bash -c "git ls-files -z --cached --others --exclude-standard | tar czf $archive --null -T -"
fi
run "${tpu[@]}" scp "$archive" "$name:lmtrain.tgz" --zone "$zone" --worker=all
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all \
  --command "rm -rf lmtrain && mkdir lmtrain && tar xzf lmtrain.tgz -C lmtrain && cd lmtrain && LMTRAIN_SETUP_UV=1 ./setup.sh tpu"
log_dir=${LMTRAIN_LOG_DIR:-runs}
log=/dev/null
if [ "$dry" = 0 ]; then mkdir -p "$log_dir" && log=$log_dir/launch-$name.log; fi
set +e
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all \
  --command "cd lmtrain && LMTRAIN_GIT_COMMIT=$commit LMTRAIN_GIT_DIRTY=$dirty .venv/bin/python -m lmtrain.train $train_args" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$keep" = 0 ]; then
  if [ "$queued" = 1 ]; then
    run "${qr[@]}" delete "$name" --zone "$zone" --force --quiet
  else
    run "${tpu[@]}" delete "$name" --zone "$zone" --quiet
  fi
fi
exit "$status"
