#!/usr/bin/env bash
# The GPU check in one call on a lent GPU machine (prepared here by bench/prepare_gpu_check.sh, with .gpu
# carried): installs the carried wheels, checks that what train.py imports imports (one error line and exit 2
# if not, before anything runs), runs the bare-model anchor (.gpu/gpu_anchor_bench.py), then
# bench/gpu_bench.py (train.py itself) on the same card, in the order of what matters most, within
# TOTAL_S seconds (default 540, for a 600-second call). Logs, JSON and each run's stderr tail go to $OUT (or
# bench/gpu_results). The exit code is not 0 when the anchor or a variant failed.
#   bash bench/gpu_check.sh
#   TOTAL_S=300 VARIANTS=tiny,1.2b-compiled-mb8 ANCHOR_BUDGET_S=60 bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --smoke     # the import check and gpu_bench.py --smoke only: seconds, on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export OUT=${OUT:-bench/gpu_results} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
smoke=0
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
elif [ $# -gt 0 ]; then
  echo "error: unknown argument $1; the only one is --smoke (settings are environment variables)" >&2
  exit 2
fi

# The carried wheels are built for the lent machine's Python (cp312): a smoke run uses what is installed.
if [ "$smoke" = 0 ] && [ -d .gpu/wheels ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
    .gpu/wheels/*.whl || { echo "error: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
# Before any benchmark: a package missing or built for another protobuf is one line here, not a dead variant.
"$PYTHON" bench/check_imports.py 2>&1 | tee "$OUT/imports.log" || exit 2

bench_args=(--smoke)
anchor_status=0
if [ "$smoke" = 0 ]; then
  nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
  # The anchor first: its compiled micro-batch-8 row is what train.py's 1.2b-compiled-mb8 row is held against.
  if [ -f .gpu/gpu_anchor_bench.py ]; then
    # shellcheck disable=SC2086  # ANCHOR_ARGS is a list of flags
    "$PYTHON" .gpu/gpu_anchor_bench.py --budget-s "${ANCHOR_BUDGET_S:-90}" ${ANCHOR_ARGS:-} 2>&1 | tee "$OUT/anchor.log"
    anchor_status=$?
    [ "$anchor_status" = 0 ] || echo "error: the anchor failed (exit $anchor_status); its log is $OUT/anchor.log" >&2
  else
    echo "warning: .gpu/gpu_anchor_bench.py missing (run bench/prepare_gpu_check.sh); no anchor to compare with" >&2
  fi
  # Short checks before the long variants: which attention kernels the compiled model runs, and where the loop
  # makes the host wait for the device (a tiny run of 30 steps, logging every 10, under sync debug mode).
  timeout 150 "$PYTHON" bench/gpu_profile.py 2>&1 | grep -v "^USDT" | tee "$OUT/attention_kernels.log" \
    || echo "error: bench/gpu_profile.py failed; its log is $OUT/attention_kernels.log" >&2
  sync_run=$(mktemp -d)
  printf '{"model_preset": "tiny", "data": "%s", "max_steps": 30, "logging_steps": 10, "save_steps": 1000000, "global_batch_size": 8, "per_device_train_batch_size": 8, "eval_holdout_files": 0, "checkpoint_dir": "%s/ck", "log_dir": "%s/logs"}' \
    "$sync_run/data" "$sync_run" "$sync_run" >"$sync_run/config.json"
  "$PYTHON" -c "import sys; sys.path.insert(0, '.'); from bench.gpu_bench import make_shards; make_shards(__import__('pathlib').Path(sys.argv[1]), 4096, 2**18)" "$sync_run/data"
  timeout 150 "$PYTHON" bench/train_sync_debug.py --config "$sync_run/config.json" --upload-destination none >"$OUT/sync_debug.log" 2>&1
  echo "sync debug (exit $?): $(grep -c 'synchronizing CUDA operation' "$OUT/sync_debug.log") synchronizing calls in 30 steps (3 logging steps), by place:"
  grep 'synchronizing CUDA operation' "$OUT/sync_debug.log" | grep -o '^[^ ]*\.py:[0-9]*' | sort | uniq -c | sort -rn | head -15
  rm -rf "$sync_run"
  # gpu_bench starts no variant after its budget and lets the one running go on up to 120 s past it.
  # At least one variant runs, however long the anchor took.
  budget=$((${TOTAL_S:-540} - (SECONDS - start) - 150))
  [ "$budget" -ge 30 ] || budget=30
  bench_args=(--budget-s "$budget" --anchor "$OUT/anchor.json")
  [ -z "${VARIANTS:-}" ] || bench_args+=(--variants "$VARIANTS")
fi
"$PYTHON" bench/gpu_bench.py --out "$OUT" "${bench_args[@]}" 2>&1 | tee "$OUT/gpu_bench.log"
bench_status=$?
echo "gpu_check: $((SECONDS - start)) s"
[ "$bench_status" = 0 ] || exit "$bench_status"
[ "$anchor_status" = 0 ] || exit 1
