#!/usr/bin/env bash
# For a GPU machine without a package index (an image that already has jax 0.11.2 with CUDA,
# flax, optax, orbax, tensorboard and torch): downloads, into .whl/, the wheels lmtrain needs
# beyond those (grain, array-record, ml-collections, portpicker, tensorboardX) and fla-core
# (flash-linear-attention's ops, the linear-attention peer of the benchmark), for Python 3.12 on
# x86_64. Run it where the index is reachable, copy .whl/ along with the checkout;
# scripts/gpu_check.sh installs them into /tmp/site (never over the image's jax or flax).
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker \
            tensorboardX==2.6.5 fla-core==0.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls .whl
