"""train.py on a model that raises torch.OutOfMemoryError, as CUDA's allocator does, for any micro-batch above
OOM_ABOVE samples, for tests/e2e/test_out_of_memory.py (the CPU has no allocator that runs out this way)."""
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoXForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402

LIMIT = int(os.environ["OOM_ABOVE"])


def forward_with_a_memory_limit(self: GPTNeoXForCausalLM, *args: Any, **kwargs: Any) -> Any:
    if kwargs["input_ids"].shape[0] > LIMIT:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.02 GiB is free. Including non-PyTorch memory, ...")
    return forward(self, *args, **kwargs)


forward = GPTNeoXForCausalLM.forward
GPTNeoXForCausalLM.forward = forward_with_a_memory_limit
sys.exit(train.main())
