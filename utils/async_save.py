"""Asynchronous checkpoint writes: the loop is blocked only while the state is copied into host memory.

A save copies what Accelerate's save_state would write (the model's state dict, the optimizer's and the
schedule's, the fp16 loss scaler's, each process's RNG) into CPU buffers, pinned on CUDA and reused from
save to save, and a background thread of the main process writes them into the same files save_state
writes (model.safetensors, optimizer.bin, scheduler.bin, scaler.pt, random_states_{rank}.pkl) with
Accelerate's own writer. The RNG files are tiny and written at once by every process, so the background
write is the main process's alone and needs no collective from its thread. One write at a time: a save
that finds the previous one still writing waits for it.

FSDP checkpoints are sharded by torch.distributed.checkpoint inside save_state: those saves stay synchronous.
"""
import copy
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import save as accelerate_save
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME

log = logging.getLogger(__name__)


class HostBuffers:
    """CPU copies of device tensors, one buffer per key, allocated once and reused by every later save."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pin)
            self.buffers[key] = buffer
        # Non-blocking from a GPU into pinned memory: the copies of the whole state overlap; one sync after.
        buffer.copy_(tensor.detach(), non_blocking=self.pin)
        return buffer

    def copy_tree(self, prefix: str, value: Any) -> Any:
        """`value` with every tensor in it (dicts, lists, tuples) replaced by its host copy."""
        if isinstance(value, torch.Tensor):
            return self.copy(prefix, value)
        if isinstance(value, dict):
            return type(value)((k, self.copy_tree(f"{prefix}/{k}", v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self.copy_tree(f"{prefix}/{i}", v) for i, v in enumerate(value))
        return copy.deepcopy(value)

    @property
    def bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())


def rng_state(accelerator: Accelerator) -> dict[str, Any]:
    """This process's random_states_{rank}.pkl, as Accelerate's save_accelerator_state writes it."""
    state = {"step": accelerator.step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return state


class StateSnapshot:
    """The training state copied to host memory by snapshot(), written by write() from any thread."""

    def __init__(self, accelerator: Accelerator, objects: tuple[torch.nn.Module, Any, Any], buffers: HostBuffers):
        model, optimizer, scheduler = objects
        # Tensors that share storage (tied embeddings) share their copy too, so that Accelerate's writer keeps
        # one of them, as it does for the originals.
        copies: dict[tuple[int, int], torch.Tensor] = {}
        self.weights: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, tensor in accelerator.get_state_dict(model, unwrap=False).items():
            shared = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if shared not in copies:
                copies[shared] = buffers.copy(f"model/{name}", tensor)
            self.weights[name] = copies[shared]
        self.optimizer = buffers.copy_tree("optimizer", optimizer.state_dict())
        self.scheduler = copy.deepcopy(scheduler.state_dict())
        self.scaler = copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None
        if buffers.pin:
            torch.cuda.synchronize()  # the non-blocking copies have landed: the loop may change the originals

    def write(self, folder: Path) -> None:
        """The files save_state writes on the main process (the RNG files are written by every process)."""
        accelerate_save(self.weights, folder / SAFE_WEIGHTS_NAME, safe_serialization=True)
        accelerate_save(self.optimizer, folder / f"{OPTIMIZER_NAME}.bin")
        accelerate_save(self.scheduler, folder / f"{SCHEDULER_NAME}.bin")
        if self.scaler is not None:
            torch.save(self.scaler, folder / SCALER_NAME)


def write_rng_state(accelerator: Accelerator, folder: Path) -> None:
    torch.save(rng_state(accelerator), folder / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")


class BackgroundWriter:
    """One thread that runs one write at a time; its error is raised by the next wait()."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.name: str | None = None
        """The checkpoint being written (or the last one)."""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, name: str, job: Callable[[], None]) -> None:
        assert not self.busy, "one write at a time: wait() first"
        self.name = name

        def run() -> None:
            try:
                job()
            except BaseException as error:  # noqa: BLE001  (raised again by wait(), on the loop's thread)
                self._error = error

        # A daemon: an exit that does not wait (a second Ctrl+C) leaves a .tmp- folder, removed at the next start.
        self._thread = threading.Thread(target=run, name=f"checkpoint-writer-{name}", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Waits for the write in flight, if any; returns the seconds waited. Raises the write's error."""
        started = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return time.perf_counter() - started
