"""The crc32c of files (hardware-accelerated by google-crc32c: several GB/s), as GCS reports it for an object, and
the checksums.json a checkpoint records of its own files so that a damaged file is refused, never loaded."""
import json
from collections.abc import Callable
from pathlib import Path

from utils.storage.base import crc32c_of_file

CHECKSUMS_FILE = "checksums.json"


class ChecksumError(Exception):
    """A file whose size or crc32c is not the recorded one; the message is one line naming it."""


def folder_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder (subfolders too: FSDP writes sharded state), but its checksums.json."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != CHECKSUMS_FILE)


def record_checksums(folder: Path) -> dict[str, dict[str, int | str]]:
    """Writes folder/checksums.json: the size and crc32c of every other file, by path relative to the folder."""
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, "crc32c": crc32c_of_file(path)}
             for path in folder_files(folder)}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "crc32c", "files": files}, indent=2) + "\n")
    return files


def recorded_checksums(folder: Path) -> dict[str, tuple[int, str]] | None:
    """The (size, crc32c) checksums.json records of each file, by relative path; None when the checkpoint records
    none (saved by an earlier version)."""
    record = folder / CHECKSUMS_FILE
    if not record.is_file():
        return None
    try:
        files = json.loads(record.read_text())["files"]
        return {name: (int(entry["size"]), str(entry["crc32c"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ChecksumError(f"{record}: unreadable ({type(error).__name__}: {error})") from None


def check_file(path: Path, size: int, crc: str, expected: tuple[int, str] | None) -> None:
    """A ChecksumError naming the file when its size or crc32c differs from the recorded ones (if recorded)."""
    if expected is None:
        return
    if size != expected[0]:
        raise ChecksumError(f"{path}: damaged ({size} bytes, {expected[0]} when saved)")
    if crc != expected[1]:
        raise ChecksumError(f"{path}: damaged (crc32c {crc}, {expected[1]} when saved)")


def verify_checksums(folder: Path, only: Callable[[str], bool] = lambda name: True) -> bool:
    """Checks the files of a checkpoint against its checksums.json (those whose relative path `only` accepts);
    False when the checkpoint records none. A file missing, of another size or another crc32c is a ChecksumError
    naming it."""
    expected = recorded_checksums(folder)
    if expected is None:
        return False
    for name, recorded in sorted(expected.items()):
        if not only(name):
            continue
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (the checkpoint recorded it at save time)")
        size = path.stat().st_size
        check_file(path, size, crc32c_of_file(path) if size == recorded[0] else "", recorded)
    return True
