"""The Google Cloud Storage backend (utils/storage/, its interface in base.py): gs://bucket/prefix through
google-cloud-storage.

Listing, lookups, downloads (checked by the library itself, checksum="crc32c", while the bytes arrive),
deletes and composes; uploads are in utils/storage/gcs_upload.py. Part objects (.parts/...) that killed
uploads left are deleted by remove_leftovers(): at once where their file's object is composed, else after a day.
"""
from __future__ import annotations  # a method named `list` must not hide the builtin in annotations

import fnmatch
import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import google.auth
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY
from requests.adapters import HTTPAdapter

from utils.display import shorten_middle
from utils.storage import GCS_SCHEME
from utils.storage.base import (
    CHUNK_BYTES,
    PART_BYTES,
    NotFoundError,
    ObjectInfo,
    OnBytes,
    PreconditionFailedError,
    StorageError,
)
from utils.storage.gcs_upload import PARTS_FOLDER, GCSFileUpload, GCSWriter, part_target

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3
"""Whole-object attempts when a download arrives complete but fails the library's crc32c check."""
LEFTOVER_PART_AGE_S = 24 * 3600.0
POOL_CONNECTIONS = 64
"""HTTP connections kept per host: more than any number of concurrent streams a run uses."""


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
        raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS={key_file}: not usable credentials "
                           f"({shorten_middle(str(error))})") from None


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {shorten_middle(getattr(error, 'message', None) or str(error) or '')}"


class _Counting:
    """A write-only stream that passes bytes on to `out` and reports how many went through."""

    def __init__(self, out: BinaryIO, on_bytes: OnBytes | None) -> None:
        self.out = out
        self.on_bytes = on_bytes
        self.count = 0

    def write(self, data: bytes) -> int:
        written = self.out.write(data)
        self.count += len(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return written


class GCSStorage:
    """gs://bucket/prefix through google-cloud-storage, with bounded timeouts and retries."""

    def __init__(self, client: gcs.Client, bucket: str, prefix: str, auth: str, timeout_s: float,
                 retry_deadline_s: float) -> None:
        self.client = client
        # One connection per concurrent transfer: requests' default pool of 10 per host would open and drop
        # connections (and warn) once more streams than that run at once.
        client._http.mount("https://", HTTPAdapter(pool_maxsize=POOL_CONNECTIONS))
        client._http.mount("http://", HTTPAdapter(pool_maxsize=POOL_CONNECTIONS))
        self.bucket = client.bucket(bucket)
        self.prefix = prefix
        self.url = f"{GCS_SCHEME}{bucket}" + (f"/{prefix}" if prefix else "")
        self.auth = auth
        self.timeout = timeout_s
        self.retry_deadline = retry_deadline_s

    def retry(self, operation: str) -> Retry:
        """The library's retry policy with our deadline, which logs one line when `operation` starts being
        retried: two minutes of silent retries of a DNS failure look like a hang."""
        started = [False]

        def on_error(error: Exception) -> None:
            if not started[0]:
                started[0] = True
                log.warning(f"⏳ {operation} failed ({_message(error)}); retrying for up to "
                            f"{self.retry_deadline:.0f} s")

        # DEFAULT_RETRY's predicate is the library's list of transient errors (429, 5xx, connection errors).
        return Retry(predicate=DEFAULT_RETRY._predicate, initial=0.25, maximum=8.0, multiplier=2.0,
                     timeout=self.retry_deadline, on_error=on_error)

    def _blob_name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _url(self, name: str) -> str:
        return f"{GCS_SCHEME}{self.bucket.name}/{self._blob_name(name)}"

    def _info(self, blob: gcs.Blob) -> ObjectInfo:
        name = blob.name[len(self.prefix) + 1:] if self.prefix else blob.name
        modified = blob.updated.timestamp() if blob.updated is not None else None
        return ObjectInfo(name, int(blob.size or 0), blob.crc32c, blob.generation, modified)

    def _error(self, error: Exception, what: str) -> StorageError:
        """One-line StorageError for a failed call on `what`."""
        if isinstance(error, StorageError):
            return error
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
        return StorageError(f"{what}: {_message(error)}")

    # --- reading ---------------------------------------------------------------------------------
    def list(self, pattern: str = "*") -> list[ObjectInfo]:
        try:
            blobs = self.client.list_blobs(self.bucket, prefix=f"{self.prefix}/" if self.prefix else None,
                                           delimiter="/", retry=self.retry(f"listing {self.url}"),
                                           timeout=self.timeout)
            infos = [self._info(blob) for blob in blobs]
        except Exception as error:
            if isinstance(error, api_exceptions.NotFound):
                raise NotFoundError(f"gs://{self.bucket.name}: bucket does not exist") from None
            raise self._error(error, self.url) from None
        return sorted((i for i in infos if fnmatch.fnmatchcase(i.name, pattern)), key=lambda i: i.name)

    def list_tree(self, folder: str) -> list[ObjectInfo]:
        """Every object under `folder`/ (names relative to the prefix), sorted."""
        url = self._url(folder)
        try:
            blobs = self.client.list_blobs(self.bucket, prefix=f"{self._blob_name(folder)}/",
                                           retry=self.retry(f"listing {url}/"), timeout=self.timeout)
            return sorted((self._info(blob) for blob in blobs), key=lambda info: info.name)
        except Exception as error:
            if isinstance(error, api_exceptions.NotFound):
                raise NotFoundError(f"gs://{self.bucket.name}: bucket does not exist") from None
            raise self._error(error, url) from None

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            blob = self.bucket.get_blob(self._blob_name(name), retry=self.retry(f"looking up {self._url(name)}"),
                                        timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None
        return self._info(blob) if blob is not None else None

    def stat_with_crc32c(self, name: str) -> ObjectInfo | None:
        return self.stat(name)  # GCS keeps every object's crc32c

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def _pinned(self, name: str) -> tuple[ObjectInfo, gcs.Blob]:
        info = self.stat(name)
        if info is None:
            raise NotFoundError(f"{self._url(name)}: not found")
        # Pinned to the generation just stat'ed: a concurrent overwrite cannot mix two versions.
        return info, self.bucket.blob(self._blob_name(name), generation=info.generation)

    def _download_into(self, blob: gcs.Blob, out: _Counting, name: str) -> None:
        # checksum="crc32c": the library checks the bytes against the object's crc32c as they arrive (and
        # resumes a cut connection where it stopped), so nothing is read a second time to check it.
        blob.download_to_file(out, raw_download=True, checksum="crc32c",
                              retry=self.retry(f"downloading {self._url(name)}"), timeout=self.timeout)

    def download(self, name: str, dest: Path, on_bytes: OnBytes | None = None) -> ObjectInfo:
        info, blob = self._pinned(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
                with open(tmp, "wb") as handle:
                    out = _Counting(handle, on_bytes)
                    try:
                        self._download_into(blob, out, name)
                        break
                    except DataCorruption:
                        if on_bytes is not None:
                            on_bytes(-out.count)  # those bytes come again
                        if attempt == DOWNLOAD_ATTEMPTS:
                            raise StorageError(f"{self._url(name)}: crc32c mismatch after download "
                                               f"({DOWNLOAD_ATTEMPTS} attempts)") from None
                        time.sleep(0.5 * attempt)
            if tmp.stat().st_size != info.size:
                raise StorageError(f"{self._url(name)}: downloaded {tmp.stat().st_size} bytes, expected {info.size}")
            tmp.replace(dest)
        except StorageError:
            raise
        except Exception as error:  # the client already retried transient errors for retry_deadline
            raise self._error(error, self._url(name)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def download_stream(self, name: str, out: BinaryIO, on_bytes: OnBytes | None = None) -> ObjectInfo:
        """Streams the object into `out` (the library checks its crc32c at the end); no whole-object retry,
        since the bytes already went on."""
        info, blob = self._pinned(name)
        counting = _Counting(out, on_bytes)
        try:
            self._download_into(blob, counting, name)
        except DataCorruption:
            raise StorageError(f"{self._url(name)}: crc32c mismatch after download") from None
        except Exception as error:
            raise self._error(error, self._url(name)) from None
        if counting.count != info.size:
            raise StorageError(f"{self._url(name)}: downloaded {counting.count} bytes, expected {info.size}")
        return info

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.bucket.blob(self._blob_name(name)).download_as_bytes(
                raw_download=True, checksum="crc32c", retry=self.retry(f"downloading {self._url(name)}"),
                timeout=self.timeout)
        except DataCorruption:
            raise StorageError(f"{self._url(name)}: crc32c mismatch after download") from None
        except Exception as error:
            raise self._error(error, self._url(name)) from None

    # --- writing ---------------------------------------------------------------------------------
    def upload_file(self, src: Path, name: str) -> ObjectInfo:
        # Through the writer, so that every upload is resumable (the client would send small files as
        # multipart) and verified the same way.
        with self.open_writer(name) as writer, open(src, "rb") as reader:
            while chunk := reader.read(CHUNK_BYTES):
                writer.write(chunk)
        assert writer.info is not None
        return writer.info

    def open_writer(self, name: str) -> GCSWriter:
        # GCS itself refuses the finished upload when the object exists (if_generation_match=0); checking
        # first fails before sending gigabytes, and also on emulators that ignore the precondition.
        if self.exists(name):
            raise PreconditionFailedError(f"{self._url(name)}: already exists; not overwriting")
        return GCSWriter(self, name)

    def begin_file(self, src: Path, name: str, part_bytes: int = PART_BYTES) -> GCSFileUpload:
        if self.exists(name):
            raise PreconditionFailedError(f"{self._url(name)}: already exists; not overwriting")
        return GCSFileUpload(self, src, name, part_bytes)

    def check_uploaded(self, blob: gcs.Blob, name: str, size: int, crc: str) -> ObjectInfo:
        """The stored object against the bytes sent; a differing copy is deleted (exactly what we wrote)."""
        if blob.size is None or blob.crc32c is None:
            blob.reload(retry=self.retry(f"looking up {self._url(name)}"), timeout=self.timeout)
        info = self._info(blob)
        if info.size != size or info.crc32c != crc:
            self.delete_generation(name, info.generation)
            raise StorageError(f"{self._url(name)}: uploaded copy differs (size {info.size} vs {size}, "
                               f"crc32c {info.crc32c} vs {crc}); deleted it")
        return info

    def compose(self, sources: list[str], name: str) -> ObjectInfo:
        """The objects `sources` (at most 32) concatenated into the new object `name`."""
        if self.exists(name):  # the emulator ignores if_generation_match=0 on compose
            raise PreconditionFailedError(f"{self._url(name)}: already exists; not overwriting")
        target = self.bucket.blob(self._blob_name(name))
        try:
            target.compose([self.bucket.blob(self._blob_name(source)) for source in sources], if_generation_match=0,
                           retry=self.retry(f"composing {self._url(name)}"), timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None
        return self._info(target)

    def replace_file(self, src: Path, name: str) -> None:
        """Uploads src as `name`, a new generation of what is there (for logs, which grow; checkpoints are never
        replaced). One request for a small file; the library checks the crc32c it computes."""
        try:
            self.bucket.blob(self._blob_name(name)).upload_from_filename(
                str(src), checksum="crc32c", retry=self.retry(f"uploading {self._url(name)}"), timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None

    def delete(self, name: str) -> None:
        try:
            self.bucket.delete_blob(self._blob_name(name), retry=self.retry(f"deleting {self._url(name)}"),
                                    timeout=self.timeout)
        except Exception as error:
            raise self._error(error, self._url(name)) from None

    def delete_generation(self, name: str, generation: int | None) -> None:
        """Deletes exactly that version of the object (nothing someone wrote since); gone already is fine."""
        try:
            self.bucket.delete_blob(self._blob_name(name), if_generation_match=generation,
                                    retry=self.retry(f"deleting {self._url(name)}"), timeout=self.timeout)
        except api_exceptions.NotFound:
            pass
        except Exception as error:
            raise self._error(error, self._url(name)) from None

    def remove_leftovers(self) -> list[ObjectInfo]:
        """Deletes the part objects that no upload needs: those of a file whose object is composed already (what
        a writer killed during the composes left; a live writer deletes them itself right after its compose),
        and any older than a day. The others may be another machine's upload in progress, which no pid here can
        tell, or verified parts that the next attempt at that checkpoint reuses (and then deletes)."""
        cutoff = time.time() - LEFTOVER_PART_AGE_S
        # Listed before the objects are looked up: a writer sends parts only while its file's object does not
        # exist (begin_file refuses otherwise), so a listed part whose object exists afterwards is in that object.
        parts = self.list_tree(PARTS_FOLDER)
        composed = {target for target in {part_target(info.name) for info in parts} if target and self.exists(target)}
        done = [info for info in parts if part_target(info.name) in composed
                or (info.modified is not None and info.modified < cutoff)]
        for info in done:
            self.delete_generation(info.name, info.generation)  # that version only: never a newer upload's part
        return done
