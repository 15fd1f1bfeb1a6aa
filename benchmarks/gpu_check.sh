#!/usr/bin/env bash
# One-shot GPU checks on a lent device machine (docs/gpu.md): the faithful round (JAX on the GPU
# against the PyTorch reference on the same GPU) and the training throughput, in one command
# that fits the device budget. Prepare with benchmarks/gpu_prepare.sh; on the device, from the
# repository root:   bash benchmarks/gpu_check.sh        (results under $OUT, else runs/gpu_check)
# ROUND_ARGS / TRAIN_ARGS add arguments (e.g. ROUND_ARGS="--limit-batches 2" for a smoke test).
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
SHARED=${IBAU_SHARED:-carry/shared}
TORCH_DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo none)
{ nvidia-smi -L 2>/dev/null; python3 -c "import jax, flax, optax, jaxopt; print('jax', jax.__version__, jax.devices())"; \
  echo "torch device: $TORCH_DEVICE"; } 2>&1 | tee "$OUT/env.txt"
TORCH_FLAGS=(--torch-device "$TORCH_DEVICE"); [ "$TORCH_DEVICE" = none ] && TORCH_FLAGS=(--skip-torch)
rc=0
python3 benchmarks/round_time.py --shared "$SHARED" "${TORCH_FLAGS[@]}" --out "$OUT/round_time.json" ${ROUND_ARGS:-} \
  2>&1 | tee "$OUT/round_time.log" || rc=1
python3 benchmarks/train_throughput.py "${TORCH_FLAGS[@]}" --out "$OUT/train_throughput.json" ${TRAIN_ARGS:-} \
  2>&1 | tee "$OUT/train_throughput.log" || rc=1
exit $rc
