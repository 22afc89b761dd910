"""train.py whose validation batches take SLOW_BATCH_S seconds each, as a long validation of a large model does,
and are counted, one line each, in the file VALIDATION_TRACE: a fault injected for tests/e2e/test_unattended.py (a
stop request honoured between validation batches)."""
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402
from utils.data.evaluation import Evaluator

evaluate = Evaluator.evaluate


def evaluate_slowly(self: Evaluator, model: Any, accelerator: Any, stop_agreed: Any = lambda: False) -> Any:
    def slow_stop_agreed() -> bool:
        time.sleep(float(os.environ["SLOW_BATCH_S"]))
        with open(os.environ["VALIDATION_TRACE"], "a") as trace:
            trace.write("batch\n")
        return stop_agreed()
    return evaluate(self, model, accelerator, slow_stop_agreed)


Evaluator.evaluate = evaluate_slowly
sys.exit(train.main())
