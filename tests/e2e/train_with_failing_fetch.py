"""train.py in which process rank 1 (only) cannot fetch its FAIL_AT-th shard, as when one machine's download
fails after its retries: a fault injected for tests/e2e/test_multiprocess.py."""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402
from utils.data.shards import LocalShardSource
from utils.errors import ShardUnavailableError

fetch_local = LocalShardSource.fetch
fetches: list[str] = []


def fetch_failing_on_rank_1(self: LocalShardSource, name: str) -> Path:
    fetches.append(name)
    if os.environ.get("RANK") == "1" and len(fetches) == int(os.environ["FAIL_AT"]):
        raise ShardUnavailableError(f"{name}: download failed (injected, rank 1 only)")
    return fetch_local(self, name)


LocalShardSource.fetch = fetch_failing_on_rank_1
sys.exit(train.main())
