"""Checkpoints on local disk: names, listing and lookup, JSON files, retention, and the run's folders.

A checkpoint is the folder checkpoints/checkpoint-epoch{E}-step{S}-files{F}/ holding Accelerate's state
(model.safetensors, optimizer.bin, scheduler.bin, random_states_*.pkl) and our JSON files:
training_config.json, metadata.json, training_metrics.json and data_state.json. It is written as
.tmp-<name>/ and renamed when complete (utils/checkpointer.py), so a folder under a checkpoint name is
always whole. Nothing here needs torch: the tools read checkpoints with this module alone.
"""
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

CHECKPOINT_PATTERN = re.compile(r"checkpoint-epoch(\d+)-step(\d+)-files(\d+)")
TMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or written; the message is one line."""


class ReportedByTheMainProcess(Exception):
    """An error that every process meets at once (a sharded save that failed), whose line the main process prints:
    the others exit with its code without repeating it."""


class UploadError(CheckpointError):
    """An upload or download that cannot be done; the message is one line."""


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: Path
    epoch: int
    step: int
    files: int


def checkpoint_name(epoch: int, step: int, files: int) -> str:
    return f"checkpoint-epoch{epoch}-step{step}-files{files}"


def parse_checkpoint_name(name: str) -> tuple[int, int, int] | None:
    match = CHECKPOINT_PATTERN.fullmatch(name)  # "$" would let a trailing newline through
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def list_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints in the folder, oldest step first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        parsed = parse_checkpoint_name(path.name)
        if parsed and path.is_dir():
            found.append(CheckpointInfo(path.name, path, *parsed))
    return sorted(found, key=lambda info: (info.step, info.epoch, info.files))


def find_checkpoint(checkpoint_dir: str | Path, name: str) -> CheckpointInfo:
    """`name` or "latest" among the local checkpoints; an error listing what exists otherwise."""
    found = list_checkpoints(checkpoint_dir)
    if name == "latest":
        if not found:
            raise CheckpointError(f"latest: no checkpoint in {checkpoint_dir}")
        return found[-1]
    for info in found:
        if info.name == Path(name).name:
            return info
    existing = ", ".join(info.name for info in found) or "none"
    raise CheckpointError(f"checkpoint {name!r} not found in {checkpoint_dir} (existing: {existing})")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None


def write_json_atomic(path: Path, value: Any) -> None:
    """Writes through a temporary file and a rename, so readers never see half a file. A write that fails (a
    full disk) leaves the file as it was, no temporary file behind, and is one CheckpointError line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({error.strerror or error})") from None


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Files and folders (FSDP writes sharded state in subfolders) reach the disk before the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


RUN_LOCK = ".run.lock"
_held_run_locks: list[TextIO] = []  # open for the life of the process; the OS lets go when it ends, even on kill -9


def lock_for_this_run(folder: str | Path, flag: str = "--checkpoint-dir") -> None:
    """One run at a time per checkpoint (or log) folder: a second one (started twice by mistake, or workers left
    behind by a killed launcher) would save, upload and prune in the same folder. The first process holds
    an exclusive lock on FOLDER/.run.lock until it exits."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / RUN_LOCK, "a+")
    except OSError as error:
        raise CheckpointError(f"{folder / RUN_LOCK}: cannot open the run lock ({error.strerror or error})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(f"another training run ({holder}) is using {folder}; stop it first, "
                              f"or set {flag} for a new run") from None
    except OSError as error:  # a filesystem without locks (some FUSE mounts): say so, and go on
        log.warning(f"⚠️  Cannot lock {folder / RUN_LOCK} ({error.strerror or error}): make sure no other run "
                    "uses this folder")
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    handle.flush()
    _held_run_locks.append(handle)


def check_writable_folder(folder: str | Path, setting: str) -> None:
    """Creates the folder and writes a file there: a folder that cannot take a checkpoint is found at
    start, not at the first save hundreds of steps later."""
    probe = Path(folder) / f".write-probe-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"{setting} {folder}: not a writable folder ({error.strerror or error})") from None


def remove_incomplete_saves(checkpoint_dir: str | Path) -> list[str]:
    """Deletes the .tmp-checkpoint-* a crash left behind: folders of a save or a deletion cut short, and
    archives of a download cut short. None of them is a complete checkpoint."""
    folder = Path(checkpoint_dir)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.glob(f"{TMP_PREFIX}checkpoint-*")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def prune_checkpoints(checkpoint_dir: str | Path, keep: int,
                      may_delete: Callable[[CheckpointInfo], bool] = lambda info: True) -> list[str]:
    """Deletes all but the newest `keep` checkpoints, sparing any that may_delete refuses."""
    deleted = []
    for info in list_checkpoints(checkpoint_dir)[:-keep]:
        if may_delete(info):
            # Renamed first: a deletion cut short leaves a .tmp- folder (removed at the next start), never a
            # partial folder under a checkpoint's name that --resume would take for complete.
            doomed = info.path.with_name(f"{TMP_PREFIX}{info.name}")
            os.rename(info.path, doomed)
            shutil.rmtree(doomed)
            deleted.append(info.name)
    return deleted


def build_metadata(step: int, epoch: int, files_processed: int, tokens_seen: int, metrics: dict[str, Any],
                   summary: dict[str, Any], system: dict[str, Any], history_shown: int = 10) -> dict[str, Any]:
    """metadata.json: the fields of the original README's "Enhanced Metadata", plus tokens seen."""
    return {
        "step": step,
        "epoch": epoch,
        "current_loss": metrics["loss_history"][-1]["loss"] if metrics["loss_history"] else None,
        "best_loss": metrics["best_loss"],
        "loss_history": [entry["loss"] for entry in metrics["loss_history"][-history_shown:]],
        "learning_rates": [entry["lr"] for entry in metrics["learning_rates"][-history_shown:]],
        "validation_metrics": summary,
        "training_progress": {
            "completed_steps": step,
            "total_epochs": epoch,
            "files_processed": files_processed,
            "tokens_seen": tokens_seen,
        },
        "system_info": system,
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }
