#!/usr/bin/env bash
# The spread of one faithful round over many seeds (the round is chaotic: see docs/results.md).
# Usage: bash experiments/seed_spread.sh SHARED_DIR FIRST_SEED LAST_SEED
set -euo pipefail
SHARED=${1:-${IBAU_SHARED:-../shared}}
OUT=runs/repro
mkdir -p "$OUT"
for s in $(seq "${2:-0}" "${3:-9}"); do
  # skip seeds whose round finished (a file with an empty "rounds" was interrupted)
  python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))[\"rounds\"] else 1)" "$OUT/seed$s.json" 2>/dev/null && continue
  ibau-jax unlearn --checkpoint "$SHARED/ibau-original/checkpoints/badnets_8_02_ckpt.pth" \
    --dataset cifar10 --data-dir "$SHARED/datasets/cifar10" --no-download \
    --trigger-dir "$SHARED/ibau-original/triggers" --attack badnets --target 8 \
    --rounds 1 --K 5 --seed "$s" --out "$OUT/seed$s.json" --quiet
done
python - "$OUT" "${2:-0}" "${3:-9}" <<'PY'
import json, sys, statistics as st
out, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = {s: json.load(open(f"{out}/seed{s}.json"))["rounds"][0] for s in range(a, b + 1)}
print("| seed | clean acc | ASR (all) | ASR (non-target) |\n|---|---|---|---|")
for s, r in rows.items():
    print(f"| {s} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | {r['asr_nontarget']:.4f} |")
for k in ("clean_acc", "asr_all", "asr_nontarget"):
    v = [r[k] for r in rows.values()]
    print(f"{k}: mean {st.mean(v):.4f} std {st.stdev(v):.4f} min {min(v):.4f} max {max(v):.4f} (n={len(v)})")
PY
