"""train.py whose background checkpoint writes take SLOW_WRITE_S seconds longer, as a 17 GB write to a slow
disk would, and whose FAIL_WRITE-th background write fails, as on a disk error: faults injected for
tests/e2e/test_async_save.py (kill -9 during a write, a save waiting for one, a write that fails)."""
import errno
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402
from utils.checkpoints.writer import StateSnapshot

write_fast = StateSnapshot.write
writes: list[Path] = []


def write_slowly(self: StateSnapshot, folder: Path) -> None:
    writes.append(folder)
    time.sleep(float(os.environ.get("SLOW_WRITE_S", "0")))
    if len(writes) == int(os.environ.get("FAIL_WRITE", "0")):
        raise OSError(errno.EIO, "Input/output error (injected)", str(folder / "model.safetensors"))
    write_fast(self, folder)


StateSnapshot.write = write_slowly
sys.exit(train.main())
