"""Checkpoint uploads: archive -> upload -> verify -> record, in background threads.

A complete checkpoint folder is handed to an Uploader. A worker thread streams it as one archive
(utils/archive.py) straight into a resumable upload at the destination (gs://bucket/prefix or a local
folder), so no second copy is written to local disk. The upload never overwrites an object
(if_generation_match=0) and counts as done only once the stored object's size and crc32c equal those of
the bytes sent. Every state change is written to <checkpoint_dir>/uploads.json (utils/manifest.py), so
that scripts/upload_manager.py and a restarted run see it, and a checkpoint whose upload is not verified
is never pruned.
"""
import logging
import os
import queue
import threading
import time
from pathlib import Path

from utils.archive import (HashingWriter, archive_name, check_archive_format, folder_size, human_size,
                           measure_archive, write_archive)
from utils.checkpoint_utils import CheckpointInfo, UploadError, list_checkpoints, prune_checkpoints
from utils.destination import remote_url, stored_object
from utils.manifest import UploadManifest, UploadRecord, by_step, one_line
from utils.storage import ObjectInfo, PreconditionFailedError, Storage

log = logging.getLogger(__name__)


class UploadConflict(UploadError):
    """A different object already holds the remote name; it is never overwritten."""


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
            return by_step(self._unfinished)

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
            return by_step(self._unfinished)

    def finish(self, timeout_s: float) -> list[str]:
        """At the end of a run: waits for the uploads, then reports what is not verified (and returns it)."""
        left = self.wait(timeout_s)
        records = self.manifest.read()
        # Any state but "uploaded" here (a worker that could not record its result leaves "queued" or
        # "uploading") means the checkpoint exists only locally.
        failed = by_step(name for name in self._submitted - set(left) if not self.is_verified(name, records))
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
        for attempt in range(1, self.attempts + 1):
            attempts += 1
            self.manifest.update(name, state="uploading", remote_url=url, attempts=attempts)
            try:
                obj = self._transfer(folder, archive_name(name, self.archive_format))
            except UploadConflict as error:
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
