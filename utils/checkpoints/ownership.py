"""Which run owns a checkpoint folder, a log folder and an upload destination, the lock that keeps a second run
out of them while one runs, and which machines see the checkpoint folder.

A fresh run draws an id and claims its folders with it: checkpoint_dir/.run-id, log_dir/.run-id and, at the
upload destination, the object .run-id, written only if it does not exist yet (GCS's if_generation_match=0; a
hard link in a local folder), so that of two runs started at the same instant on one destination, one is
refused at start instead of training to the end with every upload in conflict. A resumed run carries on the
id of what it resumes: the checkpoint folder's, else the destination's (a fresh machine). Where the ids
disagree, the folders belong to different runs, and the run is refused in one line.
"""
import fcntl
import json
import logging
import os
import secrets
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from configs.training_config import ConfigError, TrainingConfig
from utils.errors import CheckpointError, UploadError
from utils.run_lock import RUN_LOCK
from utils.storage.base import PreconditionFailedError, Storage, StorageError
from utils.uploads.manifest import UploadManifest

RUN_ID_FILE = ".run-id"
log = logging.getLogger(__name__)


def claim_output_folders(config: TrainingConfig) -> None:
    """On the first process, before anything is built: the output folders can be written, no other run uses
    them (a lock held until the process exits), and uploads.json (if any) can be read: found now, not at the
    first save."""
    check_writable_folder(config.checkpoint_dir, "checkpoint_dir")
    check_writable_folder(config.log_dir, "log_dir")
    lock_for_this_run(config.checkpoint_dir)  # held until the process exits
    if Path(config.log_dir).resolve() != Path(config.checkpoint_dir).resolve():
        lock_for_this_run(config.log_dir, "--log-dir")
    UploadManifest(config.checkpoint_dir, "").read()


def claim_run(config: TrainingConfig, remote: Storage | None, resumed: Path | None, auto: bool) -> str:
    """On the first process, before anything is written: the run's id, its folders claimed for it. `resumed`: the
    checkpoint this run resumes (its metadata.json names its run); `auto`: --resume auto, which carries on the run
    that claimed the destination even where it left no checkpoint yet (a first boot preempted before its first
    upload, restarted on a fresh disk)."""
    local = local_run_id(Path(config.checkpoint_dir)) or (checkpoint_run_id(resumed) if resumed else None)
    logs = local_run_id(Path(config.log_dir))
    has_metrics = (Path(config.log_dir) / "metrics.jsonl").is_file()
    remote_id = remote_run_id(remote) if remote is not None else None
    resuming = resumed is not None or auto
    run_id = local or (remote_id if resuming else None) or secrets.token_hex(8)
    # A log folder of an earlier version (metrics without an id) may be resumed, not written over by a new run.
    if has_metrics and logs != run_id and not (resuming and logs is None):
        continue_it = "" if resuming else ", or pass --resume latest to continue that one"
        raise CheckpointError(f"log_dir {config.log_dir} already holds the metrics of another run (run "
                              f"{logs or 'unknown'}): set --log-dir for this run{continue_it}")
    if remote is not None and remote_id is not None and remote_id != run_id:
        raise UploadError(f"the upload destination {remote.url} belongs to another run (run {remote_id}; this one "
                          f"is {run_id}): set another upload_destination, or resume that run from its own "
                          "checkpoint_dir (or a fresh one, with --resume auto)")
    if remote is not None and remote_id is None:
        claim_destination(remote, run_id)
    for folder in (Path(config.checkpoint_dir), Path(config.log_dir)):
        write_run_id(folder, run_id)
    return run_id


def checkpoint_run_id(checkpoint: Path) -> str | None:
    """The run a checkpoint's metadata.json names (None for one saved before runs had ids)."""
    try:
        run_id = json.loads((checkpoint / "metadata.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None  # loading it says what is wrong with it
    return run_id if isinstance(run_id, str) else None


def local_run_id(folder: Path) -> str | None:
    try:
        return (folder / RUN_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointError(f"{folder / RUN_ID_FILE}: unreadable ({error.strerror or error})") from None


def write_run_id(folder: Path, run_id: str) -> None:
    path = folder / RUN_ID_FILE
    if local_run_id(folder) == run_id:
        return
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write ({error.strerror or error})") from None


def remote_run_id(remote: Storage) -> str | None:
    """The id in the destination's .run-id object, or None where there is none (a destination no run claimed)."""
    try:
        if remote.stat(RUN_ID_FILE) is None:
            return None
        with tempfile.TemporaryDirectory(prefix="run-id-") as scratch:
            remote.download(RUN_ID_FILE, Path(scratch) / RUN_ID_FILE)
            record = json.loads((Path(scratch) / RUN_ID_FILE).read_text())
    except StorageError as error:
        raise UploadError(f"upload destination {remote.url}: cannot read its {RUN_ID_FILE} ({error})") from None
    except (ValueError, AttributeError) as error:
        raise UploadError(f"upload destination {remote.url}: {RUN_ID_FILE} is not a run claim ({error})") from None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if not isinstance(run_id, str):
        raise UploadError(f"upload destination {remote.url}: {RUN_ID_FILE} names no run_id")
    return run_id


def claim_destination(remote: Storage, run_id: str) -> None:
    """Writes the destination's .run-id, which must not exist yet: of two runs claiming it, one is refused."""
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "claimed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        with remote.open_writer(RUN_ID_FILE) as writer:
            writer.write((json.dumps(record) + "\n").encode())
    except PreconditionFailedError:
        raise UploadError(f"the upload destination {remote.url} was just claimed by another run (run "
                          f"{remote_run_id(remote)}): two runs must not share a destination; set another "
                          "upload_destination") from None
    except StorageError as error:
        raise UploadError(f"upload destination {remote.url}: cannot write its {RUN_ID_FILE} ({error})") from None


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


def shares_checkpoint_disk(accelerator: Accelerator, checkpoint_dir: str | Path) -> bool:
    """Whether this process sees the files the first process writes in checkpoint_dir: always on one machine;
    on several, only when checkpoint_dir is on a filesystem they share. Collective. The probe's name is new,
    so no client cache of a network filesystem can answer for it."""
    token = [secrets.token_hex(8)]
    broadcast_object_list(token)
    probe = Path(checkpoint_dir) / f".shared-probe-{token[0]}"
    if accelerator.is_main_process:
        probe.write_bytes(b"")
    accelerator.wait_for_everyone()
    shared = probe.exists()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    return shared


def check_sharded_checkpoints_share_a_disk(accelerator: Accelerator, shared_disk: bool,
                                           checkpoint_dir: str | Path) -> None:
    """FSDP: every process writes its part of each checkpoint into checkpoint_dir, so every process must see the
    first process's folder (shares_checkpoint_disk); refused on all processes otherwise. Collective."""
    if not all(gather_object([shared_disk])):
        raise ConfigError(f"fsdp: every process writes its part of each checkpoint into {checkpoint_dir}, which the "
                          "machines do not share; put checkpoint_dir on a filesystem they all mount (NFS, say)")
