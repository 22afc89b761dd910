"""One small object-storage interface with two backends: a local folder and gs://bucket/prefix.

    storage = open_storage("gs://refocused-ai")            # or open_storage("/data/shards")
    for info in storage.list("tokenized_*.npz"): ...
    storage.download("tokenized_000.npz", Path("cache/tokenized_000.npz"))
    storage.upload_file(Path("ckpt.tar"), "Checkpoints/ckpt.tar")

Names are relative to the storage's prefix (they may contain "/"; `list` only sees objects directly
under the prefix). Every transfer is verified: a download lands in `dest.tmp`, is checked against the
object's size and crc32c, and only then renamed to `dest`, so a half-downloaded file is never visible
under its final name. Uploads never overwrite (if_generation_match=0) and are checked the same way.

GCS credentials, in order: a service-account key file passed as `credentials`; Application Default
Credentials; anonymous access (enough for public buckets). A GOOGLE_APPLICATION_CREDENTIALS naming a
missing or unusable file is an error, never anonymous access. With STORAGE_EMULATOR_HOST set the client
talks to that emulator, anonymously. `storage.auth` says which one is used.

Transient errors (timeouts, 429/5xx, refused or reset connections) are retried with exponential backoff
for `retry_deadline_s` (env GCS_RETRY_DEADLINE_S, default 120 s); each request waits at most `timeout_s`
(env GCS_TIMEOUT_S, default 60 s). Tests set both low so that a stopped emulator fails fast.
"""
import base64
import fnmatch
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import google.auth
import google_crc32c
import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage.exceptions import InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

GCS_SCHEME = "gs://"
CHUNK_BYTES = 8 * 1024 * 1024
UPLOAD_CHUNK_BYTES = 32 * 1024 * 1024
"""Resumable-upload chunk (a multiple of 256 KiB): one request per chunk, held in memory while sent."""
DOWNLOAD_ATTEMPTS = 3
"""Whole-object attempts when a download arrives complete but with the wrong size or crc32c."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    """Name relative to the storage's prefix."""
    size: int
    crc32c: str | None
    """Base64 big-endian crc32c, as GCS reports it; None where the backend does not know it (local list/stat)."""
    generation: int | None
    """GCS object generation; None for local files."""


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the object or bucket."""


class NotFoundError(StorageError):
    """The object, bucket or folder does not exist."""


class PreconditionFailedError(StorageError):
    """The upload would overwrite an existing object."""


class Storage(Protocol):
    url: str
    """"gs://bucket/prefix" or an absolute local folder."""
    auth: str
    """How the backend authenticates, for the run's log ("local folder", "anonymous access", ...)."""

    def list(self, pattern: str = "*") -> list[ObjectInfo]: ...
    def stat(self, name: str) -> ObjectInfo | None: ...
    def exists(self, name: str) -> bool: ...
    def download(self, name: str, dest: Path) -> ObjectInfo: ...
    def upload_file(self, src: Path, name: str) -> ObjectInfo: ...
    def open_writer(self, name: str) -> BinaryIO: ...
    def delete(self, name: str) -> None: ...


def is_gcs_url(location: str) -> bool:
    return location.startswith(GCS_SCHEME)


def open_storage(url: str, credentials: str | None = None, *, timeout_s: float | None = None,
                 retry_deadline_s: float | None = None) -> "LocalStorage | GCSStorage":
    """The backend for a local path or gs://bucket/prefix. Creates no bucket and no folder."""
    if not is_gcs_url(url):
        return LocalStorage(url)
    bucket, _, prefix = url[len(GCS_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket name (expected gs://BUCKET or gs://BUCKET/PREFIX)")
    client, auth = make_client(credentials)
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("GCS_TIMEOUT_S", "60"))
    deadline = retry_deadline_s if retry_deadline_s is not None else float(os.environ.get("GCS_RETRY_DEADLINE_S", "120"))
    return GCSStorage(client, bucket, prefix.strip("/"), auth, timeout, deadline)


def crc32c_of_file(path: Path) -> str:
    """Base64 crc32c of the file's bytes, as GCS reports it for an object."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            checksum.update(chunk)
    return _encode(checksum)


def _encode(checksum: google_crc32c.Checksum) -> str:
    return base64.b64encode(checksum.digest()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Local folder
# ---------------------------------------------------------------------------------------------

class LocalStorage:
    """A folder on a local or mounted filesystem; writes go through a temporary file and a hard link."""

    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder).resolve()
        self.url = str(self.root)
        self.auth = "local folder"
        self._root_device: int | None = None  # the filesystem of root at the first write; later writes need the same

    def _path(self, name: str) -> Path:
        return self.root / name

    def _info(self, name: str, path: Path) -> ObjectInfo:
        return ObjectInfo(name, path.stat().st_size, None, None)

    def list(self, pattern: str = "*") -> list[ObjectInfo]:
        if not self.root.is_dir():
            raise NotFoundError(f"{self.root}: folder does not exist")
        return [self._info(p.name, p) for p in sorted(self.root.iterdir())
                if p.is_file() and fnmatch.fnmatchcase(p.name, pattern)]

    def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        return self._info(name, path) if path.is_file() else None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def download(self, name: str, dest: Path) -> ObjectInfo:
        source = self._path(name)
        if not source.is_file():
            raise NotFoundError(f"{source}: no such file")
        tmp = _tmp_path(dest)
        shutil.copyfile(source, tmp)
        info = ObjectInfo(name, source.stat().st_size, crc32c_of_file(source), None)
        _verify(tmp, info, str(source))
        os.replace(tmp, dest)
        return info

    def upload_file(self, src: Path, name: str) -> ObjectInfo:
        with self.open_writer(name) as writer, open(src, "rb") as reader:
            shutil.copyfileobj(reader, writer, CHUNK_BYTES)
        return ObjectInfo(name, Path(src).stat().st_size, crc32c_of_file(src), None)

    def open_writer(self, name: str) -> BinaryIO:
        self._check_root()
        return _LocalWriter(self._path(name))  # type: ignore[return-value]

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

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            raise NotFoundError(f"{self._path(name)}: no such file") from None


class _LocalWriter:
    """Writes to a hidden temporary file; close() links it to the final name, which must not exist yet."""

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)  # a subfolder of the root, which open_writer checked
        self.tmp = final.parent / f".tmp-upload-{os.getpid()}-{final.name}"
        self.handle = open(self.tmp, "wb")
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.handle.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        try:
            os.link(self.tmp, self.final)  # fails if the name exists: never overwrites, like GCS's precondition
        except FileExistsError:
            raise PreconditionFailedError(f"{self.final}: already exists; not overwriting") from None
        finally:
            self.tmp.unlink()
        # The new name must reach the disk too: the local checkpoint may be deleted once this is verified.
        folder = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def abort(self) -> None:
        self.closed = True
        self.handle.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "_LocalWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type else self.close()


# ---------------------------------------------------------------------------------------------
# Google Cloud Storage
# ---------------------------------------------------------------------------------------------

def make_client(credentials: str | None) -> tuple[gcs.Client, str]:
    """A client and a description of how it authenticates."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return gcs.Client(), f"emulator at {emulator} (anonymous)"
    if credentials:
        if not Path(credentials).is_file():
            raise StorageError(f"{credentials}: credentials file does not exist")
        try:
            return gcs.Client.from_service_account_json(credentials), f"service-account key {credentials}"
        except (ValueError, KeyError, auth_exceptions.GoogleAuthError) as error:
            raise StorageError(f"{credentials}: not a usable service-account key ({error})") from None
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        found, project = _default_from_key_file(key_file)
    else:
        try:
            found, project = google.auth.default()
        except auth_exceptions.DefaultCredentialsError:
            # No ADC on this machine: public buckets can still be read.
            return gcs.Client.create_anonymous_client(), "anonymous access (no credentials found)"
    # Reading and writing objects needs no project; "<none>" keeps the client from insisting on one.
    return gcs.Client(credentials=found, project=project or "<none>"), "Application Default Credentials"


def _default_from_key_file(key_file: str) -> tuple[Any, str | None]:
    """Application Default Credentials from GOOGLE_APPLICATION_CREDENTIALS, which must be usable: google.auth
    reports a broken key file like no credentials at all, and falling back to anonymous access would turn a
    typo into a run whose every upload is refused hours later."""
    if not Path(key_file).is_file():
        raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS={key_file}: credentials file does not exist")
    try:
        return google.auth.default()
    except (auth_exceptions.DefaultCredentialsError, OSError, ValueError) as error:
        message = " ".join(str(error).split())[:300]
        raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS={key_file}: not usable credentials ({message})") from None


class GCSStorage:
    """gs://bucket/prefix through google-cloud-storage, with bounded timeouts and retries."""

    def __init__(self, client: gcs.Client, bucket: str, prefix: str, auth: str, timeout_s: float,
                 retry_deadline_s: float) -> None:
        self.client = client
        self.bucket = client.bucket(bucket)
        self.prefix = prefix
        self.url = f"{GCS_SCHEME}{bucket}" + (f"/{prefix}" if prefix else "")
        self.auth = auth
        self.timeout = timeout_s
        self.retry_deadline = retry_deadline_s
        self.retry = DEFAULT_RETRY.with_deadline(retry_deadline_s).with_delay(initial=0.25, maximum=8.0)

    def _blob_name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _info(self, blob: gcs.Blob) -> ObjectInfo:
        name = blob.name[len(self.prefix) + 1:] if self.prefix else blob.name
        return ObjectInfo(name, int(blob.size or 0), blob.crc32c, blob.generation)

    def _error(self, error: Exception, what: str) -> StorageError:
        """One-line StorageError for a failed call on `what`."""
        if isinstance(error, api_exceptions.NotFound):
            return NotFoundError(f"{what}: not found")
        if isinstance(error, api_exceptions.PreconditionFailed):
            return PreconditionFailedError(f"{what}: already exists; not overwriting")
        # A resumable upload that is refused raises the transfer library's InvalidResponse, not Forbidden.
        refused = isinstance(error, InvalidResponse) and getattr(error.response, "status_code", None) in (401, 403)
        if refused or isinstance(error, (api_exceptions.Forbidden, api_exceptions.Unauthorized)):
            return StorageError(f"{what}: permission denied ({self.auth}); pass --gcs-credentials KEY.json "
                                "or run `gcloud auth application-default login`")
        if isinstance(error, api_exceptions.RetryError):
            error = error.cause or error
            what = f"{what}: still failing after {self.retry_deadline:.0f} s of retries"
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        return StorageError(f"{what}: {type(error).__name__}: {message.splitlines()[0][:300]}")

    def list(self, pattern: str = "*") -> list[ObjectInfo]:
        try:
            blobs = self.client.list_blobs(self.bucket, prefix=f"{self.prefix}/" if self.prefix else None,
                                           delimiter="/", retry=self.retry, timeout=self.timeout)
            infos = [self._info(blob) for blob in blobs]
        except Exception as error:
            if isinstance(error, api_exceptions.NotFound):
                raise NotFoundError(f"gs://{self.bucket.name}: bucket does not exist") from None
            raise self._error(error, self.url) from None
        return sorted((i for i in infos if fnmatch.fnmatchcase(i.name, pattern)), key=lambda i: i.name)

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            blob = self.bucket.get_blob(self._blob_name(name), retry=self.retry, timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None
        return self._info(blob) if blob is not None else None

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def _url(self, name: str) -> str:
        return f"{GCS_SCHEME}{self.bucket.name}/{self._blob_name(name)}"

    def download(self, name: str, dest: Path) -> ObjectInfo:
        info = self.stat(name)
        if info is None:
            raise NotFoundError(f"{self._url(name)}: not found")
        # Pinned to the generation just stat'ed: a concurrent overwrite cannot mix two versions.
        blob = self.bucket.blob(self._blob_name(name), generation=info.generation)
        tmp = _tmp_path(dest)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                with open(tmp, "wb") as handle:
                    # checksum=None: we check size and crc32c ourselves below, against the listing.
                    blob.download_to_file(handle, raw_download=True, checksum=None, retry=self.retry,
                                          timeout=self.timeout)
                _verify(tmp, info, self._url(name))
                os.replace(tmp, dest)
                return info
            except StorageError:
                if attempt == DOWNLOAD_ATTEMPTS:
                    tmp.unlink(missing_ok=True)
                    raise
            except Exception as error:  # the client already retried transient errors for retry_deadline
                tmp.unlink(missing_ok=True)
                raise self._error(error, self._url(name)) from None
            time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def upload_file(self, src: Path, name: str) -> ObjectInfo:
        # Through the writer, so that every upload is resumable (the client would send small files as
        # multipart) and verified the same way.
        with self.open_writer(name) as writer, open(src, "rb") as reader:
            shutil.copyfileobj(reader, writer, UPLOAD_CHUNK_BYTES)
        assert writer.info is not None
        return writer.info

    def _check_uploaded(self, blob: gcs.Blob, name: str, size: int, crc: str) -> ObjectInfo:
        if blob.size is None or blob.crc32c is None:
            blob.reload(retry=self.retry, timeout=self.timeout)
        info = self._info(blob)
        if info.size != size or info.crc32c != crc:
            # Never leave a corrupt copy behind under the final name; delete exactly what we wrote.
            self.bucket.delete_blob(blob.name, if_generation_match=info.generation, retry=self.retry,
                                    timeout=self.timeout)
            raise StorageError(f"{self._url(name)}: uploaded copy differs (size {info.size} vs {size}, "
                               f"crc32c {info.crc32c} vs {crc}); deleted it")
        return info

    def open_writer(self, name: str) -> BinaryIO:
        # GCS itself refuses the finished upload when the object exists (if_generation_match=0); checking
        # first fails before sending gigabytes, and also on emulators that ignore the precondition.
        if self.exists(name):
            raise PreconditionFailedError(f"{self._url(name)}: already exists; not overwriting")
        return _GCSWriter(self, name)  # type: ignore[return-value]

    def delete(self, name: str) -> None:
        try:
            self.bucket.delete_blob(self._blob_name(name), retry=self.retry, timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None


class _GCSWriter:
    """A resumable upload fed by write(); close() finishes and verifies it, an exception abandons it."""

    def __init__(self, storage: GCSStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.blob = storage.bucket.blob(storage._blob_name(name), chunk_size=UPLOAD_CHUNK_BYTES)
        self.checksum = google_crc32c.Checksum()
        self.size = 0
        self.closed = False
        self.info: ObjectInfo | None = None
        try:
            self.writer = self.blob.open("wb", ignore_flush=True, if_generation_match=0,
                                         retry=storage.retry, timeout=storage.timeout)
        except Exception as error:
            raise storage._error(error, storage._url(name)) from None

    def write(self, data: bytes) -> int:
        try:
            written = self.writer.write(data)
        except Exception as error:
            raise self.storage._error(error, self.storage._url(self.name)) from None
        self.checksum.update(bytes(data))
        self.size += len(data)
        return written

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass  # data is sent in whole chunks; close() sends the rest

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.writer.close()
        except Exception as error:
            raise self.storage._error(error, self.storage._url(self.name)) from None
        self.info = self.storage._check_uploaded(self.blob, self.name, self.size, _encode(self.checksum))

    def abort(self) -> None:
        # An unfinished resumable session creates no object; GCS discards it after a week.
        self.closed = True

    def __enter__(self) -> "_GCSWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type else self.close()


# ---------------------------------------------------------------------------------------------

def _tmp_path(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(dest.name + ".tmp")


def _verify(path: Path, info: ObjectInfo, what: str) -> None:
    size = path.stat().st_size
    if size != info.size:
        raise StorageError(f"{what}: downloaded {size} bytes, expected {info.size}")
    if info.crc32c is not None and crc32c_of_file(path) != info.crc32c:
        raise StorageError(f"{what}: crc32c mismatch after download")
