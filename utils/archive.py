"""The archive format of uploaded checkpoints: one folder streamed as <name>.tar, .tar.zst or .tar.gz.

write_archive streams a checkpoint folder into any writable stream (an upload, or a hashing sink that only
measures), with entries in a fixed order and no owner fields, so the same checkpoint always gives the same
bytes; extract_archive unpacks one into .tmp-<name>/ and renames it when whole.
"""
import base64
import gzip
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import zstandard

from utils.checkpoint_utils import TMP_PREFIX, UploadError, parse_checkpoint_name

ARCHIVE_FORMATS = ("tar.zst", "tar", "tar.gz")
"""tar (no compression, fastest), tar.zst (zstd), tar.gz (the original; gzip is slow on one core)."""
_ZSTD_LEVEL = 1  # level 3 compresses float32 weights no better, at two thirds of the speed
_GZIP_LEVEL = 6
_CHUNK = 4 * 1024 * 1024


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


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:,.1f} TB"
