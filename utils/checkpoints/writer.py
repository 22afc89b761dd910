"""Writing a checkpoint folder: synchronously through Accelerate's save_state, or from a copy in host memory in the
background, in both cases under .tmp-<name>/, renamed when complete (the Checkpointer decides which and when).

Asynchronous writes: the loop is blocked only while the state is copied into host memory. A save copies what
Accelerate's save_state would write (the model's state dict, the optimizer's and the schedule's, the fp16 loss
scaler's, each process's RNG) into CPU buffers, pinned on CUDA and reused from save to save, and a background
thread of the main process writes them into the same files save_state writes (model.safetensors,
optimizer.bin, scheduler.bin, scaler.pt, random_states_{rank}.pkl) with Accelerate's own writer. The RNG files
are tiny and written at once by every process (that keeps a copy: a machine with a disk of its own keeps
none), so the background write is the main process's alone and needs no collective from its thread. One write
at a time: a save that finds the previous one still writing waits for it.

Under FSDP every process holds a shard of the weights and of the AdamW state, and the checkpoint is written in
parts by all of them: torch.distributed.checkpoint's stager copies each process's shards into host memory
(pinned on CUDA, and reused from save to save), and its async_save writes them from a thread into the folders
save_state writes for a sharded checkpoint (pytorch_model_fsdp_0/, optimizer_0/), which load_state reads back.
"""
import concurrent.futures
import copy
import logging
import os
import random
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import save as accelerate_save
from accelerate.utils.constants import (
    FSDP_MODEL_NAME,
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_WEIGHTS_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
)
from torch.distributed.checkpoint.api import CheckpointException as DistributedCheckpointError
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from utils.checkpoints.checksums import record_checksums
from utils.checkpoints.folders import TMP_PREFIX
from utils.errors import CheckpointError
from utils.files import fsync_dir, fsync_tree, write_json_atomic

log = logging.getLogger(__name__)
LOW_DISK_BYTES = 256 * 1024 * 1024
"""Below this much free space, a failed save is reported as the disk being full."""


HOST_ALIGNMENT = 64
"""Bytes each host copy's start is aligned to inside the flat allocation."""


class HostBuffers:
    """Host copies of device tensors in one flat allocation of their exact size (each copy aligned to 64 bytes),
    made at the first save and reused by every later one while the tensors keep their names, shapes and dtypes.
    Pinned on CUDA: torch's pinned allocator rounds every allocation up to a power of two, which, tensor by
    tensor, would pin about 2 GB more for the 1.2b state (18.9 GB for 17 GB). Each copy is a tensor of its own
    storage over its part of the allocation (torch.frombuffer), so that torch.save writes the same bytes as it
    does for the originals, not the whole allocation for each."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] = ()
        self.copies: dict[str, torch.Tensor] = {}
        self.allocated_bytes = 0
        self.allocations = 0
        """Flat allocations made so far (a new one when the tensors change, e.g. the optimizer's first state)."""

    def copy_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of `tensors`, by the same keys (the same buffers at every call)."""
        layout = tuple((key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items())
        if layout != self.layout:
            self._allocate(tensors)
            self.layout = layout
        for key, tensor in tensors.items():
            # Non-blocking from a GPU into pinned memory: the copies of the whole state overlap; one sync after.
            self.copies[key].copy_(tensor.detach(), non_blocking=self.pin)
        return dict(self.copies)

    def _allocate(self, tensors: dict[str, torch.Tensor]) -> None:
        self.copies = {}
        offsets, total = {}, 0
        for key, tensor in tensors.items():
            offsets[key] = total
            total += -(-tensor.nbytes // HOST_ALIGNMENT) * HOST_ALIGNMENT
        started = time.monotonic()
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin).numpy()
        for key, tensor in tensors.items():
            if tensor.nbytes == 0:  # frombuffer refuses an empty view
                self.copies[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
                continue
            part = torch.frombuffer(flat, dtype=torch.uint8, count=tensor.nbytes, offset=offsets[key])
            self.copies[key] = part.view(tensor.dtype).view(tensor.shape)
        self.allocated_bytes, self.allocations = total, self.allocations + 1
        log.info(f"Host memory for asynchronous saves: {total / 1e9:,.2f} GB{' pinned' if self.pin else ''} in one "
                 f"allocation ({time.monotonic() - started:,.1f} s), reused by the next saves")


def tensors_in(prefix: str, value: Any) -> dict[str, torch.Tensor]:
    """Every tensor in `value` (dicts, lists, tuples), by its path under `prefix`."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {key: tensor for k, v in value.items() for key, tensor in tensors_in(f"{prefix}/{k}", v).items()}
    if isinstance(value, (list, tuple)):
        return {key: tensor for i, v in enumerate(value) for key, tensor in tensors_in(f"{prefix}/{i}", v).items()}
    return {}


def with_copies(prefix: str, value: Any, copies: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor in it replaced by its copy in `copies` (keyed as tensors_in keys them), and
    everything else deep-copied."""
    if isinstance(value, torch.Tensor):
        return copies[prefix]
    if isinstance(value, dict):
        return type(value)((k, with_copies(f"{prefix}/{k}", v, copies)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(with_copies(f"{prefix}/{i}", v, copies) for i, v in enumerate(value))
    return copy.deepcopy(value)


def rng_state(accelerator: Accelerator) -> dict[str, Any]:
    """This process's random_states_{rank}.pkl, as Accelerate's save_accelerator_state writes it."""
    state = {"step": accelerator.step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return state


class ScheduleState:
    """The schedule's and the fp16 loss scaler's states: small, copied whole, written as save_state writes them."""

    def __init__(self, accelerator: Accelerator, scheduler: Any) -> None:
        self.scheduler = copy.deepcopy(scheduler.state_dict())
        self.scaler = copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None

    def write(self, folder: Path) -> None:
        accelerate_save(self.scheduler, folder / f"{SCHEDULER_NAME}.bin")
        if self.scaler is not None:
            torch.save(self.scaler, folder / SCALER_NAME)


def saved_model_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as save_state writes it: of the model inside DDP's and torch.compile's wrappers
    (Accelerate keeps that one for saving), so that the names carry neither "module." nor "_orig_mod."."""
    return accelerator.get_state_dict(accelerator.unwrap_model(model, keep_torch_compile=False), unwrap=False)


class StateSnapshot:
    """The training state, copied to host memory when made, written by write() from any thread."""

    def __init__(self, accelerator: Accelerator, objects: tuple[torch.nn.Module, Any, Any], buffers: HostBuffers):
        model, optimizer, scheduler = objects
        # Tensors that share storage (tied embeddings) share their copy too, so that Accelerate's writer keeps
        # one of them, as it does for the originals.
        weights = saved_model_state(accelerator, model)
        first_name: dict[tuple[int, int], str] = {}
        for name, tensor in weights.items():
            first_name.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), name)
        key_of = {name: f"model/{first_name[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())]}"
                  for name, tensor in weights.items()}
        optimizer_state = optimizer.state_dict()
        copies = buffers.copy_all({**{key_of[name]: weights[name] for name in first_name.values()},
                                   **tensors_in("optimizer", optimizer_state)})
        self.weights: OrderedDict[str, torch.Tensor] = OrderedDict(
            (name, copies[key_of[name]]) for name in weights)
        self.optimizer = with_copies("optimizer", optimizer_state, copies)
        self.schedule = ScheduleState(accelerator, scheduler)
        if buffers.pin:
            torch.cuda.synchronize()  # the non-blocking copies have landed: the loop may change the originals

    def write(self, folder: Path) -> None:
        """The files save_state writes on the main process (the RNG files are written by every process)."""
        accelerate_save(self.weights, folder / SAFE_WEIGHTS_NAME, safe_serialization=True)
        accelerate_save(self.optimizer, folder / f"{OPTIMIZER_NAME}.bin")
        self.schedule.write(folder)


SHARDED_PARTS = (f"{FSDP_MODEL_NAME}_0", f"{OPTIMIZER_NAME}_0")
"""The folders of a sharded checkpoint's weights and optimizer state, as Accelerate names them."""


class ShardedWriter:
    """What every process keeps from one FSDP save to the next: torch.distributed.checkpoint's stager, which
    reuses its host copies, and a gloo group per part. Made by all processes together (new_group is collective).

    Each async_save runs its collectives (the save plan, the final metadata) on a thread of its own: over the
    training's group they would interleave with the loop's, and two parts sharing a group with each other. They
    wait for a stuck process as long as the training's collectives do (process_group_timeout_s)."""

    def __init__(self, cuda: bool, timeout_s: float) -> None:
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=cuda))
        self.groups = {part: dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       for part in SHARDED_PARTS}

    def close(self) -> None:
        """Once no write is in flight: the host copies and the groups released."""
        self.stager.close()
        for group in self.groups.values():
            dist.destroy_process_group(group)


class ShardedSnapshot:
    """FSDP: this process's shards, copied into host memory when made and written in the background by
    torch.distributed.checkpoint's async_save; the schedule and the fp16 scaler, small, on the main process."""

    def __init__(self, accelerator: Accelerator, objects: tuple[torch.nn.Module, Any, Any], writer: ShardedWriter,
                 folder: Path) -> None:
        model, optimizer, scheduler = objects
        # The sharded state dicts save_state saves, as the FSDP parameters and states themselves: the stager copies.
        sharded = StateDictOptions(full_state_dict=False)
        states = {SHARDED_PARTS[0]: {"model": get_model_state_dict(model, options=sharded)},
                  SHARDED_PARTS[1]: {"optimizer": get_optimizer_state_dict(model, optimizer, options=sharded)}}
        # Each returns once its copy has landed in host memory; the write goes on in the background.
        self.writes: list[concurrent.futures.Future] = []
        try:
            for part, state in states.items():
                self.writes.append(dcp.async_save(state, checkpoint_id=folder / part, async_stager=writer.stager,
                                                  process_group=writer.groups[part]))
        except BaseException:
            self.wait()  # a part already writing must not outlive the save (its thread reads the stager's copies)
            raise
        self.schedule = ScheduleState(accelerator, scheduler) if accelerator.is_main_process else None

    def write(self, folder: Path) -> None:
        """Waits for this process's parts (on the main process, once they return, every process's parts are
        written: its async_save ends by gathering theirs), then writes the main process's small files."""
        self.wait()
        if self.schedule is not None:
            self.schedule.write(folder)


    def wait(self) -> None:
        """Until every part has ended, failed or not (a failed one leaves the others writing); raises the first
        failure."""
        concurrent.futures.wait(self.writes)
        for part in self.writes:
            part.result()


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
        # (Under FSDP the shards are written by torch.distributed.checkpoint's threads, which such an exit waits for.)
        self._thread = threading.Thread(target=run, name=f"checkpoint-writer-{name}", daemon=True)
        self._thread.start()

    def failure(self) -> BaseException | None:
        """The error of a write that has ended, taken (a later wait() does not raise it); None otherwise."""
        if self.busy:
            return None
        error, self._error = self._error, None
        return error

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


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | Path, name: str, json_files: dict[str, Any],
                    copied_files: dict[str, Path] | None = None, shares_first_process_disk: bool = True) -> Path:
    """Saves Accelerate's state, the JSON files and copies of `copied_files` (name in the checkpoint ->
    source, e.g. the run's tokenizer.json) under .tmp-<name>, then renames it to <name>.

    Every process must call it (Accelerate writes each process's RNG state). An existing checkpoint
    of the same name is never overwritten. shares_first_process_disk (shares_checkpoint_disk): False on a
    machine with a disk of its own, which then keeps nothing of the save.
    """
    folder = Path(checkpoint_dir)
    tmp, final = begin_save(accelerator, folder, name)
    with one_line_save_error(name, folder, remove=tmp if accelerator.is_main_process else None):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_save(folder, tmp, final, json_files, copied_files or {})
    accelerator.wait_for_everyone()
    if (not shares_first_process_disk and accelerator.is_local_main_process
            and accelerator.distributed_type != DistributedType.FSDP):
        # A disk of this machine's own: its DDP processes wrote only their RNG states here, which training
        # does not use (no dropout) and resume does without. (Never on a shared disk, where .tmp-<name> may
        # still resolve, through a client's cache, to the checkpoint just renamed.)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def begin_save(accelerator: Accelerator, folder: Path, name: str) -> tuple[Path, Path]:
    """The .tmp-<name> folder to write into (a leftover of a crash removed first) and the final path, which must
    not exist: a checkpoint is never overwritten. Collective."""
    final, tmp = folder / name, folder / f"{TMP_PREFIX}{name}"
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite it")
    with one_line_save_error(name, folder, remove=tmp if accelerator.is_main_process else None):
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        tmp.mkdir(parents=True, exist_ok=True)
    return tmp, final


def finish_save(folder: Path, tmp: Path, final: Path, json_files: dict[str, Any], copied_files: dict[str, Path]) -> None:
    """On the main process, once the state files are in tmp: the JSON files and copies, everything synced to
    the disk, then the rename that makes the checkpoint visible (synced too)."""
    for filename, value in json_files.items():
        write_json_atomic(tmp / filename, value)
    for filename, source in copied_files.items():
        shutil.copyfile(source, tmp / filename)
    for weights in tmp.glob("*.safetensors"):
        follow_umask(weights)
    record_checksums(tmp)  # last: of every file, so that a damaged one is refused when loaded or uploaded
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(folder)  # the rename itself survives a power loss


@contextmanager
def one_line_save_error(name: str, folder: Path, remove: Path | None = None) -> Iterator[None]:
    """A failed write as one CheckpointError line, the half-written folder `remove` (the main process's .tmp-<name>)
    removed with it: a full disk gets back what the save took. torch's writer reports a full disk as
    "[enforce fail at inline_container.cc] unexpected pos": the free space says what it was."""
    try:
        yield
    except (OSError, RuntimeError, CheckpointError, DistributedCheckpointError) as error:
        detail = " ".join(failure_text(error).split())[:300]
        try:
            free = shutil.disk_usage(folder).free  # before the removal, which frees what the save wrote
        except OSError:
            free = None
        if free is not None and free < LOW_DISK_BYTES and "No space left" not in detail:
            detail = f"no space left on device ({free / 1e6:,.0f} MB free): {detail}"
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        raise CheckpointError(f"saving {name} in {folder} failed: {detail}") from None


def follow_umask(path: Path) -> None:
    """safetensors writes a file into a temporary file (mode 0600) renamed into place: `path` gets the mode open()
    gives a new file in its folder (0666 less the umask), as every other file of a checkpoint or an export has, so
    that whoever may read the others may read the weights too."""
    probe = path.with_name(f".mode-probe-{path.name}")
    probe.touch()
    try:
        mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()
    if stat.S_IMODE(path.stat().st_mode) != mode:  # a filesystem of fixed modes (gcsfuse) is never asked to chmod
        os.chmod(path, mode)


def failure_text(error: BaseException) -> str:
    """The error's message; of a failed torch.distributed.checkpoint save (its text is every process's traceback),
    the first failing process's exception."""
    if isinstance(error, DistributedCheckpointError) and error.failures:
        rank, (cause, _) = min(error.failures.items())
        return f"process {rank}: {type(cause).__name__}: {cause}"
    return str(error)
