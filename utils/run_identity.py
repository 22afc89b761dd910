"""Which run owns a checkpoint folder, a log folder and an upload destination.

A fresh run draws an id and claims its folders with it: checkpoint_dir/.run-id, log_dir/.run-id and, at the
upload destination, the object .run-id, written only if it does not exist yet (GCS's if_generation_match=0; a
hard link in a local folder), so that of two runs started at the same instant on one destination, one is
refused at start instead of training to the end with every upload in conflict. A resumed run carries on the
id of what it resumes: the checkpoint folder's, else the destination's (a fresh machine). Where the ids
disagree, the folders belong to different runs, and the run is refused in one line.
"""
import json
import os
import secrets
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from configs.training_config import TrainingConfig
from utils.checkpoint_utils import CheckpointError, UploadError, check_writable_folder, lock_for_this_run
from utils.manifest import UploadManifest
from utils.storage import PreconditionFailedError, Storage, StorageError

RUN_ID_FILE = ".run-id"


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
