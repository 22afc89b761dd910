"""FSDP on CPU processes (gloo), which Accelerate enables only on GPUs: for the tests and benchmarks of the FSDP
code paths (sharded training, sharded checkpoints, synchronous or asynchronous, and their resume) on a machine
without one."""
import accelerate.state
from accelerate.utils import DistributedType

initialise_state = accelerate.state.AcceleratorState.__init__


def enable_fsdp_on_cpu() -> None:
    """From now on an Accelerator given an fsdp_plugin on CPU processes is an FSDP one, as it is on GPUs (the
    device types Accelerate checks for it leave out MULTI_CPU)."""
    def initialise(self: accelerate.state.AcceleratorState, *args: object, fsdp_plugin: object = None,
                   **kwargs: object) -> None:
        initialise_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = initialise
