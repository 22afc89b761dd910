"""Checkpoint uploads: archive -> upload -> verify -> record, in background threads, and the way back.

A complete checkpoint folder is handed to an Uploader. A worker thread streams it as one archive
(<name>.tar, <name>.tar.zst or the original <name>.tar.gz) straight into a resumable upload at the
destination (gs://bucket/prefix or a local folder), so no second copy is written to local disk. The
upload never overwrites an object (if_generation_match=0) and counts as done only once the stored
object's size and crc32c equal those of the bytes sent. Every state change is written to
<checkpoint_dir>/uploads.json, so that scripts/upload_manager.py and a restarted run see it, and a
checkpoint whose upload is not verified is never pruned.

The way back: find the newest checkpoint locally or at the destination, and download and unpack a
remote one for --resume.
"""
import base64
import fcntl
import gzip
import logging
import os
import queue
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import torch
import zstandard
from accelerate import Accelerator

from configs.training_config import ARCHIVE_FORMATS, TrainingConfig
from utils.checkpoint_utils import (TMP_PREFIX, CheckpointError, CheckpointInfo, find_checkpoint, list_checkpoints,
                                    parse_checkpoint_name, prune_checkpoints, read_json, write_json_atomic)
from utils.storage import (LocalStorage, ObjectInfo, PreconditionFailedError, Storage, StorageError, crc32c_of_file,
                           open_storage)

log = logging.getLogger("uploader")

MANIFEST_NAME = "uploads.json"
STATES = ("local", "queued", "uploading", "uploaded", "failed")
# Formats: tar (no compression, fastest), tar.zst (zstd), tar.gz (the original; gzip is slow on one core).
_ZSTD_LEVEL = 1  # level 3 compresses float32 weights no better, at two thirds of the speed
_GZIP_LEVEL = 6
_CHUNK = 4 * 1024 * 1024


class UploadError(CheckpointError):
    """An upload or download that cannot be done; the message is one line."""


class UploadConflict(UploadError):
    """A different object already holds the remote name; it is never overwritten."""


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------

def archive_name(checkpoint: str, archive_format: str) -> str:
    return f"{checkpoint}.{archive_format}"


def split_archive_name(object_name: str) -> tuple[str, str] | None:
    """(checkpoint name, archive format) for a remote object name like checkpoint-...-files0.tar.zst."""
    for archive_format in ARCHIVE_FORMATS:
        suffix = "." + archive_format
        if object_name.endswith(suffix) and parse_checkpoint_name(object_name[:-len(suffix)]):
            return object_name[:-len(suffix)], archive_format
    return None


def check_archive_format(archive_format: str) -> None:
    if archive_format not in ARCHIVE_FORMATS:
        raise UploadError(f"unknown archive format {archive_format!r}; choose one of {', '.join(ARCHIVE_FORMATS)}")


class HashingWriter:
    """A write-only stream that counts bytes and computes their crc32c (as GCS reports it) on the way
    to `target`; with no target it only measures."""

    def __init__(self, target: BinaryIO | None = None) -> None:
        self.target = target
        self.size = 0
        self._checksum = google_crc32c.Checksum()

    def write(self, data: bytes) -> int:
        self._checksum.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    def flush(self) -> None:
        pass  # the target finishes its upload on close, not on flush

    @property
    def crc32c(self) -> str:
        return base64.b64encode(self._checksum.digest()).decode()


class _ProgressReader:
    """Reads a file and reports the bytes read, so the archiver can show progress."""

    def __init__(self, handle: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self.handle = handle
        self.on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.on_bytes(len(data))
        return data


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Owner fields differ between machines; without them the archive of the same checkpoint is the same
    # bytes everywhere, which is what lets an identical remote object count as already uploaded.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(folder: Path, out: BinaryIO | HashingWriter, archive_format: str,
                  on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Streams `folder` as a tar archive (entries under <folder name>/, sorted) into `out`.

    The bytes depend only on the files' names, contents, modes and mtimes, so archiving the same
    checkpoint twice gives the same archive.
    """
    check_archive_format(archive_format)
    compressor: Any = None
    if archive_format == "tar.zst":
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(out, closefd=False)
    elif archive_format == "tar.gz":
        compressor = gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=_GZIP_LEVEL, mtime=0)
    stream = compressor if compressor is not None else out
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK,
                      copybufsize=_CHUNK) as tar:
        tar.add(folder, arcname=folder.name, recursive=False, filter=_normalized)
        for path in sorted(folder.rglob("*")):
            info = _normalized(tar.gettarinfo(str(path), arcname=f"{folder.name}/{path.relative_to(folder)}"))
            if path.is_file():
                with open(path, "rb") as handle:
                    tar.addfile(info, _ProgressReader(handle, on_bytes))
            else:
                tar.addfile(info)
    if compressor is not None:
        compressor.close()  # writes the compressed stream's trailer; `out` stays open


def measure_archive(folder: Path, archive_format: str) -> tuple[int, str]:
    """Size and crc32c of the archive write_archive would produce, without storing it."""
    sink = HashingWriter()
    write_archive(folder, sink, archive_format)
    return sink.size, sink.crc32c


def _members_inside(tar: tarfile.TarFile, name: str, archive: str) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if member.name != name and not member.name.startswith(name + "/"):
            raise UploadError(f"{archive}: entry {member.name!r} is outside {name}/")
        yield member


def extract_archive(archive: Path, archive_format: str, dest_dir: Path, name: str) -> Path:
    """Unpacks the archive of checkpoint `name` into dest_dir/.tmp-<name>, then renames it to dest_dir/<name>."""
    check_archive_format(archive_format)
    tmp, final = dest_dir / f"{TMP_PREFIX}{name}", dest_dir / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with open(archive, "rb") as raw:
        source: Any = raw
        if archive_format == "tar.zst":
            source = zstandard.ZstdDecompressor().stream_reader(raw)
        elif archive_format == "tar.gz":
            source = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            with tarfile.open(fileobj=source, mode="r|") as tar:
                # extractall sets the folders' mtimes last, so unpacking restores the archived tree exactly.
                tar.extractall(tmp, members=_members_inside(tar, name, archive.name), filter="data")
        except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError) as error:
            shutil.rmtree(tmp)
            raise UploadError(f"{archive.name}: not a readable {archive_format} archive ({error})") from None
        except UploadError:
            shutil.rmtree(tmp)
            raise
    if not (tmp / name).is_dir():
        shutil.rmtree(tmp)
        raise UploadError(f"{archive.name}: holds no {name}/ folder")
    (tmp / name).rename(final)
    tmp.rmdir()
    return final


# ---------------------------------------------------------------------------------------------
# The state of every checkpoint: <checkpoint_dir>/uploads.json
# ---------------------------------------------------------------------------------------------

@dataclass
class UploadRecord:
    state: str = "local"
    remote_url: str | None = None
    size: int | None = None
    crc32c: str | None = None
    error: str | None = None
    attempts: int = 0
    updated: str = ""


class UploadManifest:
    """uploads.json, read and written under a file lock, so that a training run and upload_manager
    can update it at the same time; each write is atomic (temporary file, then rename)."""

    def __init__(self, checkpoint_dir: str | Path, destination: str) -> None:
        self.path = Path(checkpoint_dir) / MANIFEST_NAME
        self.destination = destination

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(MANIFEST_NAME + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_unlocked(self) -> dict[str, UploadRecord]:
        if not self.path.exists():
            return {}
        try:
            entries = read_json(self.path)["checkpoints"]
            records = {name: UploadRecord(**values) for name, values in entries.items()}
        except (KeyError, TypeError, AttributeError) as error:
            raise UploadError(f"{self.path}: not an upload manifest ({error})") from None
        for name, record in records.items():
            if record.state not in STATES:
                raise UploadError(f"{self.path}: {name} has the unknown state {record.state!r}")
        return records

    def read(self) -> dict[str, UploadRecord]:
        with self._locked():
            return self._read_unlocked()

    def update(self, name: str, **changes: Any) -> UploadRecord:
        with self._locked():
            records = self._read_unlocked()
            record = records.get(name, UploadRecord())
            for key, value in changes.items():
                setattr(record, key, value)
            record.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
            records[name] = record
            write_json_atomic(self.path, {"destination": self.destination,
                                          "checkpoints": {n: asdict(r) for n, r in sorted(records.items())}})
            return record


# ---------------------------------------------------------------------------------------------
# Destination
# ---------------------------------------------------------------------------------------------

def remote_url(storage: Storage, object_name: str) -> str:
    return f"{storage.url.rstrip('/')}/{object_name}"


def open_destination(url: str, credentials: str | None = None, check_write: bool = True) -> Storage:
    """The upload destination, checked once by listing it and (check_write) by writing and deleting a small
    probe object, so that a wrong bucket or missing permission is a one-line error before training starts
    rather than after the first checkpoint. A local folder is created."""
    try:
        storage = open_storage(url, credentials)
        if isinstance(storage, LocalStorage):
            storage.root.mkdir(parents=True, exist_ok=True)
        storage.list("checkpoint-*")
    except (StorageError, OSError) as error:
        raise UploadError(f"upload destination {url}: {error}") from None
    if check_write:
        _probe_write(storage, url)
    return storage


def _probe_write(storage: Storage, url: str) -> None:
    """Listing succeeds on a publicly readable bucket without write permission; only a write tells."""
    probe = f".write-probe-{secrets.token_hex(8)}"  # random: processes probing at once do not collide
    try:
        with storage.open_writer(probe) as writer:
            writer.write(b"write probe; safe to delete\n")
    except (StorageError, OSError) as error:
        raise UploadError(f"upload destination {url}: cannot write ({error})") from None
    try:
        storage.delete(probe)
    except (StorageError, OSError) as error:
        # Writing works, which is what uploads need (a retention policy or a create-only role forbids the
        # delete); the probe is no checkpoint archive, so nothing reads it.
        log.warning(f"⚠️  Could not delete the write probe {remote_url(storage, probe)} ({error}); "
                    "delete it by hand")


def stored_object(storage: Storage, object_name: str) -> ObjectInfo | None:
    """stat() with the crc32c filled in: a local folder does not keep one, so it is computed from the file."""
    info = storage.stat(object_name)
    if info is not None and info.crc32c is None:
        root = getattr(storage, "root", None)  # LocalStorage's folder
        if not isinstance(root, Path):
            raise UploadError(f"{remote_url(storage, object_name)}: the destination reports no crc32c to verify")
        info = replace(info, crc32c=crc32c_of_file(root / object_name))
    return info


def remote_checkpoints(storage: Storage) -> dict[str, tuple[CheckpointInfo, ObjectInfo]]:
    """Checkpoint archives at the destination by checkpoint name (info.path is where it would unpack to)."""
    found: dict[str, tuple[CheckpointInfo, ObjectInfo]] = {}
    for obj in storage.list("checkpoint-*"):
        split = split_archive_name(obj.name)
        if split and split[0] not in found:
            parsed = parse_checkpoint_name(split[0])
            assert parsed is not None
            found[split[0]] = (CheckpointInfo(split[0], Path(), *parsed), obj)
    return found


def _order(info: CheckpointInfo) -> tuple[int, int, int]:
    return info.step, info.epoch, info.files


def locate_checkpoint(checkpoint_dir: str | Path, name: str, storage: Storage | None
                      ) -> tuple[CheckpointInfo, ObjectInfo | None]:
    """`name` or "latest" among the local checkpoints and, when a destination is set, the remote ones.

    Returns the checkpoint (its path under checkpoint_dir) and, when the destination holds it, its archive:
    to download here when it is only there, or on another machine whose disk lacks it. "latest" takes a
    remote checkpoint only when it is newer than every local one.
    """
    if storage is None:
        return find_checkpoint(checkpoint_dir, name), None
    local = {info.name: info for info in list_checkpoints(checkpoint_dir)}
    try:
        remote = remote_checkpoints(storage)
    except StorageError as error:
        raise UploadError(f"listing checkpoints at {storage.url}: {error}") from None
    wanted = Path(name).name
    if name == "latest":
        candidates = sorted([*local.values(), *(info for info, _ in remote.values())], key=_order)
        if not candidates:
            raise UploadError(f"latest: no checkpoint in {checkpoint_dir} or at {storage.url}")
        newest = candidates[-1]
        wanted = max((info for info in candidates if _order(info) == _order(newest)),
                     key=lambda info: info.name in local).name  # on a tie, the local copy
    if wanted in local:
        return local[wanted], remote[wanted][1] if wanted in remote else None
    if wanted in remote:
        info, obj = remote[wanted]
        return CheckpointInfo(info.name, Path(checkpoint_dir) / info.name, info.epoch, info.step, info.files), obj
    existing = ", ".join(sorted({*local, *remote})) or "none"
    raise UploadError(f"checkpoint {name!r} not found in {checkpoint_dir} or at {storage.url} (existing: {existing})")


def prune_without_uploads(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Retention for a run with no upload_destination: a checkpoint that an earlier run left unuploaded
    (recorded in uploads.json, not verified) may be the only copy upload_manager is still to upload: kept."""
    records = UploadManifest(checkpoint_dir, "").read()
    return prune_checkpoints(checkpoint_dir, keep,
                             lambda info: info.name not in records or records[info.name].state == "uploaded")


def check_no_newer_at_destination(storage: Storage, resumed: CheckpointInfo) -> None:
    """Resuming an older checkpoint would save under the names of the newer ones already uploaded, and
    those are never overwritten; the run would keep checkpoints it could never upload."""
    try:
        newer = sorted((info for info, _ in remote_checkpoints(storage).values()
                        if _order(info) > _order(resumed)), key=_order)
    except StorageError as error:
        raise UploadError(f"listing checkpoints at {storage.url}: {error}") from None
    if newer:
        raise UploadError(f"resuming {resumed.name} would save under names that {storage.url} already holds (newer: "
                          f"{', '.join(info.name for info in newer)}); resume latest, or set another upload_destination "
                          "and checkpoint_dir to branch off")


def check_fresh_destination(storage: Storage) -> None:
    """A fresh run would upload under the names of the checkpoints already there, and never overwrites them."""
    try:
        found = sorted(remote_checkpoints(storage).values(), key=lambda pair: _order(pair[0]))
    except StorageError as error:
        raise UploadError(f"listing checkpoints at {storage.url}: {error}") from None
    if found:
        raise UploadError(f"the upload destination {storage.url} already holds checkpoints (newest {found[-1][0].name});"
                          " pass --resume latest to continue from them, or set another upload_destination")


def download_checkpoint(storage: Storage, obj: ObjectInfo, checkpoint_dir: str | Path) -> Path:
    """Downloads (size and crc32c checked) and unpacks a remote checkpoint archive into checkpoint_dir,
    and records it as uploaded, so it is not uploaded again."""
    split = split_archive_name(obj.name)
    if split is None:
        raise UploadError(f"{obj.name} is not a checkpoint archive")
    name, archive_format = split
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{TMP_PREFIX}{obj.name}"
    log.info(f"⬇️  Downloading {remote_url(storage, obj.name)} ({obj.size / 1e6:,.1f} MB)")
    try:
        info = storage.download(obj.name, archive)
    except StorageError as error:
        raise UploadError(f"downloading {remote_url(storage, obj.name)}: {error}") from None
    try:
        path = extract_archive(archive, archive_format, folder, name)
    finally:
        archive.unlink(missing_ok=True)
    UploadManifest(folder, storage.url).update(name, state="uploaded", remote_url=remote_url(storage, obj.name),
                                               size=info.size, crc32c=info.crc32c, error=None)
    log.info(f"📂 Unpacked {name} into {folder}")
    return path


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
        except (CheckpointError, StorageError, OSError) as error:
            problem = error  # raised after the barrier: the other processes must not wait there forever
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


# ---------------------------------------------------------------------------------------------
# The uploader
# ---------------------------------------------------------------------------------------------

def _by_step(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda name: ((parse_checkpoint_name(name) or (0, 0, 0))[1], name))


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:,.1f} TB"


class Uploader:
    """Archives, uploads and verifies checkpoints of one checkpoint folder.

    background=True: submit() returns at once and `workers` threads upload from a bounded queue
    (a checkpoint that finds the queue full stays "local" and is queued when a place frees up).
    background=False: submit() uploads before returning. Either way a failure is retried with
    exponential backoff up to `attempts` times, then recorded as "failed"; the checkpoint stays local.
    """

    def __init__(self, storage: Storage, checkpoint_dir: str | Path, archive_format: str = "tar.zst",
                 background: bool = True, workers: int = 1, attempts: int = 5, retry_delay_s: float = 2.0,
                 queue_size: int = 4, keep_local: int | None = None, progress_interval_s: float = 30.0) -> None:
        check_archive_format(archive_format)
        self.storage = storage
        self.checkpoint_dir = Path(checkpoint_dir)
        self.archive_format = archive_format
        self.background = background
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.keep_local = keep_local
        self.progress_interval_s = progress_interval_s
        self.manifest = UploadManifest(checkpoint_dir, storage.url)
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._overflow: list[str] = []
        self._unfinished: set[str] = set()
        self._submitted: set[str] = set()
        self._progress: dict[str, tuple[int, int]] = {}  # name -> (bytes archived, checkpoint bytes)
        self._changed = threading.Condition()
        self._prune_lock = threading.Lock()
        if background:
            for index in range(workers):
                threading.Thread(target=self._work, name=f"uploader-{index}", daemon=True).start()

    @property
    def destination(self) -> str:
        return self.storage.url

    def url_of(self, name: str) -> str:
        return remote_url(self.storage, archive_name(name, self.archive_format))

    # --- what may be deleted -------------------------------------------------------------------
    def is_verified(self, name: str, records: dict[str, UploadRecord] | None = None) -> bool:
        """Uploaded to this destination, with size and crc32c checked against the stored object."""
        record = (records if records is not None else self.manifest.read()).get(name)
        return (record is not None and record.state == "uploaded" and record.remote_url is not None
                and record.remote_url.startswith(self.destination.rstrip("/") + "/"))

    def may_delete(self, info: CheckpointInfo) -> bool:
        return self.is_verified(info.name)

    def prune(self, keep: int) -> list[str]:
        """Deletes all but the newest `keep` local checkpoints, sparing any whose upload is not verified."""
        with self._prune_lock:
            return prune_checkpoints(self.checkpoint_dir, keep, self.may_delete)

    # --- handing checkpoints over --------------------------------------------------------------
    def submit_new(self, folder: Path) -> None:
        """Hands over a checkpoint that was just saved. A record of its name can only be about an earlier
        checkpoint of that name (a run resumed from an older step saves the same step names again), and an
        "uploaded" there would let prune() delete these files unuploaded; so the record starts afresh. An
        object of that name at the destination is then still compared: identical counts as uploaded, a
        different one is a conflict that keeps the checkpoint local."""
        self.manifest.update(folder.name, state="local", remote_url=None, size=None, crc32c=None, attempts=0,
                             error=None)
        self.submit(folder)

    def submit(self, folder: Path) -> None:
        """Hands over a complete checkpoint folder for upload whose record, if any, is about these files
        (a pending upload); a freshly saved checkpoint goes through submit_new."""
        name = folder.name
        self._submitted.add(name)
        if not self.background:
            log.info(f"🚀 Uploading {name} now (background uploads are off)")
            self._upload(name)
            return
        with self._changed:  # only this and _refill put into the queue, both under this lock
            if name in self._unfinished:
                return  # already on its way
            self._unfinished.add(name)
            log.info(f"🚀 Starting background upload for {name}")
            if self._queue.full():
                self.manifest.update(name, state="local", error=None)
                self._overflow.append(name)
                log.info(f"⏳ Upload queue full: {name} stays local and is queued when an upload finishes")
            else:
                self._enqueue(name)
                log.info(f"✅ Checkpoint {name} queued for background upload")

    def _enqueue(self, name: str) -> None:
        # Recorded before it is queued, so a worker's "uploading" always comes after "queued".
        self.manifest.update(name, state="queued", remote_url=self.url_of(name), error=None)
        self._queue.put_nowait(name)

    def _refill(self) -> None:
        """Queues checkpoints that found the queue full, oldest first, as places free up."""
        with self._changed:
            while self._overflow and not self._queue.full():
                self._enqueue(self._overflow[0])  # removed only once queued: a failed record update keeps it
                self._overflow.pop(0)

    def submit_pending(self) -> list[str]:
        """Submits every local checkpoint whose upload is not verified (left by an earlier run), oldest first."""
        records = self.manifest.read()
        pending = [info for info in list_checkpoints(self.checkpoint_dir) if not self.is_verified(info.name, records)]
        for info in pending:
            record = records.get(info.name)
            was = f"{record.state}, {record.attempts} attempts" if record else "never uploaded"
            log.info(f"↻ Picking up the pending upload of {info.name} ({was})")
            self.submit(info.path)
        return [info.name for info in pending]

    # --- waiting -------------------------------------------------------------------------------
    def unfinished(self) -> list[str]:
        with self._changed:
            return _by_step(self._unfinished)

    def wait(self, timeout_s: float) -> list[str]:
        """Waits up to timeout_s for the submitted uploads, printing progress; returns those left unfinished."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                log.info(f"⏳ Waiting for {len(self._unfinished)} upload(s) ({self._progress_text()}); "
                         f"giving up in {left:,.0f} s")
                self._changed.wait(min(left, self.progress_interval_s))
            return _by_step(self._unfinished)

    def finish(self, timeout_s: float) -> list[str]:
        """At the end of a run: waits for the uploads, then reports what is not verified (and returns it)."""
        left = self.wait(timeout_s)
        records = self.manifest.read()
        # Any state but "uploaded" here (a worker that could not record its result leaves "queued" or
        # "uploading") means the checkpoint exists only locally.
        failed = _by_step(name for name in self._submitted - set(left) if not self.is_verified(name, records))
        if left:
            log.warning(f"⚠️  {len(left)} upload(s) unfinished after {timeout_s:,.0f} s: {', '.join(left)}")
        for name in failed:
            record = records.get(name)
            if record is not None and record.state == "failed":
                log.error(f"❌ Upload of {name} failed: {record.error}")
            else:
                log.error(f"❌ Upload of {name} not verified (recorded state: {record.state if record else 'none'})")
        if left or failed:
            log.warning(f"   They stay local and recorded in {self.manifest.path}; the next run with --resume, or "
                        "`python scripts/upload_manager.py upload-all --config CONFIG`, uploads them")
        elif self._submitted:
            log.info(f"✅ All {len(self._submitted)} checkpoint upload(s) of this run verified at {self.destination}")
        return left + failed

    def _progress_text(self) -> str:
        parts = []
        for name in _by_step(self._unfinished):
            done, total = self._progress.get(name, (0, 0))
            parts.append(f"{name} {100 * done / total:.0f}%" if total else f"{name} queued")
        return ", ".join(parts)

    # --- the work ------------------------------------------------------------------------------
    def _work(self) -> None:
        # Archiving and checksumming take CPU; at a lower priority they take only what training leaves.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        while True:
            name = self._queue.get()
            # Nothing may escape this loop: a dead worker would leave every later checkpoint unuploaded.
            try:
                self._upload(name)
            except Exception as error:  # a bug, or uploads.json not writable (disk full)
                self._record_stopped(name, error)
            finally:
                with self._changed:
                    self._unfinished.discard(name)
                    self._progress.pop(name, None)
                    self._changed.notify_all()
                try:
                    self._refill()
                except Exception as error:  # the checkpoint stays in the overflow; the next refill retries
                    log.error(f"❌ Could not queue the next upload: {_one_line(error)}")

    def _record_stopped(self, name: str, error: Exception) -> None:
        message = _one_line(error)
        log.error(f"❌ Upload of {name} stopped: {message}")
        try:
            self.manifest.update(name, state="failed", error=message)
        except Exception as record_error:  # finish() still reports it: its record does not say "uploaded"
            log.error(f"❌ Could not record the failed upload of {name} in {self.manifest.path}: "
                      f"{_one_line(record_error)}")

    def _upload(self, name: str) -> UploadRecord:
        """Uploads one checkpoint with retries; returns its final record (uploaded or failed)."""
        folder = self.checkpoint_dir / name
        url = self.url_of(name)
        if self.is_verified(name):
            return self.manifest.read()[name]
        if not folder.is_dir():
            return self.manifest.update(name, state="failed", remote_url=url, error=f"{folder} does not exist")
        previous = self.manifest.read().get(name, UploadRecord())
        attempts = previous.attempts if previous.remote_url == url else 0  # counted per destination
        if previous.remote_url != url:  # a size and crc32c verified elsewhere say nothing about this upload
            self.manifest.update(name, size=None, crc32c=None)
        for attempt in range(1, self.attempts + 1):
            attempts += 1
            self.manifest.update(name, state="uploading", remote_url=url, attempts=attempts)
            try:
                obj = self._transfer(folder, archive_name(name, self.archive_format))
            except UploadConflict as error:
                log.error(f"❌ {error}")
                return self.manifest.update(name, state="failed", error=str(error))
            except Exception as error:  # network, server, disk: retried; the attempt budget bounds a lasting one
                message = _one_line(error)
                if attempt == self.attempts:
                    log.error(f"❌ Upload of {name} failed after {attempt} attempts: {message}; it stays local "
                              f"(retry with: python scripts/upload_manager.py upload {name} --checkpoint-dir "
                              f"{self.checkpoint_dir} --destination {self.destination})")
                    return self.manifest.update(name, state="failed", error=message)
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                log.warning(f"⚠️  Upload of {name} failed (attempt {attempt}/{self.attempts}: {message}); "
                            f"retrying in {delay:.0f} s")
                self.manifest.update(name, error=message)
                time.sleep(delay)
                continue
            record = self.manifest.update(name, state="uploaded", size=obj.size, crc32c=obj.crc32c, error=None)
            if self.keep_local is not None:
                for deleted in self.prune(self.keep_local):
                    log.info(f"🗑️  Cleaned up {deleted} (uploaded and verified; keeping the newest {self.keep_local})")
            return record
        raise AssertionError("unreachable")

    def _transfer(self, folder: Path, object_name: str) -> ObjectInfo:
        """One attempt: stream the archive into a new object and verify it, or accept an identical one."""
        url = remote_url(self.storage, object_name)
        existing = stored_object(self.storage, object_name)
        if existing is not None:
            return self._accept_existing(folder, existing, url)
        total = folder_size(folder)
        log.info(f"📦 Creating archive: {object_name} from {human_size(total)} of checkpoint files (streamed, "
                 f"no local copy)")
        log.info(f"☁️  Uploading to {url}")
        started = time.monotonic()
        last_report = [started]
        done = [0]

        def on_bytes(count: int) -> None:
            done[0] += count
            with self._changed:
                self._progress[folder.name] = (done[0], total)
            now = time.monotonic()
            if now - last_report[0] >= self.progress_interval_s:
                last_report[0] = now
                log.info(f"☁️  {folder.name}: {100 * done[0] / max(total, 1):.0f}% "
                         f"({human_size(done[0])} of {human_size(total)}, {done[0] / 1e6 / (now - started):,.0f} MB/s)")

        try:
            # On an exception inside the block the writer abandons the upload instead of finishing it,
            # so a partial archive never becomes an object.
            with self.storage.open_writer(object_name) as writer:
                sink = HashingWriter(writer)
                write_archive(folder, sink, self.archive_format, on_bytes)
        except PreconditionFailedError:
            # Another uploader (upload_manager, a second run) got there first.
            existing = stored_object(self.storage, object_name)
            if existing is None:
                raise
            return self._accept_existing(folder, existing, url)
        stored = stored_object(self.storage, object_name)
        if stored is None or stored.size != sink.size or stored.crc32c != sink.crc32c:
            found = f"size {stored.size}, crc32c {stored.crc32c}" if stored else "no object"
            raise UploadError(f"{url}: verification failed: sent {sink.size} bytes with crc32c {sink.crc32c}, "
                              f"found {found}")
        seconds = max(time.monotonic() - started, 1e-6)
        log.info(f"✅ Successfully uploaded {folder.name}: {human_size(stored.size)}, crc32c {stored.crc32c}, verified "
                 f"({seconds:,.1f} s, {stored.size / 1e6 / seconds:,.0f} MB/s)")
        return stored

    def _accept_existing(self, folder: Path, existing: ObjectInfo, url: str) -> ObjectInfo:
        """An object of this name is already there: done if it is this checkpoint's archive, else a conflict."""
        size, crc32c = measure_archive(folder, self.archive_format)
        if existing.size == size and existing.crc32c == crc32c:
            log.info(f"✅ {folder.name} is already at {url} (same size and crc32c): nothing to upload")
            return existing
        raise UploadConflict(f"{url} already exists and differs from local {folder.name} (remote {existing.size} "
                             f"bytes, crc32c {existing.crc32c}; local archive {size} bytes, crc32c {crc32c}); "
                             "refusing to overwrite it: delete it or choose another upload_destination")


def uploader_for_run(config: TrainingConfig, storage: Storage) -> Uploader:
    """The training run's uploader; it first picks up uploads that an earlier run left unfinished."""
    mode = f"in the background ({config.upload_workers} worker(s))" if config.background_upload else "synchronously"
    log.info(f"Uploads: checkpoints go to {storage.url} as .{config.archive_format} {mode} ({storage.auth})")
    uploader = Uploader(storage, config.checkpoint_dir, config.archive_format, background=config.background_upload,
                        workers=config.upload_workers, attempts=config.upload_attempts,
                        keep_local=config.keep_checkpoints)
    uploader.submit_pending()
    return uploader
