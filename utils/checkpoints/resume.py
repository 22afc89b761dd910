"""Which checkpoint a run resumes from, the same one on every process, and its copy on every machine.

The first process chooses (the disks of several machines may hold different checkpoints) among the local
checkpoints and those at the upload destination, refusing a fresh start where checkpoints exist and a
resume that would overwrite newer ones, locally or at the destination. A machine whose disk lacks the
chosen checkpoint downloads it; when one process cannot have it, every process stops with that error.
"""
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from configs.model_config import ModelShape, shape_as_dict
from configs.training_config import ConfigError, TrainingConfig
from utils.accelerator import first_process_decides
from utils.checkpoints.folders import list_checkpoints
from utils.display import one_line
from utils.errors import CheckpointError, UploadError
from utils.files import read_json
from utils.storage.base import ObjectInfo, Storage, StorageError
from utils.uploads.destination import (
    check_fresh_destination,
    check_no_newer_at_destination,
    download_checkpoint,
    find_local_or_remote,
    remote_checkpoints,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeTarget:
    """The checkpoint every process resumes from, present on this machine."""

    path: Path
    own_copy: bool
    """Downloaded by this machine for itself (a disk of its own): deleted once every process has loaded it."""
    saved_config: dict[str, Any]
    """The training_config.json of the run that saved it (with its model_shape)."""

    @property
    def name(self) -> str:
        return self.path.name

    def release(self, accelerator: Accelerator) -> None:
        """After loading: once every process has read it, a machine's own downloaded copy goes."""
        accelerator.wait_for_everyone()
        if self.own_copy:
            shutil.rmtree(self.path, ignore_errors=True)


def choose_checkpoint(checkpoint_dir: str, resume: str | None,
                      remote: Storage | None) -> tuple[str, ObjectInfo | None] | None:
    """On the first process: the checkpoint's name, and its archive at the destination if there is one;
    None for a fresh start. Refuses a fresh start or a resume that would overwrite checkpoints. "auto" is
    "latest" where a checkpoint exists, locally or at the destination, and a fresh start where none does."""
    existing = list_checkpoints(checkpoint_dir)
    if resume == "auto":
        resume = "latest" if existing or (remote is not None and holds_checkpoints(remote)) else None
        where = f"{checkpoint_dir}" + (f" or at {remote.url}" if remote is not None else "")
        log.info("--resume auto: resuming the newest checkpoint" if resume else
                 f"--resume auto: no checkpoint in {where}, so a fresh start")
    if resume is None:
        if existing:
            raise CheckpointError(f"{checkpoint_dir} already holds checkpoints (newest {existing[-1].name}); "
                                  "pass --resume latest to continue, or set --checkpoint-dir for a new run")
        if remote is not None:
            check_fresh_destination(remote)
        return None
    info, remote_object = find_local_or_remote(checkpoint_dir, resume, remote)
    newer = [other.name for other in existing if other.step > info.step]
    if newer:
        raise CheckpointError(f"resuming {info.name} would overwrite newer checkpoints ({', '.join(newer)}); "
                              "move them out of the checkpoint folder first")
    if remote is not None:
        check_no_newer_at_destination(remote, info)
    return info.name, remote_object


def holds_checkpoints(remote: Storage) -> bool:
    """Whether the destination holds any checkpoint."""
    try:
        return bool(remote_checkpoints(remote))
    except StorageError as error:
        raise UploadError(f"listing checkpoints at {remote.url}: {error}") from None


def resume_target(checkpoint_dir: str, resume: str | None, remote: Storage | None, accelerator: Accelerator,
                  shares_first_process_disk: bool) -> ResumeTarget | None:
    """The checkpoint to resume from, the same for every process (collective); None for a fresh start."""
    choice = first_process_decides(accelerator, lambda: choose_checkpoint(checkpoint_dir, resume, remote))
    if choice is None:
        return None
    name, remote_object = choice
    path, own_copy = fetch_for_resume(checkpoint_dir, name, remote_object, remote, accelerator,
                                      shares_first_process_disk)
    return ResumeTarget(path, own_copy, read_json(path / "training_config.json"))


def check_resumable(target: ResumeTarget, config: TrainingConfig, shape: ModelShape, num_processes: int) -> None:
    """Refuses a checkpoint of another model shape, and a schedule or a global batch that would change without being
    asked to."""
    saved_shape = target.saved_config.get("model_shape")
    if saved_shape != shape_as_dict(shape):
        raise CheckpointError(f"{target.name} holds a model of shape {saved_shape}, not this config's "
                              f"{shape_as_dict(shape)}")
    saved_length = saved_schedule_steps(target.saved_config)
    if config.lr_decay_steps is None and saved_length is not None and saved_length != config.max_steps:
        # Without lr_decay_steps the cosine runs over max_steps: a new --max-steps would reshape the rest of it.
        raise ConfigError(f"resuming {target.name} would change the learning-rate schedule from {saved_length} to "
                          f"{config.max_steps} steps (lr_decay_steps is unset, so it follows max_steps): set "
                          f"lr_decay_steps {saved_length} to keep it (steps past {saved_length} then run at the "
                          f"final rate), or lr_decay_steps {config.max_steps} to decay over the new length")
    check_global_batch(target, config, num_processes)


def saved_process_count(target: ResumeTarget) -> int | None:
    """How many processes trained the checkpoint (None for one that does not say)."""
    count = target.saved_config.get("num_processes")
    if count is None:  # saved before training_config.json recorded it: metadata.json's system_info does
        system = read_json(target.path / "metadata.json").get("system_info", {})
        count = system.get("num_processes") if isinstance(system, dict) else None
    return count if isinstance(count, int) and count > 0 else None


def saved_global_batch(target: ResumeTarget) -> int | None:
    """Samples per optimizer step of the run that saved a checkpoint (None where it cannot be told)."""
    saved = target.saved_config
    if isinstance(saved.get("samples_per_step"), int):
        return saved["samples_per_step"]
    processes, micro = saved_process_count(target), saved.get("per_device_train_batch_size")
    if processes is None or not isinstance(micro, int):
        return None
    return micro * (saved.get("gradient_accumulation_steps") or 1) * processes


def check_global_batch(target: ResumeTarget, config: TrainingConfig, num_processes: int) -> None:
    """Refuses to go on with another number of samples per step unless accept_new_global_batch says so: on another
    number of GPUs, a config without global_batch_size would change it silently."""
    saved, now = saved_global_batch(target), config.global_batch(num_processes)
    if saved is None or saved == now or config.accept_new_global_batch:
        return
    raise ConfigError(f"resuming {target.name} would change the global batch from {saved} to {now} samples a step "
                      f"(per_device_train_batch_size x accumulation x {num_processes} process(es)): set "
                      f"global_batch_size {saved} to keep it on any number of processes, or "
                      "--set accept_new_global_batch=true to train on with the new one")


def batch_changes(target: ResumeTarget, config: TrainingConfig, num_processes: int) -> list[str]:
    """The global batch's change, when accept_new_global_batch allowed one."""
    saved, now = saved_global_batch(target), config.global_batch(num_processes)
    return [] if saved in (None, now) else [f"global batch: {saved} -> {now} samples a step"]


def saved_schedule_steps(saved_config: dict[str, Any]) -> int | None:
    """The schedule length of the run that saved a checkpoint (None for a config that does not say)."""
    length = saved_config.get("lr_decay_steps") or saved_config.get("max_steps")
    return length if isinstance(length, int) else None


def schedule_changes(target: ResumeTarget, config: TrainingConfig) -> list[str]:
    """The schedule settings that differ from the saving run's, one "name: old -> new" each: they apply from the
    resumed step on (the schedule is a function of the optimizer step and the config)."""
    changes = []
    saved = target.saved_config
    if saved_schedule_steps(saved) != config.schedule_steps:
        changes.append(f"lr_decay_steps: {saved_schedule_steps(saved)} -> {config.schedule_steps}")
    for name in ("warmup_steps", "min_lr_ratio"):
        if name in saved and saved[name] != getattr(config, name):
            changes.append(f"{name}: {saved[name]} -> {getattr(config, name)}")
    return changes


def fetch_for_resume(checkpoint_dir: str | Path, name: str, obj: ObjectInfo | None, storage: Storage | None,
                     accelerator: Accelerator, shares_first_process_disk: bool) -> tuple[Path, bool]:
    """Makes the checkpoint every process resumes from present on every machine: the first process downloads
    it if its disk lacks it, and so does the first process of each machine with a disk of its own
    (shares_first_process_disk False). Collective: when one process cannot have it, all of them raise.
    Returns its path, and whether this machine downloaded a copy of its own (to delete once loaded)."""
    path = Path(checkpoint_dir) / name
    problem: Exception | None = None
    own_copy = not accelerator.is_main_process and not shares_first_process_disk
    downloads = accelerator.is_main_process or (own_copy and accelerator.is_local_main_process)
    downloaded = False
    if downloads and obj is not None and storage is not None and not path.is_dir():
        try:
            download_checkpoint(storage, obj, checkpoint_dir)
            downloaded = True
        except CheckpointError as error:
            problem = error  # raised after the barrier: the other processes must not wait there forever
        except (StorageError, OSError) as error:  # a full disk, a destination gone: one line, no traceback
            problem = UploadError(f"downloading {name} from {storage.url} to resume it failed: {one_line(error)}")
    accelerator.wait_for_everyone()
    if problem is None and not path.is_dir():
        where = "" if obj is not None else " nor at the upload destination"
        problem = UploadError(f"{path}: the checkpoint to resume is not on this machine{where}; on several machines "
                              "use a checkpoint_dir they share, or let its upload finish (scripts/upload_manager.py)")
    failed = accelerator.reduce(torch.tensor(float(problem is not None), device=accelerator.device), reduction="sum")
    if problem is not None:
        raise problem
    if failed.item() > 0:
        raise UploadError(f"{name}: another process could not get this checkpoint (its error says why)")
    return path, downloaded and own_copy
