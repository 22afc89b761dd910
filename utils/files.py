"""JSON files written whole and files synced to the disk: helpers any module may use."""
import json
import os
from pathlib import Path
from typing import Any

from utils.errors import CheckpointError


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None


def write_json_atomic(path: Path, value: Any) -> None:
    """Writes through a temporary file and a rename, so readers never see half a file. A write that fails (a
    full disk) leaves the file as it was, no temporary file behind, and is one CheckpointError line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({error.strerror or error})") from None


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Files and folders (FSDP writes sharded state in subfolders) reach the disk before the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)
