#!/usr/bin/env bash
# The GPU check in one call on a lent GPU machine (prepared here by bench/prepare_gpu_check.sh, with .gpu
# carried): installs the carried wheels, runs the bare-model anchor (.gpu/gpu_anchor_bench.py), then
# bench/gpu_bench.py (train.py itself) on the same card, in the order of what matters most, within
# TOTAL_S seconds (default 540, for a 600-second call). Logs and JSON go to $OUT (or bench/gpu_results).
#   bash bench/gpu_check.sh
#   TOTAL_S=300 VARIANTS=tiny,1.2b-compiled-mb8 ANCHOR_BUDGET_S=60 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export OUT=${OUT:-bench/gpu_results} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

if [ -d .gpu/wheels ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
    .gpu/wheels/*.whl || { echo "error: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"

# The anchor first: its compiled micro-batch-8 row is what train.py's 1.2b-compiled-mb8 row is held against.
if [ -f .gpu/gpu_anchor_bench.py ]; then
  # shellcheck disable=SC2086  # ANCHOR_ARGS is a list of flags
  "$PYTHON" .gpu/gpu_anchor_bench.py --budget-s "${ANCHOR_BUDGET_S:-90}" ${ANCHOR_ARGS:-} 2>&1 | tee "$OUT/anchor.log"
else
  echo "warning: .gpu/gpu_anchor_bench.py missing (run bench/prepare_gpu_check.sh); no anchor to compare with" >&2
fi

# gpu_bench starts no variant after its budget and lets the one running go on up to 120 s past it.
# At least one variant runs, however long the anchor took.
budget=$((${TOTAL_S:-540} - (SECONDS - start) - 150))
[ "$budget" -ge 30 ] || budget=30
"$PYTHON" bench/gpu_bench.py --out "$OUT" --budget-s "$budget" --anchor "$OUT/anchor.json" \
  --variants "${VARIANTS:-tiny,1.2b-compiled-mb8,1.2b-eager,1.2b-compiled-ac,1.2b-compiled,1.2b-eager-ac}" \
  2>&1 | tee "$OUT/gpu_bench.log"
echo "gpu_check: $((SECONDS - start)) s"
