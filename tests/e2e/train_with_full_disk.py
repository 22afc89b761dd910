"""train.py on a disk that fills up: FULL_DISK=metrics:N (the N-th line of metrics.jsonl fails), tensorboard:N (the
N-th TensorBoard log fails), trackers (TensorBoard's start fails) or manifest (every write of uploads.json fails,
after a partial write), each with ENOSPC: a fault injected for tests/e2e/test_full_disk.py."""
import builtins
import errno
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import accelerate  # noqa: E402

import train  # noqa: E402
from utils import files, run_log  # noqa: E402

KIND, _, COUNT = os.environ["FULL_DISK"].partition(":")
calls = [0]


def disk_full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def filling_up() -> bool:
    calls[0] += 1
    return calls[0] >= int(COUNT)


def open_metrics(file: Any, *args: Any, **kwargs: Any) -> Any:
    if str(file).endswith("metrics.jsonl") and filling_up():
        raise disk_full(file)
    return builtins.open(file, *args, **kwargs)


log_to_trackers = accelerate.Accelerator.log


def log_tensorboard(self: accelerate.Accelerator, *args: Any, **kwargs: Any) -> None:
    if filling_up():
        raise disk_full("events.out.tfevents")
    log_to_trackers(self, *args, **kwargs)


def init_trackers_on_a_full_disk(self: accelerate.Accelerator, *args: Any, **kwargs: Any) -> None:
    raise disk_full("events.out.tfevents")


def dump_manifest(value: Any, handle: Any, **kwargs: Any) -> None:
    if handle.name.endswith("uploads.json.tmp"):
        handle.write("{")
        raise disk_full(handle.name)
    json.dump(value, handle, **kwargs)


if KIND == "metrics":
    run_log.open = open_metrics  # the module's open, not the builtin everyone else uses
elif KIND == "tensorboard":
    accelerate.Accelerator.log = log_tensorboard
elif KIND == "trackers":
    accelerate.Accelerator.init_trackers = init_trackers_on_a_full_disk
elif KIND == "manifest":
    files.json = types.SimpleNamespace(dump=dump_manifest, loads=json.loads)
sys.exit(train.main())
