"""train.py with the DistributedDataParallel it builds and its zero_grad calls recorded, for
tests/e2e/test_ddp_settings.py: DDP's bucket size, buffer broadcast and bucket views as the wrapped model holds them,
and set_to_none of every zero_grad. Written as JSON to DDP_LOG.<rank>.json."""
import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402

record: dict[str, Any] = {"ddp": [], "set_to_none": []}


def ddp_init_recorded(self: torch.nn.parallel.DistributedDataParallel, *args: Any, **kwargs: Any) -> None:
    ddp_init(self, *args, **kwargs)
    record["ddp"].append({"bucket_bytes_cap": self.bucket_bytes_cap, "broadcast_buffers": self.broadcast_buffers,
                          "gradient_as_bucket_view": self.gradient_as_bucket_view})


def zero_grad_recorded(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    record["set_to_none"].append(set_to_none)
    zero_grad(self, set_to_none)


def write_log() -> None:
    Path(f"{os.environ['DDP_LOG']}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


ddp_init, zero_grad = torch.nn.parallel.DistributedDataParallel.__init__, torch.optim.Optimizer.zero_grad
torch.nn.parallel.DistributedDataParallel.__init__ = ddp_init_recorded
torch.optim.Optimizer.zero_grad = zero_grad_recorded
atexit.register(write_log)
sys.exit(train.main())
