"""One small object-storage interface with two backends: a local folder (utils/storage_local.py) and
gs://bucket/prefix (utils/storage_gcs.py).

    storage = open_storage("gs://refocused-ai")            # or open_storage("/data/shards")
    for info in storage.list("tokenized_*.npz"): ...
    storage.download("tokenized_000.npz", Path("cache/tokenized_000.npz"))
    storage.upload_file(Path("ckpt.tar"), "Checkpoints/ckpt.tar")

Names are relative to the storage's prefix (they may contain "/"; `list` only sees objects directly
under the prefix, `list_tree` everything under a folder). Every transfer is verified: a download lands in
`dest.tmp`, is checked against the object's size and crc32c (on GCS by google-cloud-storage itself, while
it downloads), and only then renamed to `dest`, so a half-downloaded file is never visible under its final
name. Uploads never overwrite (if_generation_match=0) and are checked against the bytes sent. A large file
is uploaded in parts by several threads (`begin_file`, a FileUpload): on GCS each part is an object of its
own, composed into the final object; in a local folder the parts are written into one temporary file.

GCS credentials, in order: a service-account key file passed as `credentials`; Application Default
Credentials; anonymous access (enough for public buckets). A GOOGLE_APPLICATION_CREDENTIALS naming a
missing or unusable file is an error, never anonymous access. With STORAGE_EMULATOR_HOST set the client
talks to that emulator, anonymously. `storage.auth` says which one is used.

Transient errors (timeouts, 429/5xx, refused or reset connections, DNS failures) are retried with
exponential backoff for `retry_deadline_s` (env GCS_RETRY_DEADLINE_S, default 120 s), with one log line
when the retries of an operation start; each request waits at most `timeout_s` (env GCS_TIMEOUT_S, default
60 s). Tests set both low so that a stopped emulator fails fast.
"""
from __future__ import annotations  # a method named `list` must not hide the builtin in annotations

import base64
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import google_crc32c

GCS_SCHEME = "gs://"
CHUNK_BYTES = 8 * 1024 * 1024
PART_BYTES = 256 * 1024 * 1024
"""Files larger than this are uploaded in parts of this size, by several threads at once."""
MESSAGE_CHARS = 300
"""How much of a library's error message a one-line error keeps (its middle is cut, not its end)."""

OnBytes = Callable[[int], None]
"""Called with the number of bytes just transferred (progress); may be called from several threads."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    """Name relative to the storage's prefix."""
    size: int
    crc32c: str | None
    """Base64 big-endian crc32c, as GCS reports it; None where the backend does not know it (local list/stat)."""
    generation: int | None
    """GCS object generation; None for local files."""
    modified: float | None = None
    """Last change, seconds since the epoch (GCS: the object's update time; local: the file's mtime)."""


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the object or bucket."""


class NotFoundError(StorageError):
    """The object, bucket or folder does not exist."""


class PreconditionFailedError(StorageError):
    """The upload would overwrite an existing object."""


@dataclass(frozen=True)
class Part:
    """A byte range of a file that one thread uploads."""

    offset: int
    length: int


class FileUpload(Protocol):
    """One local file on its way to one object, in parts that several threads may send at once."""

    name: str
    parts: list[Part]

    def send(self, part: Part, on_bytes: OnBytes) -> int:
        """Uploads one part (or finds an identical one left by an earlier attempt); returns its crc32c value."""
        ...

    def finish(self, crcs: list[int]) -> ObjectInfo:
        """Assembles the parts (crc32c values in part order) into the object and verifies it against them."""
        ...

    def abort(self) -> None:
        """Gives up: removes what cannot be reused (a local temporary file); verified GCS parts stay for reuse."""
        ...


class Storage(Protocol):
    url: str
    """"gs://bucket/prefix" or an absolute local folder."""
    auth: str
    """How the backend authenticates, for the run's log ("local folder", "anonymous access", ...)."""

    def list(self, pattern: str = "*") -> list[ObjectInfo]: ...
    def list_tree(self, folder: str) -> list[ObjectInfo]: ...
    def stat(self, name: str) -> ObjectInfo | None: ...
    def stat_with_crc32c(self, name: str) -> ObjectInfo | None: ...
    def exists(self, name: str) -> bool: ...
    def download(self, name: str, dest: Path, on_bytes: OnBytes | None = None) -> ObjectInfo: ...
    def download_stream(self, name: str, out: BinaryIO, on_bytes: OnBytes | None = None) -> ObjectInfo: ...
    def read_bytes(self, name: str) -> bytes: ...
    def upload_file(self, src: Path, name: str) -> ObjectInfo: ...
    def replace_file(self, src: Path, name: str) -> None: ...
    def begin_file(self, src: Path, name: str, part_bytes: int = PART_BYTES) -> FileUpload: ...
    def open_writer(self, name: str) -> BinaryIO: ...
    def delete(self, name: str) -> None: ...
    def remove_leftovers(self) -> list[ObjectInfo]: ...


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


# --- checksums ------------------------------------------------------------------------------------

def crc32c_of_file(path: Path) -> str:
    """Base64 crc32c of the file's bytes, as GCS reports it for an object."""
    return encode_crc32c(crc32c_of_range(path, 0, path.stat().st_size))


def crc32c_of_range(path: Path, offset: int, length: int) -> int:
    """The crc32c value of `length` bytes of the file from `offset`."""
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise StorageError(f"{path}: shorter than expected ({offset + length - left} of {offset + length} bytes)")
            crc = google_crc32c.extend(crc, chunk)
            left -= len(chunk)
    return crc


def encode_crc32c(value: int) -> str:
    return base64.b64encode(struct.pack(">I", value)).decode("ascii")


def _gf2_times(matrix: list[int], vector: int) -> int:
    result, row = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, column) for column in matrix]


def combine_crc32c(first: int, second: int, second_length: int) -> int:
    """crc32c(A + B) from crc32c(A), crc32c(B) and len(B), in O(log len(B)) (zlib's crc32_combine with the
    Castagnoli polynomial): the crc32c of a file uploaded in parts, from its parts' crc32c values, without
    reading it again."""
    if second_length == 0:
        return first
    odd = [0x82F63B78] + [1 << bit for bit in range(31)]  # the operator for one zero bit (reflected polynomial)
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    length = second_length
    while True:  # apply len(B) zero bytes to crc(A), squaring the operator for each bit of the length
        even = _gf2_square(odd)
        if length & 1:
            first = _gf2_times(even, first)
        length >>= 1
        if not length:
            break
        odd = _gf2_square(even)
        if length & 1:
            first = _gf2_times(odd, first)
        length >>= 1
        if not length:
            break
    return first ^ second


def combine_parts(crcs: list[int], parts: list[Part]) -> int:
    """The crc32c value of a whole file from the values of its consecutive parts."""
    total = 0
    for crc, part in zip(crcs, parts, strict=True):
        total = combine_crc32c(total, crc, part.length)
    return total


def split_into_parts(size: int, part_bytes: int) -> list[Part]:
    """Consecutive parts of at most part_bytes covering `size` bytes (one empty part for an empty file)."""
    return [Part(offset, min(part_bytes, size - offset)) for offset in range(0, size, part_bytes)] or [Part(0, 0)]


def shorten_middle(text: str, limit: int = MESSAGE_CHARS) -> str:
    """One line of at most `limit` characters: a library's messages put the reason at the end ("... Failed to
    resolve 'storage.googleapis.com'"), after a long URL, so the middle goes."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    head = limit // 3
    return f"{line[:head]} … {line[len(line) - (limit - head - 3):]}"


# The backends import the definitions above; imported last, they are also reachable from here.
from utils.storage_gcs import GCSStorage, make_client  # noqa: E402
from utils.storage_local import LocalStorage  # noqa: E402

__all__ = ["CHUNK_BYTES", "GCS_SCHEME", "PART_BYTES", "FileUpload", "GCSStorage", "LocalStorage", "NotFoundError",
           "ObjectInfo", "OnBytes", "Part", "PreconditionFailedError", "Storage", "StorageError", "combine_crc32c",
           "combine_parts", "crc32c_of_file", "crc32c_of_range", "encode_crc32c", "is_gcs_url", "make_client",
           "open_storage", "shorten_middle", "split_into_parts"]
