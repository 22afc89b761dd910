"""train.py whose background checkpoint writes take SLOW_WRITE_S seconds longer, as a 17 GB write to a slow
disk would: a fault injected for tests/test_async_save.py (kill -9 during a write, a save waiting for one)."""
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402
from utils.checkpoint_writer import StateSnapshot  # noqa: E402

write_fast = StateSnapshot.write


def write_slowly(self: StateSnapshot, folder: Path) -> None:
    time.sleep(float(os.environ["SLOW_WRITE_S"]))
    write_fast(self, folder)


StateSnapshot.write = write_slowly
sys.exit(train.main())
