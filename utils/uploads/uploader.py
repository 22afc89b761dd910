"""Checkpoint uploads: upload -> verify -> record, in background threads.

A complete checkpoint folder is handed to an Uploader. In the files layout (the default), a worker thread
uploads each file as an object of its own, large ones in parts, `streams` transfers at once, and writes
<name>.files.json last (utils/uploads/transfer.py); in an archive format it streams the folder as one archive
(utils/uploads/formats.py) into one resumable upload. Either way no second copy is written to local disk, nothing
is ever overwritten (if_generation_match=0), and a checkpoint counts as uploaded only once every stored
object's size and crc32c equal those of the bytes sent. Every state change is written to
<checkpoint_dir>/uploads.json (utils/uploads/manifest.py), so that scripts/upload_manager.py and a restarted run see
it. A checkpoint is deleted locally only when its upload is verified and its remote copy is still there
with the recorded size and crc32c (one metadata request, just before).

Each verified upload is reported to the `report` callback as {"event": "upload", "checkpoint", "bytes",
"seconds", "mb_per_s", "streams", "queue"}; a checkpoint handed over while more than one is still waiting
logs one warning line, and disk_warning() says when the checkpoint disk would not hold the next save.
"""
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.training_config import FILES_FORMAT, FILES_STREAMS, TrainingConfig
from utils.checkpoints.checksums import ChecksumError, verify_checksums
from utils.checkpoints.folders import CheckpointInfo, list_checkpoints, prune_checkpoints
from utils.display import fmt_bytes, one_line
from utils.errors import CheckpointError
from utils.storage.base import PART_BYTES, ObjectInfo, Storage, StorageError
from utils.uploads.formats import archive_name, check_archive_format, folder_size
from utils.uploads.manifest import UploadManifest, UploadRecord, by_step
from utils.uploads.transfer import UploadConflict, remote_url, upload_checkpoint

log = logging.getLogger(__name__)


Report = Callable[[dict[str, Any]], None]
"""Receives one dict per verified upload; called from upload worker threads, one call at a time."""


@dataclass(frozen=True)
class UploadSettings:
    """How an Uploader works: the config's upload fields (UploadSettings.of(config)), or a tool's choice."""

    archive_format: str = FILES_FORMAT
    background: bool = True
    """Upload from worker threads; False: submit() returns once the upload is verified."""
    workers: int = 1
    attempts: int = 5
    """Tries per upload, with exponential backoff from retry_delay_s, before it is recorded as failed."""
    retry_delay_s: float = 2.0
    queue_size: int = 4
    keep_local: int | None = None
    """Newest checkpoints kept on local disk once uploaded and verified; None keeps all."""
    progress_interval_s: float = 30.0
    streams: int = FILES_STREAMS
    """Concurrent transfers for one checkpoint of the files layout (an archive goes up as one stream)."""
    part_bytes: int | None = None
    """Size of the parts a large file goes up in; None: PART_BYTES."""

    @classmethod
    def of(cls, config: TrainingConfig) -> "UploadSettings":
        return cls(config.archive_format, config.background_upload, config.upload_workers, config.upload_attempts,
                   keep_local=config.keep_checkpoints, streams=config.upload_streams)

    @property
    def checkpoint_streams(self) -> int:
        """Transfers at once for one checkpoint: `streams` in the files layout; an archive is written as it is
        made, into one upload, so it goes up as one stream whatever `streams` says."""
        return self.streams if self.archive_format == FILES_FORMAT else 1

    def describe(self) -> str:
        """How checkpoints go up, for a run's start-up line: "in the background (1 worker(s), 16 streams each)"
        in the files layout, "... one stream each)" for an archive; "synchronously (16 streams)" without workers."""
        streams = "one stream" if self.checkpoint_streams == 1 else f"{self.checkpoint_streams} streams"
        if self.background:
            return f"in the background ({self.workers} worker(s), {streams} each)"
        return f"synchronously ({streams})"


class Uploader:
    """Uploads and verifies checkpoints of one checkpoint folder.

    background=True: submit() returns at once and `workers` threads upload from a bounded queue
    (a checkpoint that finds the queue full stays "local" and is queued when a place frees up).
    background=False: submit() uploads before returning. Either way a failure is retried with
    exponential backoff up to `attempts` times, then recorded as "failed"; the checkpoint stays local.
    streams: concurrent transfers for one checkpoint of the files layout. report: called after each
    verified upload with its figures (see the module docstring), from the worker thread that did it; the
    Uploader holds a lock around the call, so a callback that appends to a file needs none of its own, but
    it must return quickly (the next upload waits). An exception it raises is logged, never fatal.
    """

    def __init__(self, storage: Storage, checkpoint_dir: str | Path, settings: UploadSettings = UploadSettings(),
                 report: Report | None = None) -> None:
        check_archive_format(settings.archive_format)
        self.storage = storage
        self.checkpoint_dir = Path(checkpoint_dir)
        self.archive_format = settings.archive_format
        self.background = settings.background
        self.attempts = settings.attempts
        self.retry_delay_s = settings.retry_delay_s
        self.keep_local = settings.keep_local
        self.progress_interval_s = settings.progress_interval_s
        self.streams = settings.checkpoint_streams
        # Read at run time, not as a default: tests shrink PART_BYTES.
        self.part_bytes = settings.part_bytes if settings.part_bytes is not None else PART_BYTES
        self.report = report
        self._report_lock = threading.Lock()
        self._last_rate: float | None = None  # MB/s of the latest verified upload, for the falling-behind warning
        self.manifest = UploadManifest(checkpoint_dir, storage.url)
        self._queue: queue.Queue[str] = queue.Queue(maxsize=settings.queue_size)
        self._overflow: list[str] = []
        self._unfinished: set[str] = set()
        self._submitted: set[str] = set()
        self._progress: dict[str, tuple[int, int]] = {}  # name -> (bytes archived, checkpoint bytes)
        self._changed = threading.Condition()
        self._prune_lock = threading.Lock()
        if settings.background:
            for index in range(settings.workers):
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
        """Verified, and the remote copy is still there as verified: uploads.json may be stale (a bucket
        deleted mid-run, an object deleted by hand), and deleting on its word would lose the checkpoint."""
        record = self.manifest.read().get(info.name)
        return self.is_verified(info.name, {info.name: record} if record else {}) and \
            self._still_at_destination(info.name, record)  # type: ignore[arg-type]

    def _still_at_destination(self, name: str, record: UploadRecord) -> bool:
        assert record.remote_url is not None
        object_name = record.remote_url[len(self.destination.rstrip("/")) + 1:]
        try:
            stored = self.storage.stat_with_crc32c(object_name)
        except (StorageError, OSError) as error:
            log.warning(f"⚠️  Keeping {name} locally: cannot check its copy at {record.remote_url} ({error})")
            return False
        if stored is not None and (stored.size, stored.crc32c) == (record.size, record.crc32c):
            return True
        found = "gone" if stored is None else f"different (size {stored.size}, crc32c {stored.crc32c})"
        log.warning(f"⚠️  Keeping {name} locally: its uploaded copy {record.remote_url} is {found}, not the "
                    f"verified size {record.size} and crc32c {record.crc32c}; upload-all uploads it again")
        self.manifest.update(name, state="failed", error=f"the uploaded copy was {found} when checked before "
                                                         "deleting the local checkpoint; upload it again")
        return False

    def unverified_checkpoints(self) -> list[Path]:
        """Local checkpoints whose upload is not verified: they stay on disk whatever keep_checkpoints says."""
        records = self.manifest.read()
        return [info.path for info in list_checkpoints(self.checkpoint_dir) if not self.is_verified(info.name, records)]

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
            waiting = len(self._unfinished)
            self._unfinished.add(name)
            log.info(f"🚀 Starting background upload for {name}")
            if waiting > 1:
                log.warning(self._behind_warning(name, waiting))
            if self._queue.full():
                self.manifest.update(name, state="local", error=None)
                self._overflow.append(name)
                log.info(f"⏳ Upload queue full: {name} stays local and is queued when an upload finishes")
            else:
                self._enqueue(name)
                log.info(f"✅ Checkpoint {name} queued for background upload")

    def _behind_warning(self, name: str, waiting: int) -> str:
        rate = f" at {self._last_rate:,.0f} MB/s" if self._last_rate is not None else ""
        return (f"⚠️  Uploads are not keeping up{rate}: {name} joins {waiting} checkpoints still uploading or queued; "
                "save less often (a larger save_steps, or save_every_minutes) or upload faster (more upload_streams, "
                f"now {self.streams})")

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
            return by_step(self._unfinished)

    def wait(self, timeout_s: float, interrupted: Callable[[], bool] = lambda: False) -> list[str]:
        """Waits up to timeout_s for the submitted uploads, printing progress, or until interrupted() (a signal
        during the wait); returns those left unfinished."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            reported = 0.0
            while self._unfinished and not interrupted():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if time.monotonic() - reported >= self.progress_interval_s:
                    log.info(f"⏳ Waiting for {len(self._unfinished)} upload(s) ({self._progress_text()}); "
                             f"giving up in {left:,.0f} s")
                    reported = time.monotonic()
                self._changed.wait(min(left, 1.0))  # a second at a time, to notice an interruption
            return by_step(self._unfinished)

    def finish(self, timeout_s: float, interrupted: Callable[[], bool] = lambda: False) -> list[str]:
        """At the end of a run: waits for the uploads, then reports what is not verified (and returns it)."""
        started = time.monotonic()
        left = self.wait(timeout_s, interrupted)
        records = self.manifest.read()
        # Any state but "uploaded" here (a worker that could not record its result leaves "queued" or
        # "uploading") means the checkpoint exists only locally.
        failed = by_step(name for name in self._submitted - set(left) if not self.is_verified(name, records))
        if left:
            waited = time.monotonic() - started
            after = f"when interrupted, after {waited:,.0f} s" if interrupted() else f"after {timeout_s:,.0f} s"
            log.warning(f"⚠️  {len(left)} upload(s) unfinished {after}: {', '.join(left)}")
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
        for name in by_step(self._unfinished):
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
                    log.error(f"❌ Could not queue the next upload: {one_line(error)}")

    def _record_stopped(self, name: str, error: Exception) -> None:
        message = one_line(error)
        log.error(f"❌ Upload of {name} stopped: {message}")
        try:
            self.manifest.update(name, state="failed", error=message)
        except Exception as record_error:  # finish() still reports it: its record does not say "uploaded"
            log.error(f"❌ Could not record the failed upload of {name} in {self.manifest.path}: "
                      f"{one_line(record_error)}")

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
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            attempts += 1
            self.manifest.update(name, state="uploading", remote_url=url, attempts=attempts)
            try:
                if self.archive_format != FILES_FORMAT:  # the files layout checks each file as it reads it
                    verify_checksums(folder)
                obj = self._transfer(folder, archive_name(name, self.archive_format))
            except (UploadConflict, ChecksumError) as error:  # retrying cannot help: the checkpoint stays local
                log.error(f"❌ {error}")
                return self.manifest.update(name, state="failed", error=str(error))
            except Exception as error:  # network, server, disk: retried; the attempt budget bounds a lasting one
                message = one_line(error)
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
            self._report(name, folder_size(folder), time.monotonic() - started)
            if self.keep_local is not None:
                try:
                    for deleted in self.prune(self.keep_local):
                        log.info(f"🗑️  Cleaned up {deleted} (uploaded and verified; keeping the newest "
                                 f"{self.keep_local})")
                except (OSError, CheckpointError) as error:  # the upload stays verified; the next prune tries again
                    log.error(f"❌ Could not remove old checkpoints after uploading {name}: {one_line(error)}")
            return record
        raise AssertionError("unreachable")

    def _report(self, name: str, size: int, seconds: float) -> None:
        seconds = max(seconds, 1e-6)
        self._last_rate = size / 1e6 / seconds
        if self.report is None:
            return
        with self._changed:
            queued = max(len(self._unfinished) - 1, 0)  # this one is still counted until its worker moves on
        figures = {"event": "upload", "checkpoint": name, "bytes": size, "seconds": round(seconds, 3),
                   "mb_per_s": round(self._last_rate, 1), "streams": self.streams, "queue": queued}
        with self._report_lock:
            try:
                self.report(figures)
            except Exception as error:  # a reporting problem must not fail a verified upload
                log.error(f"❌ The upload report callback failed: {one_line(error)}")

    def _progress_reporter(self, name: str, total: int) -> Callable[[int], None]:
        """on_bytes for the transfer threads: counts under the lock and logs a line every progress_interval_s."""
        started = time.monotonic()
        state = {"done": 0, "logged": started}

        def on_bytes(count: int) -> None:
            with self._changed:
                state["done"] += count
                done = state["done"]
                self._progress[name] = (done, total)
                now = time.monotonic()
                if now - state["logged"] < self.progress_interval_s:
                    return
                state["logged"] = now
            log.info(f"☁️  {name}: {100 * done / max(total, 1):.0f}% ({fmt_bytes(done)} of {fmt_bytes(total)}, "
                     f"{done / 1e6 / (now - started):,.0f} MB/s)")

        return on_bytes

    def _transfer(self, folder: Path, object_name: str) -> ObjectInfo:
        """One attempt: upload the checkpoint and verify it, or accept an identical one already there."""
        total = folder_size(folder)
        started = time.monotonic()
        stored = upload_checkpoint(self.storage, folder, object_name, self.archive_format, self.streams,
                                   self._progress_reporter(folder.name, total), self.part_bytes)
        seconds = max(time.monotonic() - started, 1e-6)
        if stored.sent:
            log.info(f"✅ Successfully uploaded {folder.name}: {fmt_bytes(total)}, "
                     f"{remote_url(self.storage, object_name)} crc32c {stored.info.crc32c}, verified ({seconds:,.1f} s, "
                     f"{total / 1e6 / seconds:,.0f} MB/s)")
        return stored.info


def disk_warning(checkpoint_dir: str | Path, next_save_bytes: int, unverified: Sequence[Path]) -> str | None:
    """One warning line when the disk holding checkpoint_dir would not take the next save (about
    next_save_bytes) beside the checkpoints it already holds, of which `unverified` (not yet verified at the
    destination: Uploader.unverified_checkpoints()) cannot be deleted to make room; None when it would."""
    free = shutil.disk_usage(checkpoint_dir).free
    if free >= next_save_bytes:
        return None
    pinned = sum(folder_size(path) for path in unverified)
    why = (f"{len(unverified)} checkpoint(s) ({fmt_bytes(pinned)}) wait for a verified upload and are never "
           "deleted before it: uploads are not keeping up or failing (python scripts/upload_manager.py status); "
           "save less often (save_steps, save_every_minutes) or upload faster (upload_streams)"
           if unverified else "free disk space or lower keep_checkpoints")
    return f"⚠️  {checkpoint_dir}: {fmt_bytes(free)} free, the next save needs about {fmt_bytes(next_save_bytes)}; {why}"
