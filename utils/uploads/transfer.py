"""A checkpoint folder to and from a Storage: uploaded (upload_checkpoint) in the files layout by several
streams at once or as one streamed archive, and restored (files layout or archive) straight into
<dest_dir>/.tmp-<name>/, renamed when complete.

An object already at the checkpoint's name (its manifest or archive) is never overwritten: identical to what
the local checkpoint would give, it counts as uploaded; different, it is an UploadConflict.

Upload, one attempt (upload_folder): every file becomes <name>/<relative path>, large ones in parts
(utils/storage/base.py's FileUpload), all parts of all files sent by `streams` threads; what an earlier attempt
left is reused when identical (same size and crc32c as the local file) and deleted otherwise; once every
file is verified, <name>.files.json is written last, never overwriting, and checked.

Restore: the files of a files-layout checkpoint are downloaded by `streams` threads, each checked (by the
library on GCS) and compared with the manifest's size and crc32c; an archive is streamed through a pipe
into the unpacker, so no copy of the archive is written. Either way the disk holds at most the checkpoint
(the files `include` accepts) plus the file in flight, and a tqdm bar shows the bytes.
"""
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import google_crc32c
from tqdm import tqdm

from configs.training_config import FILES_FORMAT
from utils.checkpoints.checksums import check_file, recorded_checksums
from utils.checkpoints.folders import TMP_PREFIX
from utils.display import fmt_bytes
from utils.errors import UploadError
from utils.storage.base import (
    CHUNK_BYTES,
    PART_BYTES,
    FileUpload,
    ObjectInfo,
    OnBytes,
    PreconditionFailedError,
    Storage,
    StorageError,
    crc32c_of_file,
    encode_crc32c,
)
from utils.uploads.formats import (
    FileEntry,
    HashingWriter,
    Include,
    all_files,
    archive_name,
    checkpoint_files,
    files_manifest,
    folder_size,
    measure_archive,
    parse_files_manifest,
    unpack_archive,
    write_archive,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def remote_url(storage: Storage, object_name: str) -> str:
    return f"{storage.url.rstrip('/')}/{object_name}"


def run_all(pool: ThreadPoolExecutor, calls: list[Callable[[], T]]) -> list[T]:
    """Runs the calls on the pool and returns their results in order; at the first failure the calls not
    yet started are cancelled and that error is raised once the running ones have stopped."""
    futures: list[Future[T]] = [pool.submit(call) for call in calls]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = [future for future in futures if future in done and future.exception() is not None]
    if failed:
        for future in futures:
            future.cancel()
        wait(futures)
        raise failed[0].exception()  # type: ignore[misc]
    return [future.result() for future in futures]


# --- upload --------------------------------------------------------------------------------------

class UploadConflict(UploadError):
    """A different object already holds the remote name; it is never overwritten."""


@dataclass(frozen=True)
class Uploaded:
    info: ObjectInfo
    """The verified object that stands for the checkpoint (its files manifest or its archive)."""
    sent: bool
    """False when an identical copy was already there."""


def upload_checkpoint(storage: Storage, folder: Path, object_name: str, archive_format: str, streams: int,
                      on_bytes: OnBytes, part_bytes: int = PART_BYTES) -> Uploaded:
    """One attempt at uploading checkpoint `folder` as `object_name` (<name>.files.json or an archive), verified;
    an identical copy already there is accepted, a different one is an UploadConflict."""
    existing = storage.stat_with_crc32c(object_name)
    if existing is not None:
        return Uploaded(accept_existing(storage, folder, existing, archive_format), sent=False)
    try:
        if archive_format == FILES_FORMAT:
            log.info(f"☁️  Uploading {folder.name} to {remote_url(storage, folder.name)}/: "
                     f"{len(checkpoint_files(folder))} files, {streams} streams")
            return Uploaded(upload_folder(storage, folder, folder.name, streams, on_bytes, part_bytes), sent=True)
        return Uploaded(upload_archive(storage, folder, object_name, archive_format, on_bytes), sent=True)
    except PreconditionFailedError:
        # Another uploader (upload_manager, a second run) got there first.
        existing = storage.stat_with_crc32c(object_name)
        if existing is None:
            raise
        return Uploaded(accept_existing(storage, folder, existing, archive_format), sent=False)


def upload_archive(storage: Storage, folder: Path, object_name: str, archive_format: str,
                   on_bytes: OnBytes) -> ObjectInfo:
    """The folder streamed as one archive into one upload (no local copy), then checked against the bytes sent."""
    url = remote_url(storage, object_name)
    log.info(f"📦 Creating archive: {object_name} from {fmt_bytes(folder_size(folder))} of checkpoint files "
             "(streamed, no local copy)")
    log.info(f"☁️  Uploading to {url}")
    # On an exception inside the block the writer abandons the upload instead of finishing it,
    # so a partial archive never becomes an object.
    with storage.open_writer(object_name) as writer:
        sink = HashingWriter(writer)
        write_archive(folder, sink, archive_format, on_bytes)
    stored = storage.stat_with_crc32c(object_name)
    if stored is None or stored.size != sink.size or stored.crc32c != sink.crc32c:
        found = f"size {stored.size}, crc32c {stored.crc32c}" if stored else "no object"
        raise UploadError(f"{url}: verification failed: sent {sink.size} bytes with crc32c {sink.crc32c}, "
                          f"found {found}")
    return stored


def accept_existing(storage: Storage, folder: Path, existing: ObjectInfo, archive_format: str) -> ObjectInfo:
    """An object of the checkpoint's name is already there: done if it is this checkpoint's, else a conflict."""
    url = remote_url(storage, existing.name)
    entries = local_entries(folder) if archive_format == FILES_FORMAT else []
    if archive_format == FILES_FORMAT:
        manifest = files_manifest(folder.name, entries)
        size, crc32c = len(manifest), encode_crc32c(google_crc32c.value(manifest))
    else:
        size, crc32c = measure_archive(folder, archive_format)
    if (existing.size, existing.crc32c) != (size, crc32c):
        raise UploadConflict(f"{url} already exists and differs from local {folder.name} (remote {existing.size} "
                             f"bytes, crc32c {existing.crc32c}; local {size} bytes, crc32c {crc32c}); refusing to "
                             "overwrite it: delete it or choose another upload_destination")
    try:
        check_all_stored(storage, folder.name, {entry.path: entry for entry in entries})
    except UploadError as error:  # a complete-looking checkpoint with files gone: someone deleted them
        raise UploadConflict(f"{error}, but {url} lists it: delete {url} to upload {folder.name} again") from None
    log.info(f"✅ {folder.name} is already at {url} (same size and crc32c): nothing to upload")
    return existing


def _reusable(storage: Storage, info: ObjectInfo, local: Path) -> str | None:
    """The crc32c of a file an earlier attempt already stored, when it holds exactly the local bytes."""
    if not local.is_file() or info.size != local.stat().st_size:
        return None
    stored = info if info.crc32c is not None else storage.stat_with_crc32c(info.name)
    crc = crc32c_of_file(local)
    return crc if stored is not None and stored.crc32c == crc else None


def upload_folder(storage: Storage, folder: Path, name: str, streams: int, on_bytes: OnBytes,
                  part_bytes: int = PART_BYTES) -> ObjectInfo:
    """One attempt at uploading checkpoint `folder` as `name` in the files layout (see the module docstring);
    returns the verified manifest object. The caller has checked that no manifest of `name` exists yet."""
    files = checkpoint_files(folder)
    entries: dict[str, FileEntry] = {}
    for info in storage.list_tree(name):  # leftovers of an attempt that failed or was killed
        relative = info.name[len(name) + 1:]
        reused = _reusable(storage, info, folder / relative) if relative in files else None
        if reused is not None:
            entries[relative] = FileEntry(relative, info.size, reused)
            on_bytes(info.size)
        else:
            storage.delete(info.name)
    if entries:
        log.info(f"♻️  {name}: {len(entries)} file(s) already at {storage.url} from an earlier attempt, identical: "
                 "not sent again")
    pending = [relative for relative in files if relative not in entries]
    uploads: list[FileUpload] = []
    try:
        for relative in pending:  # one by one: those begun before one that fails are aborted too
            uploads.append(storage.begin_file(folder / relative, f"{name}/{relative}", part_bytes))
        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix=f"upload-{name[-24:]}") as pool:
            sends = [(upload, part) for upload in uploads for part in upload.parts]
            crcs = run_all(pool, [lambda u=upload, p=part: u.send(p, on_bytes) for upload, part in sends])
            by_upload: dict[int, list[int]] = {}
            for (upload, _), crc in zip(sends, crcs):
                by_upload.setdefault(id(upload), []).append(crc)
            stored = run_all(pool, [lambda u=upload: u.finish(by_upload[id(u)]) for upload in uploads])
    except BaseException:
        for upload in uploads:
            upload.abort()
        raise
    for relative, info in zip(pending, stored):
        entries[relative] = FileEntry(relative, info.size, info.crc32c or "")
    # What was sent is what was saved: a file damaged on this disk since (read back by the upload) never gets
    # a manifest that would let a resume take it.
    recorded = recorded_checksums(folder) or {}
    for relative, entry in entries.items():
        check_file(folder / relative, entry.size, entry.crc32c, recorded.get(relative))
    check_all_stored(storage, name, entries)
    manifest = files_manifest(name, list(entries.values()))
    manifest_name = archive_name(name, FILES_FORMAT)
    with storage.open_writer(manifest_name) as writer:
        writer.write(manifest)
    stored_manifest = storage.stat_with_crc32c(manifest_name)
    crc = encode_crc32c(google_crc32c.value(manifest))
    if stored_manifest is None or stored_manifest.size != len(manifest) or stored_manifest.crc32c != crc:
        raise UploadError(f"{remote_url(storage, manifest_name)}: verification failed (sent {len(manifest)} bytes "
                          f"with crc32c {crc}, found {stored_manifest})")
    return stored_manifest


def local_entries(folder: Path) -> list[FileEntry]:
    """Every file of a local checkpoint with its size and crc32c (reads them all), each as it was saved: a file
    that differs from the checksums.json recorded at save time is a ChecksumError, never uploaded."""
    recorded = recorded_checksums(folder) or {}
    entries = []
    for path in checkpoint_files(folder):
        entry = FileEntry(path, (folder / path).stat().st_size, crc32c_of_file(folder / path))
        check_file(folder / path, entry.size, entry.crc32c, recorded.get(path))
        entries.append(entry)
    return entries


def check_all_stored(storage: Storage, name: str, entries: dict[str, FileEntry]) -> None:
    """One listing before the manifest is written: every file is there, with its size (and its crc32c where
    the listing tells it), so a file deleted meanwhile never hides behind a manifest."""
    listed = {info.name[len(name) + 1:]: info for info in storage.list_tree(name)}
    for relative, entry in entries.items():
        info = listed.get(relative)
        if info is None or info.size != entry.size or (info.crc32c is not None and info.crc32c != entry.crc32c):
            raise UploadError(f"{remote_url(storage, f'{name}/{relative}')} is missing or differs (found "
                              f"{'nothing' if info is None else f'{info.size} bytes, crc32c {info.crc32c}'})")


# --- restore -------------------------------------------------------------------------------------

def _fresh_tmp(dest_dir: Path, name: str) -> Path:
    tmp = dest_dir / f"{TMP_PREFIX}{name}"
    if tmp.exists():  # left by a restore cut short
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _progress(total: int, name: str) -> tuple[tqdm, OnBytes]:
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"⬇️  {name}", mininterval=2.0)
    lock = threading.Lock()

    def on_bytes(count: int) -> None:
        with lock:
            bar.update(count)

    return bar, on_bytes


def restore_files(storage: Storage, name: str, dest_dir: Path, streams: int, include: Include = all_files) -> Path:
    """Downloads checkpoint `name` of the files layout into dest_dir/<name> (the files `include` accepts)."""
    manifest_url = remote_url(storage, archive_name(name, FILES_FORMAT))
    entries = [entry for entry in parse_files_manifest(storage.read_bytes(archive_name(name, FILES_FORMAT)), name,
                                                       manifest_url) if include(entry.path)]
    tmp = _fresh_tmp(dest_dir, name)
    bar, on_bytes = _progress(sum(entry.size for entry in entries), name)

    def fetch(entry: FileEntry) -> None:
        info = storage.download(f"{name}/{entry.path}", tmp / entry.path, on_bytes)
        if info.size != entry.size or info.crc32c != entry.crc32c:
            raise UploadError(f"{remote_url(storage, f'{name}/{entry.path}')} differs from {manifest_url} (size "
                              f"{info.size} vs {entry.size}, crc32c {info.crc32c} vs {entry.crc32c})")

    try:
        with bar, ThreadPoolExecutor(max_workers=streams, thread_name_prefix="restore") as pool:
            run_all(pool, [lambda e=entry: fetch(e) for entry in entries])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = dest_dir / name
    tmp.rename(final)
    return final


def restore_archive(storage: Storage, object_name: str, archive_format: str, name: str, dest_dir: Path,
                    include: Include = all_files) -> Path:
    """Streams the archive object into the unpacker (through a pipe: no copy of the archive on disk), into
    dest_dir/.tmp-<name>/, renamed to dest_dir/<name> once the download has passed its crc32c check."""
    url = remote_url(storage, object_name)
    stat = storage.stat(object_name)
    if stat is None:
        raise UploadError(f"{url}: not found")
    tmp = _fresh_tmp(dest_dir, name)
    bar, on_bytes = _progress(stat.size, name)
    read_end, write_end = os.pipe()
    reader, writer = open(read_end, "rb", buffering=CHUNK_BYTES), open(write_end, "wb", buffering=CHUNK_BYTES)
    stopped_reading = threading.Event()
    failures: list[BaseException] = []

    def download() -> None:
        try:
            storage.download_stream(object_name, writer, on_bytes)
            writer.flush()
        except BaseException as error:  # reported by the main thread
            if not stopped_reading.is_set():  # else it is only the broken pipe of an unpacker that gave up
                failures.append(error)
        finally:
            try:
                writer.close()
            except OSError:
                pass

    thread = threading.Thread(target=download, name=f"download-{name[-24:]}", daemon=True)
    unpack_error: UploadError | None = None
    try:
        with bar:
            thread.start()
            try:
                unpacked = unpack_archive(reader, archive_format, tmp, name, url, include)
                while reader.read(CHUNK_BYTES):  # the end of the stream: the library checks the crc32c there
                    pass
            except UploadError as error:
                unpack_error = error
            finally:
                stopped_reading.set()
                reader.close()
                thread.join()
        if failures:  # a failed download is why the unpacker failed, if it did
            error = failures[0]
            raise UploadError(f"downloading {url}: {error}") if isinstance(error, (StorageError, OSError)) else error
        if unpack_error is not None:
            raise unpack_error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = dest_dir / name
    unpacked.rename(final)
    tmp.rmdir()
    return final
