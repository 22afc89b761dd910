"""The run's logs beside its checkpoints at the upload destination, so that they outlive the machine.

<destination>/logs/ mirrors the run's logs in log_dir (metrics.jsonl and the trackers' files under
log_dir/<project_name>/, such as TensorBoard's events; nothing else a user keeps there): pushed after every
checkpoint's upload and at the end of the run, each changed file replacing its earlier copy (logs
grow; checkpoints, which never change, are never overwritten). A run resumed on a fresh machine, whose log_dir
holds no metrics yet, pulls them back first: it continues the same history, which the monitor and the viewer
read as if the run had never moved.
"""
import logging
import threading
from pathlib import Path

from utils.display import one_line
from utils.errors import UploadError
from utils.storage.base import Storage, StorageError
from utils.uploads.formats import checked_relative

log = logging.getLogger(__name__)
LOGS_FOLDER = "logs"
METRICS_FILE = "metrics.jsonl"


class LogMirror:
    def __init__(self, storage: Storage, log_dir: str | Path, project_name: str) -> None:
        self.storage = storage
        self.log_dir = Path(log_dir)
        self.trackers = self.log_dir / project_name
        self._pushed: dict[str, tuple[int, float]] = {}  # relative path -> (size, mtime) of its last pushed copy
        self._lock = threading.Lock()  # the uploader's workers and the end of the run push

    @property
    def url(self) -> str:
        return f"{self.storage.url.rstrip('/')}/{LOGS_FOLDER}"

    def push(self) -> None:
        """Copies the files of log_dir that changed since the last push; a failure is logged, never raised:
        the checkpoints matter more than their logs, and the next push tries again."""
        with self._lock:
            try:
                for path in self.run_logs():
                    relative = path.relative_to(self.log_dir).as_posix()
                    stat = path.stat()
                    if self._pushed.get(relative) == (stat.st_size, stat.st_mtime):
                        continue
                    self.storage.replace_file(path, f"{LOGS_FOLDER}/{relative}")
                    self._pushed[relative] = (stat.st_size, stat.st_mtime)
            except (OSError, StorageError) as error:
                log.warning(f"⚠️  Could not copy the logs to {self.url} ({one_line(error)}); the next checkpoint "
                            "tries again")

    def run_logs(self) -> list[Path]:
        metrics = self.log_dir / METRICS_FILE
        trackers = sorted(p for p in self.trackers.rglob("*") if p.is_file()) if self.trackers.is_dir() else []
        return ([metrics] if metrics.is_file() else []) + trackers

    def pull(self) -> int:
        """Brings the logs at the destination into an empty log_dir (a fresh machine); returns the files fetched.
        A name that would lead outside log_dir is an UploadError."""
        if (self.log_dir / METRICS_FILE).exists():
            return 0
        try:
            remote = self.storage.list_tree(LOGS_FOLDER)
            # Every name checked before the first download: a listing with one bad name fetches nothing.
            targets = [self.log_dir / checked_relative(info.name[len(LOGS_FOLDER) + 1:], self.url) for info in remote]
            for info, target in zip(remote, targets):
                self.storage.download(info.name, target)
        except (OSError, StorageError) as error:
            raise UploadError(f"the logs at {self.url}: {one_line(error)}") from None
        if remote:
            log.info(f"📜 Continued the logs of this run from {self.url} ({len(remote)} files)")
        return len(remote)
