#!/usr/bin/env bash
# Prepares the one-call GPU check (bench/gpu_check.sh) on a development machine, before a lent GPU machine
# is used: the lent machine sees only this repository (not ../shared) and has no internet, and its Python
# (3.12) lacks the packages train.py imports for GCS and archives. This puts into .gpu/ (ignored by git):
#   .gpu/gpu_anchor_bench.py   the bare-model anchor from ../shared/bench, to compare train.py with
#   .gpu/wheels/               wheels for the missing packages, at the versions venv/ uses
# Then, on the lent machine: run `bash bench/gpu_check.sh` with `.gpu` carried.
#   bash bench/prepare_gpu_check.sh [ANCHOR_PATH]
set -euo pipefail
cd "$(dirname "$0")/.."

ANCHOR=${1:-../shared/bench/gpu_anchor_bench.py}
[ -f "$ANCHOR" ] || { echo "error: anchor benchmark $ANCHOR not found; pass its path" >&2; exit 2; }
[ -x venv/bin/python ] || { echo "error: venv/ missing; run bash setup.sh first" >&2; exit 2; }

mkdir -p .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu
mkdir -p .gpu/wheels
cp "$ANCHOR" .gpu/gpu_anchor_bench.py

# What train.py imports beyond the lent machine's image (its list is in the device tool's KINDS.md:
# torch, transformers, accelerate, numpy, requests, protobuf, tensorboard, tqdm, psutil... are there). protobuf
# is carried too: google-cloud-storage's generated modules refuse a protobuf runtime older than they were made for.
PACKAGES=(google-cloud-storage google-cloud-core google-api-core google-auth google-resumable-media google-crc32c
          googleapis-common-protos proto-plus protobuf pyasn1 pyasn1-modules cryptography cffi pycparser
          opentelemetry-api zstandard)
FROZEN=$(venv/bin/python -m pip freeze 2>/dev/null)
PINS=()
for package in "${PACKAGES[@]}"; do
  # pip freeze may spell a name with _ or capitals; compare normalised names.
  pin=$(echo "$FROZEN" | awk -F'==' -v want="$package" \
    'BEGIN { gsub(/[-_.]+/, "-", want) } { name = tolower($1); gsub(/[-_.]+/, "-", name); if (name == want) print $0 }')
  [ -n "$pin" ] || { echo "error: $package is not installed in venv/; run bash setup.sh" >&2; exit 2; }
  PINS+=("$pin")
done
venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .gpu/wheels "${PINS[@]}"
echo "ready: $(ls .gpu/wheels | wc -l) wheels ($(du -sh .gpu | cut -f1) in .gpu/); carry .gpu and run bash bench/gpu_check.sh"
