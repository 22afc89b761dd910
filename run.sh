#!/usr/bin/env bash
# Launch training: bash run.sh CONFIG [MAX_STEPS] [more train.py flags]
#   bash run.sh tiny                 # sets up venv/ and the sample data if missing, then trains
#   bash run.sh production 5000 --resume latest
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=${1:-test}
shift || true
ARGS=(--config "$CONFIG")
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  ARGS+=(--max-steps "$1")
  shift
fi

[ -x venv/bin/python ] || bash setup.sh
if [ "$CONFIG" = "tiny" ] && ! ls data/sample/tokenized_*.npz >/dev/null 2>&1; then
  venv/bin/python scripts/prepare_data.py --sample
fi
exec venv/bin/python train.py "${ARGS[@]}" "$@"
