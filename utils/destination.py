"""The upload destination: gs://bucket/prefix or a local folder, and the checkpoint archives it holds.

Opening it checks it once (a listing and a small write probe), so that a wrong bucket or a missing
permission fails before training. The catalogue of remote checkpoints serves --resume ("latest" may be a
remote one), the refusals that keep a run from writing under names already uploaded, and the download of a
remote checkpoint, unpacked into the checkpoint folder and recorded as uploaded.
"""
import logging
import secrets
from dataclasses import replace
from pathlib import Path

from utils.archive import extract_archive, split_archive_name
from utils.checkpoint_utils import (TMP_PREFIX, CheckpointInfo, UploadError, find_checkpoint, list_checkpoints,
                                    parse_checkpoint_name)
from utils.manifest import UploadManifest
from utils.storage import LocalStorage, ObjectInfo, Storage, StorageError, crc32c_of_file, open_storage

log = logging.getLogger(__name__)


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


def find_local_or_remote(checkpoint_dir: str | Path, name: str, storage: Storage | None
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
