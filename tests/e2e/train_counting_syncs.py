"""train.py with every read of a tensor's value on the host counted, for tests/e2e/test_host_syncs.py: on a GPU each of
them waits until the device has finished all the work queued before it.

Counted: Tensor.item, tolist, __bool__, __float__, __int__, __index__ and cpu, called on the training loop's thread
(the data loader's and the checkpoint writers' threads do host work of their own). Not counted: Tensor.numpy, which
refuses a tensor on a GPU, so that a call of it cannot wait for one. Each count is attributed to the step whose
train_step() it follows, with the place in the code it came from; the steps that ended with a logging line (the
one place the loop reads the device by design) are recorded too. Written as JSON to SYNC_LOG.<rank>.json.
"""
import atexit
import json
import os
import sys
import threading
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")
current_step = [0]
reads: dict[int, list[str]] = defaultdict(list)
logging_steps: list[int] = []


def caller() -> str:
    """The innermost frame outside torch: the code that asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "torch"


def counted(name: str, read: Any) -> Any:
    def read_and_count(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            reads[current_step[0]].append(f"Tensor.{name} from {caller()}")
        return read(self, *args, **kwargs)

    return read_and_count


def train_step_counted(run: Any, loader: Any, state: Any, window: Any) -> None:
    current_step[0] = state.step + 1
    train_step(run, loader, state, window)


def log_and_check_noted(run: Any, state: Any, window: Any) -> None:
    logging_steps.append(state.step)
    log_and_check(run, state, window)


def write_log() -> None:
    path = Path(f"{os.environ['SYNC_LOG']}.{os.environ.get('RANK', '0')}.json")
    path.write_text(json.dumps({"reads": {str(step): sources for step, sources in reads.items()},
                                "logging_steps": logging_steps}))


train_step, log_and_check = train.train_step, train.log_and_check
train.train_step, train.log_and_check = train_step_counted, log_and_check_noted
for method in READS:
    setattr(torch.Tensor, method, counted(method, getattr(torch.Tensor, method)))
atexit.register(write_log)
sys.exit(train.main())
