"""train.py with FSDP on CPU processes (gloo), which Accelerate enables only on GPUs: the FSDP2 code paths
(sharded training, sharded checkpoints written by torch.distributed.checkpoint, synchronous or asynchronous, and
their resume) run in tests/test_fsdp_checkpoints.py on a machine without one. Launch it like train.py, with
`accelerate launch --multi_gpu --num_processes N`."""
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402

initialise_state = accelerate.state.AcceleratorState.__init__


def enable_fsdp_on_cpu(self: accelerate.state.AcceleratorState, *args: object, fsdp_plugin: object = None,
                       **kwargs: object) -> None:
    """What Accelerate does for an fsdp_plugin on GPUs (the list of device types it checks has no MULTI_CPU)."""
    initialise_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


accelerate.state.AcceleratorState.__init__ = enable_fsdp_on_cpu
sys.exit(train.main())
