"""The crc32c of files (hardware-accelerated by google-crc32c: several GB/s), as GCS reports it for an object, and
the checksums.json a checkpoint records of its own files so that a damaged file is refused, never loaded."""
import base64
import json
from collections.abc import Callable
from pathlib import Path

import google_crc32c

CHUNK_BYTES = 8 * 1024 * 1024
CHECKSUMS_FILE = "checksums.json"


class ChecksumError(Exception):
    """A file whose size or crc32c is not the recorded one; the message is one line naming it."""


def crc32c_of_file(path: Path) -> str:
    """Base64 big-endian crc32c of the file's bytes, as GCS reports it for an object."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            checksum.update(chunk)
    return encode(checksum)


def encode(checksum: google_crc32c.Checksum) -> str:
    return base64.b64encode(checksum.digest()).decode("ascii")


def folder_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder (subfolders too: FSDP writes sharded state), but its checksums.json."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != CHECKSUMS_FILE)


def record_checksums(folder: Path) -> dict[str, dict[str, int | str]]:
    """Writes folder/checksums.json: the size and crc32c of every other file, by path relative to the folder."""
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, "crc32c": crc32c_of_file(path)}
             for path in folder_files(folder)}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "crc32c", "files": files}, indent=2) + "\n")
    return files


def verify_checksums(folder: Path, only: Callable[[str], bool] = lambda name: True) -> bool:
    """Checks the files of a checkpoint against its checksums.json (those whose relative path `only` accepts);
    False when the checkpoint records none (saved by an earlier version). A file missing, of another size or
    another crc32c is a ChecksumError naming it."""
    record = folder / CHECKSUMS_FILE
    if not record.is_file():
        return False
    try:
        files = json.loads(record.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["crc32c"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ChecksumError(f"{record}: unreadable ({type(error).__name__}: {error})") from None
    for name, (size, crc) in sorted(expected.items()):
        if not only(name):
            continue
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (the checkpoint recorded it at save time)")
        if path.stat().st_size != size:
            raise ChecksumError(f"{path}: damaged ({path.stat().st_size} bytes, {size} when saved)")
        if crc32c_of_file(path) != crc:
            raise ChecksumError(f"{path}: damaged (crc32c {crc32c_of_file(path)}, {crc} when saved)")
    return True
