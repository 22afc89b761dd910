"""train.py whose weights turn NaN after step DIVERGE_AFTER_STEP, as a run that diverges: every later loss and
gradient norm is NaN. For tests/e2e/test_train_e2e.py's tests of what a diverged run saves (nothing) and says."""
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402

train_step = train.train_step
DIVERGE_AFTER_STEP = int(os.environ["DIVERGE_AFTER_STEP"])


def train_step_then_diverge(run: Any, loader: Any, state: Any, window: Any) -> None:
    train_step(run, loader, state, window)
    if state.step == DIVERGE_AFTER_STEP:
        with torch.no_grad():
            next(run.model.parameters()).fill_(float("nan"))


train.train_step = train_step_then_diverge
sys.exit(train.main())
