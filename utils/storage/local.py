"""The local-folder backend of utils/storage/ (its interface: base.py): a folder on a local or mounted filesystem.

Every write goes to a hidden temporary file named `.tmp-upload-<pid>+<host>+<name>` beside its final name,
is fsynced, then hard-linked to the final name (which fails if that exists: nothing is overwritten) and the
folder fsynced. A writer killed on the way leaves its temporary file; the pid and host in the name tell a
dead writer's leftovers (removed by remove_leftovers) from a live one's (kept). A write that fails (a full
disk) is one line naming the destination folder, and removes its temporary file and the folders it created
that stayed empty.
"""
from __future__ import annotations  # a method named `list` must not hide the builtin in annotations

import fnmatch
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

from utils.files import fsync_dir
from utils.storage.base import (
    CHUNK_BYTES,
    PART_BYTES,
    NotFoundError,
    ObjectInfo,
    OnBytes,
    Part,
    PreconditionFailedError,
    StorageError,
    combine_parts,
    crc32c_of_file,
    crc32c_of_range,
    encode_crc32c,
    split_into_parts,
)

log = logging.getLogger(__name__)

TMP_UPLOAD_PREFIX = ".tmp-upload-"
_TMP_UPLOAD = re.compile(r"^\.tmp-upload-(\d+)\+([A-Za-z0-9.-]+)\+")
_LEGACY_TMP_UPLOAD = re.compile(r"^\.tmp-upload-(\d+)-")
"""Before the host was in the name; such a file is another host's unless it has been idle for LEGACY_IDLE_S."""
LEGACY_IDLE_S = 3600.0


def tmp_upload_name(final_name: str) -> str:
    return f"{TMP_UPLOAD_PREFIX}{os.getpid()}+{socket.gethostname()}+{final_name}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def dead_writer(path: Path, host: str, now: float) -> bool:
    """Whether a .tmp-upload- file was left by a writer that no longer runs: its pid is gone on this host.
    Another host's files are never judged (its pids mean nothing here)."""
    match = _TMP_UPLOAD.match(path.name)
    if match:
        return match[2] == host and not pid_alive(int(match[1]))
    legacy = _LEGACY_TMP_UPLOAD.match(path.name)
    if legacy:  # no host in the name: only once nobody has written to it for a while
        return not pid_alive(int(legacy[1])) and now - path.stat().st_mtime > LEGACY_IDLE_S
    return False


def link_into_place(tmp: Path, final: Path) -> None:
    """Links the fsynced `tmp` to `final` (never replacing it), removes `tmp` and makes the new name durable:
    the local checkpoint may be deleted once this is verified."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise PreconditionFailedError(f"{final}: already exists; not overwriting") from None
    finally:
        tmp.unlink()
    fsync_dir(final.parent)


def cannot_write(root: Path, final: Path, error: OSError) -> StorageError:
    """A failed write at the destination as one line naming it: a full disk's OSError (Errno 28) names nothing."""
    return StorageError(f"upload destination {root}: cannot write {final.relative_to(root)} "
                        f"({error.strerror or error})")


def remove_empty_folders(folder: Path, root: Path) -> None:
    """`folder` and its parents below `root` while they are empty: the checkpoint folders that a failed write
    created, which would otherwise stay behind empty."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (another file's, maybe another writer's), or gone already
            return
        folder = folder.parent


class LocalStorage:
    """A folder on a local or mounted filesystem; writes go through a temporary file and a hard link."""

    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder).resolve()
        self.url = str(self.root)
        self.auth = "local folder"
        self._root_device: int | None = None  # the filesystem of root at the first write; later writes need the same

    def _path(self, name: str) -> Path:
        path = self.root / name
        # Whoever can write the folder could plant a link named like a future checkpoint: nothing is read or written
        # through one that leads outside it.
        if not path.resolve().is_relative_to(self.root):
            raise StorageError(f"{self.root}: refusing {name!r}: it leads outside the folder (a symbolic link?)")
        return path

    def _info(self, name: str, path: Path) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(name, stat.st_size, None, None, stat.st_mtime)

    def list(self, pattern: str = "*") -> list[ObjectInfo]:
        if not self.root.is_dir():
            raise NotFoundError(f"{self.root}: folder does not exist")
        return [self._info(p.name, p) for p in sorted(self.root.iterdir())
                if p.is_file() and fnmatch.fnmatchcase(p.name, pattern)]

    def list_tree(self, folder: str) -> list[ObjectInfo]:
        """Every file under `folder` (names relative to the root), without writers' temporary files."""
        top = self._path(folder)
        if not top.is_dir():
            return []
        return [self._info(str(p.relative_to(self.root)), p) for p in sorted(top.rglob("*"))
                if p.is_file() and not p.name.startswith(TMP_UPLOAD_PREFIX)]

    def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        return self._info(name, path) if path.is_file() else None

    def stat_with_crc32c(self, name: str) -> ObjectInfo | None:
        """stat() with the crc32c, which a folder does not keep: computed from the file."""
        info = self.stat(name)
        if info is None:
            return None
        return ObjectInfo(info.name, info.size, crc32c_of_file(self._path(name)), None, info.modified)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def download(self, name: str, dest: Path, on_bytes: OnBytes | None = None) -> ObjectInfo:
        source = self._path(name)
        if not source.is_file():
            raise NotFoundError(f"{source}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            with open(tmp, "wb") as out:
                info = self.download_stream(name, out, on_bytes)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def download_stream(self, name: str, out: BinaryIO, on_bytes: OnBytes | None = None) -> ObjectInfo:
        """Copies the file into `out`; the crc32c is of the bytes copied (a folder keeps none to check against)."""
        source = self._path(name)
        crc, size = 0, 0
        try:
            with open(source, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    out.write(chunk)
                    crc = google_crc32c.extend(crc, chunk)
                    size += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except FileNotFoundError:
            raise NotFoundError(f"{source}: no such file") from None
        return ObjectInfo(name, size, encode_crc32c(crc), None)

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self._path(name)}: no such file") from None

    def upload_file(self, src: Path, name: str) -> ObjectInfo:
        with self.open_writer(name) as writer, open(src, "rb") as reader:
            shutil.copyfileobj(reader, writer, CHUNK_BYTES)
        return ObjectInfo(name, Path(src).stat().st_size, crc32c_of_file(src), None)

    def open_writer(self, name: str) -> BinaryIO:
        self._check_root()
        return _LocalWriter(self.root, self._path(name))  # type: ignore[return-value]

    def begin_file(self, src: Path, name: str, part_bytes: int = PART_BYTES) -> "LocalFileUpload":
        self._check_root()
        if self.exists(name):
            raise PreconditionFailedError(f"{self._path(name)}: already exists; not overwriting")
        return LocalFileUpload(self.root, src, self._path(name), name, part_bytes)

    def _check_root(self) -> None:
        """A mounted destination that drops out leaves its folder missing, or an empty mount point on the boot
        disk: writing there would record checkpoints as uploaded that go down with the machine."""
        try:
            device = self.root.stat().st_dev
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: the destination folder is gone (unmounted?); not recreating it") from None
        if self._root_device is None:
            self._root_device = device
        elif device != self._root_device:
            raise StorageError(f"{self.root}: now on another filesystem than at the first upload (unmounted?)")

    def replace_file(self, src: Path, name: str) -> None:
        """Writes src as `name`, replacing what is there (for logs, which grow; checkpoints are never replaced)."""
        self._check_root()
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(tmp_upload_name(final.name))
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, final)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{final}: cannot write ({error.strerror or error})") from None

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            raise NotFoundError(f"{self._path(name)}: no such file") from None

    def remove_leftovers(self) -> list[ObjectInfo]:
        """Deletes the temporary files of writers on this host that no longer run (kill -9 mid-upload); a live
        writer's and another host's stay. Returns what was removed."""
        host, now, removed = socket.gethostname(), time.time(), []
        if not self.root.is_dir():
            return removed
        for path in sorted(self.root.rglob(f"{TMP_UPLOAD_PREFIX}*")):
            try:
                if path.is_file() and dead_writer(path, host, now):
                    info = self._info(str(path.relative_to(self.root)), path)
                    path.unlink()
                    removed.append(info)
            except FileNotFoundError:  # its writer finished (or another cleaner was quicker) meanwhile
                continue
        return removed


class _LocalWriter:
    """Writes to a hidden temporary file; close() links it to the final name, which must not exist yet."""

    def __init__(self, root: Path, final: Path) -> None:
        self.root = root
        self.final = final
        self.tmp = final.parent / tmp_upload_name(final.name)
        self.closed = False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)  # a subfolder of the root, which open_writer checked
            self.handle = open(self.tmp, "wb")
        except OSError as error:
            remove_empty_folders(final.parent, root)
            raise cannot_write(root, final, error) from None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            raise cannot_write(self.root, self.final, error) from None

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            link_into_place(self.tmp, self.final)
        except OSError as error:
            self.abort()  # the end of a write fails too on a full disk (the flush, the fsync)
            raise cannot_write(self.root, self.final, error) from None

    def abort(self) -> None:
        self.closed = True
        try:
            self.handle.close()
        except OSError:  # the flush of what is buffered fails again on a full disk; the file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)
        remove_empty_folders(self.final.parent, self.root)

    def __enter__(self) -> "_LocalWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type else self.close()


class LocalFileUpload:
    """A file copied by several threads at once into one temporary file (each part written at its offset),
    then fsynced, checked against the bytes sent and linked into place."""

    def __init__(self, root: Path, src: Path, final: Path, name: str, part_bytes: int) -> None:
        self.root = root
        self.src = src
        self.final = final
        self.name = name
        self.size = src.stat().st_size
        self.parts = split_into_parts(self.size, part_bytes)
        self.tmp = final.parent / tmp_upload_name(final.name)
        self._fd = -1
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self.size)
        except OSError as error:
            self.abort()
            raise cannot_write(root, final, error) from None

    def send(self, part: Part, on_bytes: OnBytes) -> int:
        crc = 0
        with open(self.src, "rb") as reader:
            reader.seek(part.offset)
            position, left = part.offset, part.length
            while left > 0:
                chunk = reader.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise StorageError(f"{self.src}: changed size during the upload")
                try:
                    os.pwrite(self._fd, chunk, position)  # parts never overlap: no lock needed
                except OSError as error:  # the destination's failure; the source's read errors name the source
                    raise cannot_write(self.root, self.final, error) from None
                crc = google_crc32c.extend(crc, chunk)
                position += len(chunk)
                left -= len(chunk)
                on_bytes(len(chunk))
        return crc

    def finish(self, crcs: list[int]) -> ObjectInfo:
        expected = encode_crc32c(combine_parts(crcs, self.parts))
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            stored = encode_crc32c(crc32c_of_range(self.tmp, 0, self.size))  # what reached the file, read back
            stored_size = self.tmp.stat().st_size
        except OSError as error:
            raise cannot_write(self.root, self.final, error) from None
        if stored_size != self.size or stored != expected:
            self.abort()
            raise StorageError(f"{self.final}: written copy differs from the bytes sent (crc32c {stored} vs "
                               f"{expected}); removed it")
        try:
            link_into_place(self.tmp, self.final)
        except OSError as error:
            raise cannot_write(self.root, self.final, error) from None
        return ObjectInfo(self.name, self.size, expected, None, time.time())

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)
        remove_empty_folders(self.final.parent, self.root)
