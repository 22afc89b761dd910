"""The upload destination: gs://bucket/prefix or a local folder, and the checkpoints it holds.

Opening it checks it once (a listing and a small write probe), so that a wrong bucket or a missing
permission fails before training, and clears what uploads cut short left there (dead writers' temporary
files, part objects older than a day). The catalogue of remote checkpoints (files layout and archives)
serves --resume ("latest" may be a remote one), the refusals that keep a run from writing under names
already uploaded, and the restore of a remote checkpoint into the checkpoint folder, recorded as uploaded.
"""
import logging
import secrets
import time
from pathlib import Path

from configs.training_config import FILES_FORMAT, FILES_STREAMS
from utils.checkpoints.folders import CheckpointInfo, find_checkpoint, list_checkpoints, parse_checkpoint_name
from utils.display import fmt_bytes
from utils.errors import UploadError
from utils.storage import open_storage
from utils.storage.base import ObjectInfo, Storage, StorageError
from utils.storage.local import LocalStorage
from utils.uploads.formats import Include, all_files, parse_files_manifest, split_archive_name
from utils.uploads.manifest import UploadManifest
from utils.uploads.transfer import remote_url, restore_archive, restore_files

log = logging.getLogger(__name__)


def open_destination(url: str, credentials: str | None = None, check_write: bool = True) -> Storage:
    """The upload destination, checked once by listing it and (check_write) by writing and deleting a small
    probe object, so that a wrong bucket or missing permission is a one-line error before training starts
    rather than after the first checkpoint. A local folder is created. Opened for writing (a run, upload-all),
    it also removes the leftovers of uploads that were cut short."""
    try:
        storage = open_storage(url, credentials)
        if isinstance(storage, LocalStorage):
            storage.root.mkdir(parents=True, exist_ok=True)
        storage.list("checkpoint-*")
    except (StorageError, OSError) as error:
        raise UploadError(f"upload destination {url}: {reason_after(error, storage_url(url))}") from None
    if check_write:
        _probe_write(storage, url)
        remove_leftovers(storage)
    return storage


def storage_url(url: str) -> str:
    """How the storage names itself in its errors: gs:// URLs without a trailing "/", folders absolute."""
    return url.rstrip("/") if url.startswith("gs://") else str(Path(url).resolve())


def reason_after(error: BaseException, subject: str) -> str:
    """The error's message without a leading "<subject>: ", for a line that names the subject already."""
    message = str(error)
    return message[len(subject) + 2:] if message.startswith(f"{subject}: ") else message


def remove_leftovers(storage: Storage) -> None:
    """Housekeeping, so it never stops a run: what dead writers left (local temporary files, old parts)."""
    try:
        removed = storage.remove_leftovers()
    except (StorageError, OSError) as error:
        log.warning(f"⚠️  Could not look for leftovers of cut-short uploads at {storage.url}: {error}")
        return
    if removed:
        names = ", ".join(info.name for info in removed[:3]) + (", ..." if len(removed) > 3 else "")
        log.info(f"🧹 Removed {len(removed)} leftover(s) of uploads cut short at {storage.url} "
                 f"({fmt_bytes(sum(info.size for info in removed))}): {names}")


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


def remote_checkpoints(storage: Storage) -> dict[str, tuple[CheckpointInfo, ObjectInfo]]:
    """Checkpoints at the destination by name, each with the object that stands for it: its files manifest
    (<name>.files.json, preferred) or its archive. info.path is where it would be restored to."""
    found: dict[str, tuple[CheckpointInfo, ObjectInfo]] = {}
    for obj in storage.list("checkpoint-*"):
        # Only a name that is a checkpoint's (CHECKPOINT_PATTERN: one path component, no "/" or "..") is taken, so
        # a listed name never leads outside the checkpoint folder it is restored into.
        split = split_archive_name(obj.name)
        if split and split[0] not in found:
            parsed = parse_checkpoint_name(split[0])
            assert parsed is not None
            found[split[0]] = (CheckpointInfo(split[0], Path(), *parsed), obj)
    return found


def _order(info: CheckpointInfo) -> tuple[int, int, int]:
    return info.step, info.epoch, info.files


def find_local_or_remote(checkpoint_dir: str | Path, name: str, storage: Storage | None
                         ) -> tuple[CheckpointInfo, ObjectInfo | None]:
    """`name` or "latest" among the local checkpoints and, when a destination is set, the remote ones.

    Returns the checkpoint (its path under checkpoint_dir) and, when the destination holds it, its object
    (files manifest or archive):
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


def checkpoint_bytes(storage: Storage, obj: ObjectInfo) -> int:
    """The size of a remote checkpoint: its files' sizes (read from the manifest) or its archive's."""
    split = split_archive_name(obj.name)
    if split is None or split[1] != FILES_FORMAT:
        return obj.size
    entries = parse_files_manifest(storage.read_bytes(obj.name), split[0], remote_url(storage, obj.name))
    return sum(entry.size for entry in entries)


def restore_checkpoint(storage: Storage, obj: ObjectInfo, dest_dir: str | Path, streams: int = FILES_STREAMS,
                       include: Include = all_files) -> Path:
    """Streams a remote checkpoint (files layout or archive) into dest_dir/.tmp-<name>/ and renames it to
    dest_dir/<name> when complete and checked (size and crc32c); the files `include` accepts only."""
    split = split_archive_name(obj.name)
    if split is None:
        raise UploadError(f"{obj.name} is not a checkpoint at {storage.url}")
    name, archive_format = split
    folder = Path(dest_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / name).exists():
        raise UploadError(f"{folder / name} already exists; not restoring over it")
    size = checkpoint_bytes(storage, obj)
    log.info(f"⬇️  Downloading {remote_url(storage, obj.name)} ({fmt_bytes(size)})")
    started = time.monotonic()
    try:
        if archive_format == FILES_FORMAT:
            path = restore_files(storage, name, folder, streams, include)
        else:
            path = restore_archive(storage, obj.name, archive_format, name, folder, include)
    except StorageError as error:
        raise UploadError(f"downloading {remote_url(storage, obj.name)}: {error}") from None
    seconds = max(time.monotonic() - started, 1e-6)
    verb = "Restored" if archive_format == FILES_FORMAT else "Unpacked"
    log.info(f"📂 {verb} {name} into {folder} ({fmt_bytes(size)} in {seconds:,.1f} s, "
             f"{size / 1e6 / seconds:,.0f} MB/s)")
    return path


def download_checkpoint(storage: Storage, obj: ObjectInfo, checkpoint_dir: str | Path,
                        streams: int = FILES_STREAMS) -> Path:
    """Restores a remote checkpoint into checkpoint_dir (restore_checkpoint) and records it as uploaded,
    so it is not uploaded again."""
    path = restore_checkpoint(storage, obj, checkpoint_dir, streams)
    if obj.crc32c is None:  # listed in a local folder, which keeps no crc32c
        obj = storage.stat_with_crc32c(obj.name) or obj
    UploadManifest(checkpoint_dir, storage.url).update(path.name, state="uploaded",
                                                       remote_url=remote_url(storage, obj.name), size=obj.size,
                                                       crc32c=obj.crc32c, error=None)
    return path
