"""train.py with FSDP on CPU processes (tests/e2e/cpu_fsdp.py), for tests/e2e/test_fsdp_checkpoints.py. Launch it like
train.py, with `accelerate launch --multi_gpu --num_processes N`. FAIL_SHARDED_WRITE=RANK:PART:N makes that
process's Nth write of PART (pytorch_model_fsdp_0 or optimizer_0) fail as on a full disk, while every process's
writes of the other part take half a second longer (still under way when the failure is known)."""
import errno
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from cpu_fsdp import enable_fsdp_on_cpu  # noqa: E402

import train  # noqa: E402

write_part = FileSystemWriter.write_data
writes = Counter[str]()  # by part: the parts are written on threads of their own


def write_or_fail(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
    part = Path(self.path).name
    writes[part] += 1
    rank, failing_part, nth = os.environ["FAIL_SHARDED_WRITE"].split(":")
    if part != failing_part:
        time.sleep(0.5)
    elif os.environ.get("RANK") == rank and writes[part] == int(nth):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(self.path))
    return write_part(self, *args, **kwargs)


if "FAIL_SHARDED_WRITE" in os.environ:
    FileSystemWriter.write_data = write_or_fail
enable_fsdp_on_cpu()
sys.exit(train.main())
