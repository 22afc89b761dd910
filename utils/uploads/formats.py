"""The formats of uploaded checkpoints: the files layout, or one folder streamed as <name>.tar, .tar.zst or .tar.gz.

"files" (the default): each file of the checkpoint folder is an object <name>/<relative path> of its own,
and <name>.files.json, written last, lists every file's relative path, size and crc32c; its presence means
the checkpoint is complete at the destination. files_manifest and parse_files_manifest write and read it
(the same checkpoint always gives the same bytes).

Archives: write_archive streams a checkpoint folder into any writable stream (an upload, or a hashing sink
that only measures), with entries in a fixed order and no owner fields, so the same checkpoint always gives
the same bytes; unpack_archive unpacks a stream (a download on its way) into a folder, and extract_archive
unpacks a local archive into .tmp-<name>/ and renames it when whole.

Every name read from a destination (a manifest's paths, an archive's entries, the log mirror's listing) is
chosen by whoever can write there (GCS keeps `logs/../../x` as given): it becomes part of a local path only
through checked_relative(), which refuses any that could lead outside its folder.
"""
import base64
import gzip
import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import google_crc32c
import zstandard

from configs.training_config import ARCHIVE_FORMATS, FILES_FORMAT
from utils.checkpoints.folders import TMP_PREFIX, parse_checkpoint_name
from utils.errors import UploadError

TAR_FORMATS = ARCHIVE_FORMATS[1:]
FILES_MANIFEST_SUFFIX = ".files.json"
_ZSTD_LEVEL = 1  # level 3 compresses float32 weights no better, at two thirds of the speed
_GZIP_LEVEL = 6
_CHUNK = 4 * 1024 * 1024


Include = Callable[[str], bool]
"""Which files of a checkpoint (by relative path) to restore."""


def all_files(relative_path: str) -> bool:
    return True


def archive_name(checkpoint: str, archive_format: str) -> str:
    """The object that stands for a checkpoint at the destination: its archive, or its files manifest."""
    if archive_format == FILES_FORMAT:
        return checkpoint + FILES_MANIFEST_SUFFIX
    return f"{checkpoint}.{archive_format}"


def split_archive_name(object_name: str) -> tuple[str, str] | None:
    """(checkpoint name, format) for a remote object name like checkpoint-...-files0.tar.zst or
    checkpoint-...-files0.files.json."""
    for archive_format in ARCHIVE_FORMATS:
        suffix = FILES_MANIFEST_SUFFIX if archive_format == FILES_FORMAT else "." + archive_format
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
    _check_tar_format(archive_format)
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


def _check_tar_format(archive_format: str) -> None:
    if archive_format not in TAR_FORMATS:
        raise UploadError(f"{archive_format!r} is not an archive format ({', '.join(TAR_FORMATS)})")


def _members_inside(tar: tarfile.TarFile, name: str, archive: str, include: Include) -> Iterator[tarfile.TarInfo]:
    """The entries to unpack, each a file or folder whose name is a relative path inside <name>/. extractall's
    filter="data" alone keeps every entry inside the unpacking folder (it strips a leading "/", and refuses
    names and links that lead outside that folder, and device files), but would let <name>/../other/x or a
    link to ../other put files beside <name>/; a checkpoint holds neither links nor "..", so both are refused."""
    for member in tar:
        checked_relative(member.name, archive)
        if member.name != name and not member.name.startswith(name + "/"):
            raise UploadError(f"{archive}: entry {member.name!r} is outside {name}/")
        if not (member.isfile() or member.isdir()):
            raise UploadError(f"{archive}: entry {member.name!r} is a link or a special file, not a checkpoint's "
                              "file or folder")
        if member.isdir() or member.name == name or include(member.name[len(name) + 1:]):
            yield member


def unpack_archive(stream: BinaryIO, archive_format: str, dest: Path, name: str, where: str,
                   include: Include = all_files) -> Path:
    """Unpacks the archive of checkpoint `name` read from `stream` (a file, or a download on its way) into
    dest/<name>, only the files `include` accepts; returns dest/<name>. `where` names the archive in errors.
    The caller removes `dest` when this fails."""
    _check_tar_format(archive_format)
    source: Any = stream
    if archive_format == "tar.zst":
        source = zstandard.ZstdDecompressor().stream_reader(stream, closefd=False)
    elif archive_format == "tar.gz":
        source = gzip.GzipFile(fileobj=stream, mode="rb")
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            # extractall sets the folders' mtimes last, so unpacking restores the archived tree exactly.
            tar.extractall(dest, members=_members_inside(tar, name, where, include), filter="data")
    except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError) as error:
        raise UploadError(f"{where}: not a readable {archive_format} archive ({error})") from None
    if not (dest / name).is_dir():
        raise UploadError(f"{where}: holds no {name}/ folder")
    return dest / name


def extract_archive(archive: Path, archive_format: str, dest_dir: Path, name: str,
                    include: Include = all_files) -> Path:
    """Unpacks the archive of checkpoint `name` into dest_dir/.tmp-<name>, then renames it to dest_dir/<name>."""
    tmp, final = dest_dir / f"{TMP_PREFIX}{name}", dest_dir / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with open(archive, "rb") as raw:
            unpacked = unpack_archive(raw, archive_format, tmp, name, archive.name, include)
    except UploadError:
        shutil.rmtree(tmp)
        raise
    unpacked.rename(final)
    tmp.rmdir()
    return final


# --- the files layout ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint in the files layout."""

    path: str
    """Relative to the checkpoint folder, with "/" separators."""
    size: int
    crc32c: str


def checkpoint_files(folder: Path) -> list[str]:
    """The relative paths of a checkpoint folder's files, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def files_manifest(name: str, entries: list[FileEntry]) -> bytes:
    """<name>.files.json: the same entries always give the same bytes, so an identical manifest already at
    the destination is recognised by its size and crc32c."""
    files = [{"path": entry.path, "size": entry.size, "crc32c": entry.crc32c}
             for entry in sorted(entries, key=lambda entry: entry.path)]
    return (json.dumps({"checkpoint": name, "format": 1, "files": files}, indent=1, sort_keys=True) + "\n").encode()


def checked_relative(name: object, where: str) -> str:
    """`name`, read from the destination at `where`, for joining onto a local folder: refused in one line unless
    it is a relative path below that folder (not absolute, no ".." part, not the folder itself; no backslash,
    which a Windows tool takes for a separator). Downloads and unpacking create no links, so such a name also
    resolves inside the folder."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    if path is None or not path.parts or path.is_absolute() or ".." in path.parts or "\\" in str(name):
        raise UploadError(f"{where}: refusing {name!r}: a remote name must be a relative path inside its folder, "
                          "without '..'")
    return str(name)


def parse_files_manifest(data: bytes, name: str, where: str) -> list[FileEntry]:
    """The entries of a files manifest, checked: the right checkpoint, relative paths inside it, sizes, crc32c."""
    try:
        manifest = json.loads(data)
        if manifest.get("checkpoint") != name or manifest.get("format") != 1:
            raise ValueError(f"it describes {manifest.get('checkpoint')!r} (format {manifest.get('format')!r}), "
                             f"not {name!r} (format 1)")
        entries = [FileEntry(item["path"], item["size"], item["crc32c"]) for item in manifest["files"]]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UploadError(f"{where}: not a checkpoint files manifest ({error})") from None
    for entry in entries:
        checked_relative(entry.path, where)
        if not isinstance(entry.size, int) or entry.size < 0 or not isinstance(entry.crc32c, str):
            raise UploadError(f"{where}: bad entry {entry.path!r} (size {entry.size!r}, crc32c {entry.crc32c!r})")
    return entries
