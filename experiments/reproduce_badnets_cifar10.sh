#!/usr/bin/env bash
# One faithful I-BAU round (K=5, original defaults, L2 projection on as in the notebook) on the
# authors' BadNets checkpoint, for seeds 0 1 2. Writes runs/repro/seed{S}.json/.md and prints the table.
# Usage: bash experiments/reproduce_badnets_cifar10.sh [SHARED_DIR]
set -euo pipefail
SHARED=${1:-${IBAU_SHARED:-../shared}}
OUT=runs/repro
mkdir -p "$OUT"
for s in 0 1 2; do
  ibau-jax unlearn --checkpoint "$SHARED/ibau-original/checkpoints/badnets_8_02_ckpt.pth" \
    --dataset cifar10 --data-dir "$SHARED/datasets/cifar10" --no-download \
    --trigger-dir "$SHARED/ibau-original/triggers" --attack badnets --target 8 \
    --rounds 1 --K 5 --seed "$s" --out "$OUT/seed$s.json" --quiet
done
python - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.load(open(f"{sys.argv[1]}/seed{s}.json")) for s in (0, 1, 2)]
print("| seed | clean acc | ASR (all) | ASR (non-target) | round s (incl. compile) |")
print("|---|---|---|---|---|")
for s, r in zip((0, 1, 2), rows):
    a = r["rounds"][0]
    print(f"| {s} | {a['clean_acc']:.4f} | {a['asr_all']:.4f} | {a['asr_nontarget']:.4f} | {a['seconds']:.1f} |")
m = lambda k: st.mean(r["rounds"][0][k] for r in rows)
print(f"| mean | {m('clean_acc'):.4f} | {m('asr_all'):.4f} | {m('asr_nontarget'):.4f} | |")
PY
