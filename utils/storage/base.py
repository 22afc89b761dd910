"""The object-storage interface both backends implement (utils/storage/local.py, utils/storage/gcs.py), its
errors, and the checksum and part arithmetic they share."""
from __future__ import annotations  # a method named `list` must not hide the builtin in annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import google_crc32c

CHUNK_BYTES = 8 * 1024 * 1024
PART_BYTES = 256 * 1024 * 1024
"""Files larger than this are uploaded in parts of this size, by several threads at once."""

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
