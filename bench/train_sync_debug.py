#!/usr/bin/env python3
"""train.py under torch.cuda.set_sync_debug_mode("warn"): every CUDA call that makes the host wait for the device
prints a warning naming the Python line it came from, each time (bench/gpu_check.sh counts them by place over a
short run: logging steps read the device by design, nothing else in the loop should). Arguments are train.py's.
On a machine without CUDA it is train.py as is."""
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402

if torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
warnings.simplefilter("always")  # every occurrence, not once per place
sys.exit(train.main())
