#!/usr/bin/env bash
# Creates venv/ with the pinned requirements and checks that they import. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x venv/bin/python ]; then
  echo "Creating venv/ with $($PYTHON --version)"
  "$PYTHON" -m venv venv
fi
# torch first, pinned, so that nothing below can pull another build (a CUDA build is several GB
# on a CPU machine). On a CUDA machine the same pin installs the CUDA build.
TORCH_PIN=$(grep '^torch==' requirements.txt)
venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_PIN"
venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

venv/bin/python - <<'PY'
import accelerate, google.cloud.storage, matplotlib, numpy, psutil, safetensors, tensorboard, tokenizers, torch, tqdm
import transformers
print(f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}")
PY
echo "Setup complete. Activate with: source venv/bin/activate"
