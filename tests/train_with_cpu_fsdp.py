"""train.py with FSDP on CPU processes (tests/cpu_fsdp.py), for tests/test_fsdp_checkpoints.py. Launch it like
train.py, with `accelerate launch --multi_gpu --num_processes N`. FAIL_SHARDED_WRITE=RANK:N makes that process's
Nth write of a checkpoint part (two per checkpoint: weights, optimizer) fail as on a full disk."""
import errno
import os
import sys
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import train  # noqa: E402
from cpu_fsdp import enable_fsdp_on_cpu  # noqa: E402

write_part = FileSystemWriter.write_data
parts_written = 0


def write_or_fail(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
    global parts_written
    parts_written += 1
    rank, nth = os.environ.get("FAIL_SHARDED_WRITE", "-1:0").split(":")
    if os.environ.get("RANK") == rank and parts_written == int(nth):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(self.path))
    return write_part(self, *args, **kwargs)


FileSystemWriter.write_data = write_or_fail
enable_fsdp_on_cpu()
sys.exit(train.main())
