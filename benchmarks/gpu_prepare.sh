#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu_check.sh needs on a lent GPU machine that
# cannot download anything: the CIFAR-10 test split and the authors' checkpoint under carry/
# (git-ignored, 29 MB) and the jaxopt wheel under .whl/ (git-ignored). See docs/gpu.md.
# Usage: bash benchmarks/gpu_prepare.sh [SHARED_DIR]
set -euo pipefail
SHARED=${1:-${IBAU_SHARED:-../shared}}
for f in datasets/cifar10/test.npz ibau-original/checkpoints/badnets_8_02_ckpt.pth; do
  [ -f "$SHARED/$f" ] || { echo "missing $SHARED/$f: pass the shared directory as the first argument" >&2; exit 2; }
  mkdir -p "carry/shared/$(dirname "$f")"
  cp "$SHARED/$f" "carry/shared/$f"
done
mkdir -p .whl
# jaxopt is pure Python; the GPU image has jax, flax, optax, torch, tqdm, scipy but not jaxopt.
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "jaxopt==0.8.5"
du -sh carry .whl
echo "ready: run benchmarks/gpu_check.sh on the device with carry=[carry, .whl]"
