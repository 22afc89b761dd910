"""Training shards streamed from object storage (gs://...) through a local disk cache.

`open_shard_source(config)` picks the source: a local folder is read in place (LocalShardSource); a
gs:// URL gets a CachedShardSource, which the BatchLoader drives through the ShardSource protocol:

- prefetch(upcoming): a background thread downloads the next shards into the cache while the current
  one trains. Each download is verified (size, crc32c) and renamed into place only when whole.
- fetch(name): the complete local copy, downloading it now if the prefetcher has not got to it yet.
- release(name): the shard is consumed; when the cache is over its size limit, consumed shards (and
  leftovers of earlier runs) are deleted, oldest first.

Several processes on one machine share the cache folder and download each shard once: a download
happens under an exclusive lock on .locks/NAME.download, and whoever comes second finds the complete
file. A reader holds a shared lock on .locks/NAME.read from fetch to release, and eviction needs that
lock exclusively, so no process evicts a shard another one is still reading. (Two lock files, so that
a reader never delays a download: processes wait for each other at every step.) The cache must be on
a local disk: the locks are flock(2).

A shard that cannot be downloaded once the storage client's retries are exhausted (or is gone, or does not
fit on the local disk) raises a ShardUnavailableError naming it, which stops training: skip_bad_shards
skips only shards whose content is bad, never data that could not be fetched.
"""
import fcntl
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import IO

from configs.training_config import TrainingConfig
from utils.data.shards import TOKENIZER_FILE, LocalShardSource, ShardSource
from utils.errors import DataError, ShardUnavailableError
from utils.storage import GCS_SCHEME, is_gcs_url, open_storage
from utils.storage.base import ObjectInfo, Storage, StorageError

log = logging.getLogger(__name__)


def open_shard_source(config: TrainingConfig) -> ShardSource:
    """A local folder as is, or a gs:// URL through the cache in config.cache_dir."""
    if not is_gcs_url(config.data):
        return LocalShardSource(config.data, config.shard_pattern)
    try:
        storage = open_storage(config.data, config.gcs_credentials)
    except StorageError as error:
        raise DataError(str(error)) from None
    return CachedShardSource(storage, config.shard_pattern, cache_folder(config.cache_dir, storage.url),
                             int(config.cache_max_gb * 1e9))


def cache_folder(cache_dir: str | Path, url: str) -> Path:
    """cache_dir/BUCKET/PREFIX: two buckets (or prefixes) never share cache files."""
    return Path(cache_dir) / url[len(GCS_SCHEME):].strip("/")


class CachedShardSource:
    """A ShardSource over any Storage, with a background prefetcher and a size-limited local cache."""

    def __init__(self, storage: Storage, pattern: str, folder: Path, max_bytes: int) -> None:
        self.storage = storage
        self.pattern = pattern
        self.folder = folder
        self.max_bytes = max_bytes
        self.description = f"{storage.url}/{pattern} via {storage.auth}, cached in {folder}"
        self.downloaded: list[str] = []
        """Shards this process downloaded, in order (the others came from the cache)."""
        self._started = time.time()
        self._infos: dict[str, ObjectInfo] = {}
        self._in_use: set[str] = set()  # from fetch() to release(): never evicted by this process
        self._held: dict[str, IO[bytes]] = {}  # shared locks of shards being read, name -> lock file
        self._released: list[str] = []  # consumed shards, oldest first: the first to evict
        self._wanted: list[str] = []  # the latest hint: shards to download, in order
        self._protected: set[str] = set()  # never evicted: the latest two hints (the previous one holds the
        # shard the loader fetches next, which may be a consumed shard of the last epoch)
        self._state = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True)
        self._thread.start()

    # -- ShardSource ---------------------------------------------------------------------------

    not_shards: list[str] = []  # a bucket has objects, no folders

    def list_shards(self) -> list[str]:
        try:
            infos = self.storage.list(self.pattern)
        except StorageError as error:
            raise DataError(str(error)) from None
        if not infos:
            raise DataError(f"{self.storage.url}: no shards matching {self.pattern!r}")
        self._infos = {info.name: info for info in infos}
        return [info.name for info in infos]

    def size_of(self, names: list[str]) -> int:
        """The bytes of these listed shards."""
        return sum(self._infos[name].size for name in names)

    def fetch(self, name: str) -> Path:
        """The complete cached copy, held (shared lock) until release(name)."""
        with self._state:
            self._in_use.add(name)
            if name in self._released:  # read again (a new epoch)
                self._released.remove(name)
        while True:
            self._ensure(name)
            lock = self._lock_file(name, "read")
            fcntl.flock(lock, fcntl.LOCK_SH)
            if self._is_complete(name):
                with self._state:
                    self._held[name] = lock
                return self.folder / name
            lock.close()  # evicted between download and lock: download again

    def tokenizer(self) -> Path | None:
        """tokenizer.json beside the shards in the bucket, downloaded (verified) into the cache; None without one."""
        try:
            info = self.storage.stat(TOKENIZER_FILE)
            if info is None:
                return None
            path = self.folder / TOKENIZER_FILE
            if not path.is_file() or path.stat().st_size != info.size:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.storage.download(TOKENIZER_FILE, path)
        except StorageError as error:
            raise DataError(f"the tokenizer beside the shards: {error}") from None
        return path

    def prefetch(self, upcoming: list[str]) -> None:
        with self._state:
            self._protected = set(self._wanted) | set(upcoming)
            self._wanted = list(upcoming)
            self._state.notify_all()

    def release(self, name: str) -> None:
        with self._state:
            lock = self._held.pop(name, None)
            self._in_use.discard(name)
            if name in self._released:
                self._released.remove(name)
            self._released.append(name)
            self._state.notify_all()
        if lock is not None:
            lock.close()
        self._make_room(0)

    def close(self) -> None:
        """Stops the prefetcher after its current download (the process may also just exit)."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._thread.join()
        for lock in self._held.values():
            lock.close()
        self._held.clear()

    # -- cache ---------------------------------------------------------------------------------

    def _info(self, name: str) -> ObjectInfo:
        info = self._infos.get(name)
        if info is None:
            try:
                info = self.storage.stat(name)
            except StorageError as error:
                raise ShardUnavailableError(str(error)) from None
            if info is None:
                raise ShardUnavailableError(f"{self.storage.url}/{name}: shard not found")
            self._infos[name] = info
        return info

    def _is_complete(self, name: str) -> bool:
        """A cache file exists only once verified (renamed into place), so its size is enough."""
        try:
            return (self.folder / name).stat().st_size == self._info(name).size
        except FileNotFoundError:
            return False

    def _lock_file(self, name: str, kind: str) -> IO[bytes]:
        # The cache folder appears with the first shard fetched: a bucket that turns out not to exist (the
        # listing fails) leaves no folder behind.
        (self.folder / ".locks").mkdir(parents=True, exist_ok=True)
        return open(self.folder / ".locks" / f"{name}.{kind}", "a+b")

    def _ensure(self, name: str) -> None:
        """Downloads the shard unless it is cached; one process at a time per shard."""
        if self._is_complete(name):
            return
        with self._lock_file(name, "download") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._is_complete(name):  # another process (or our other thread) got it meanwhile
                return
            started = time.perf_counter()
            try:
                info = self.storage.download(name, self.folder / name)
            except StorageError as error:  # the storage layer reports a full local disk here too
                raise ShardUnavailableError(str(error)) from None
            self._infos[name] = info  # the object may have been replaced since the listing
            self.downloaded.append(name)
            seconds = time.perf_counter() - started
            log.debug("downloaded %s: %.1f MB in %.2f s", name, info.size / 1e6, seconds)

    def _cached_files(self) -> list[tuple[str, int, float]]:
        """(name, size, mtime) of each complete file in the cache."""
        files = []
        if not self.folder.is_dir():  # nothing fetched yet
            return files
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tmp") or entry.name.startswith("."):
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                files.append((entry.name, info.st_size, info.st_mtime))
        return files

    def _eviction_candidates(self) -> list[str]:
        """Consumed shards, oldest first, then files left by earlier runs that nobody has asked for."""
        with self._state:
            keep = self._in_use | self._protected
            released = [name for name in self._released if name not in keep]  # wanted again: next epoch
            keep |= set(released)
        leftovers = sorted((mtime, name) for name, _, mtime in self._cached_files()
                           if name not in keep and mtime < self._started)
        return released + [name for _, name in leftovers]

    def _make_room(self, needed: int) -> bool:
        """Evicts until `needed` more bytes fit under the limit; False when they cannot."""
        used = sum(size for _, size, _ in self._cached_files())
        for name in self._eviction_candidates():
            if used + needed <= self.max_bytes:
                break
            with self._lock_file(name, "read") as lock:
                try:  # a process still reading it holds a shared lock: leave it
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                with self._state:  # fetched or hinted since the candidates were listed
                    if name in self._in_use or name in self._protected:
                        continue
                path = self.folder / name
                if path.exists():
                    used -= path.stat().st_size
                    path.unlink()
                    log.debug("evicted %s", name)
            with self._state:
                if name in self._released:
                    self._released.remove(name)
        return used + needed <= self.max_bytes

    # -- prefetch thread -------------------------------------------------------------------------

    def _next_wanted(self) -> str | None:
        for name in self._wanted:
            if not self._is_complete(name):
                return name
        return None

    def _prefetch_loop(self) -> None:
        while True:
            with self._state:
                while not self._closed and (name := self._next_wanted()) is None:
                    self._state.wait()
                if self._closed:
                    return
            try:
                if not self._make_room(self._info(name).size):
                    # Full of shards still in use: wait for a release (or a new hint) and look again.
                    with self._state:
                        self._state.wait(timeout=5)
                    continue
                self._ensure(name)
            except DataError as error:
                # fetch() will try once more and report it; don't spin on it here.
                log.warning("prefetch of %s failed: %s", name, error)
                with self._state:
                    if name in self._wanted:
                        self._wanted.remove(name)
