"""<checkpoint_dir>/uploads.json: the upload state of every checkpoint of a folder.

A record per checkpoint: local, queued, uploading, uploaded (with the remote URL, size and crc32c the
stored object was verified against) or failed (with the error and attempt count). A training run and
scripts/upload_manager.py may update it at the same time: each update is a read-modify-write under a file
lock, and each write is atomic (temporary file, then rename), so a reader always sees a whole file.
"""
import fcntl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils.checkpoints.folders import parse_checkpoint_name, prune_checkpoints
from utils.errors import CheckpointError, UploadError
from utils.files import read_json, write_json_atomic

MANIFEST_NAME = "uploads.json"
STATES = ("local", "queued", "uploading", "uploaded", "failed")


@dataclass
class UploadRecord:
    state: str = "local"
    remote_url: str | None = None
    size: int | None = None
    crc32c: str | None = None
    error: str | None = None
    attempts: int = 0
    updated: str = ""


class UploadManifest:
    """uploads.json, read and written under a file lock, so that a training run and upload_manager
    can update it at the same time; each write is atomic (temporary file, then rename)."""

    def __init__(self, checkpoint_dir: str | Path, destination: str) -> None:
        self.path = Path(checkpoint_dir) / MANIFEST_NAME
        self.destination = destination

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(MANIFEST_NAME + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_unlocked(self) -> dict[str, UploadRecord]:
        if not self.path.exists():
            return {}
        try:
            entries = read_json(self.path)["checkpoints"]
            records = {name: UploadRecord(**values) for name, values in entries.items()}
        except (KeyError, TypeError, AttributeError) as error:
            raise UploadError(f"{self.path}: not an upload manifest ({error})") from None
        for name, record in records.items():
            if record.state not in STATES:
                raise UploadError(f"{self.path}: {name} has the unknown state {record.state!r}")
        return records

    def read(self) -> dict[str, UploadRecord]:
        """The records as they are now; no lock needed, as every write is an atomic rename."""
        return self._read_unlocked()

    def update(self, name: str, **changes: Any) -> UploadRecord:
        with self._locked():
            records = self._read_unlocked()
            record = records.get(name, UploadRecord())
            for key, value in changes.items():
                setattr(record, key, value)
            record.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
            records[name] = record
            write_json_atomic(self.path, {"destination": self.destination,
                                          "checkpoints": {n: asdict(r) for n, r in sorted(records.items())}})
            return record


@dataclass(frozen=True)
class ManifestSnapshot:
    """uploads.json as the viewer and the monitor show it: read once, without the lock (writes are atomic
    renames), and never an error: a file that cannot be read says why in `problem`."""

    destination: str | None
    checkpoints: dict[str, dict[str, Any]]
    problem: str | None = None
    """Why the file could not be read; every state then shows as unknown."""

    def names_in(self, *states: str) -> list[str]:
        return [name for name, entry in self.checkpoints.items()
                if isinstance(entry, dict) and entry.get("state") in states]


def read_snapshot(checkpoint_dir: Path) -> ManifestSnapshot | None:
    """The upload state, or None when nothing was ever uploaded from this folder (no uploads.json)."""
    path = checkpoint_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints", {}), dict):
            raise CheckpointError(f"{path}: not an upload manifest")
    except CheckpointError as error:
        return ManifestSnapshot(None, {}, str(error))
    return ManifestSnapshot(data.get("destination"), data.get("checkpoints", {}))


def by_step(names: Iterable[str]) -> list[str]:
    """Checkpoint names, oldest step first."""
    return sorted(names, key=lambda name: ((parse_checkpoint_name(name) or (0, 0, 0))[1], name))


def upload_label(manifest: ManifestSnapshot | None, name: str, detailed: bool = False) -> str:
    """One checkpoint's upload state in words: "uploaded", "failed (...)", "n/a" when nothing records it."""
    if manifest is None:
        return "n/a"
    if manifest.problem:
        return f"unknown ({manifest.problem})" if detailed else "unknown"
    entry = manifest.checkpoints.get(name)
    if not isinstance(entry, dict):
        return "not recorded"
    label = str(entry.get("state", "unknown"))
    if detailed:
        if label == "failed" and entry.get("error"):
            label += f" ({entry['error']})"
        if entry.get("remote_url"):
            label += f" -> {entry['remote_url']}"
        if entry.get("attempts"):
            label += f", {entry['attempts']} attempt(s)"
        if entry.get("updated"):
            label += f", updated {entry['updated']}"
    return label


def prune_without_uploads(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Retention for a run with no upload_destination: a checkpoint that an earlier run left unuploaded
    (recorded in uploads.json, not verified) may be the only copy upload_manager is still to upload: kept."""
    records = UploadManifest(checkpoint_dir, "").read()
    return prune_checkpoints(checkpoint_dir, keep,
                             lambda info: info.name not in records or records[info.name].state == "uploaded")
