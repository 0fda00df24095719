#!/usr/bin/env bash
# The wheels the lent GPU machine's image lacks, into .whl/ (git-ignored; the device call carries
# it): grain and its array-record, ml-collections, portpicker (../shared/tools/device-wheels.sh's
# defaults), tensorboardX (our TensorBoard writer) and fla-core (flash-linear-attention's ops, the
# linear-attention peer). The image has jax, flax, optax, orbax, tensorboard, torch, triton,
# einops, packaging, protobuf. Run here, where the registries are reachable:
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/device-wheels.sh tensorboardX==2.6.5 fla-core==0.6.0
