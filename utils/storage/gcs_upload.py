"""Uploads to Google Cloud Storage (utils/storage/gcs.py's GCSStorage): resumable sessions and files in parts.

Uploads are resumable sessions (blob.open("wb")) that never overwrite (if_generation_match=0) and are
checked against the crc32c of the bytes sent; an upload given up mid-way cancels its session (DELETE on
the session URI) rather than leaving it open for a week. A large file goes up in parts, each an object
under `.parts/<name>/<offset>-<length>`, sent by several threads, then composed (at most 32 sources per
compose call, so in levels) into the final object, and the parts deleted. Parts verified by an attempt that
failed later are reused by the next attempt, when their size and crc32c equal the local bytes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c

from utils.storage.base import (
    CHUNK_BYTES,
    ObjectInfo,
    OnBytes,
    Part,
    StorageError,
    combine_parts,
    crc32c_of_range,
    encode_crc32c,
    split_into_parts,
)

if TYPE_CHECKING:
    from utils.storage.gcs import GCSStorage

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024
"""Resumable-upload chunk (a multiple of 256 KiB): one request per chunk, held in memory while sent (per stream)."""
PARTS_FOLDER = ".parts"
COMPOSE_SOURCES = 32
"""GCS composes at most 32 objects per call."""


def part_name(name: str, part: Part) -> str:
    return f"{PARTS_FOLDER}/{name}/{part.offset}-{part.length}"


def part_target(part: str) -> str:
    """The object that a part (or an intermediate compose) .parts/<name>/<leaf> goes into: <name>; "" for an
    object directly under .parts/, which is no part."""
    return part[len(PARTS_FOLDER) + 1:].rpartition("/")[0]


class GCSWriter:
    """A resumable upload fed by write(); close() finishes and verifies it, an exception cancels it."""

    def __init__(self, storage: GCSStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.blob = storage.bucket.blob(storage._blob_name(name), chunk_size=UPLOAD_CHUNK_BYTES)
        self.crc = 0
        self.size = 0
        self.closed = False
        self.info: ObjectInfo | None = None
        try:
            self.writer = self.blob.open("wb", ignore_flush=True, if_generation_match=0,
                                         retry=storage.retry(f"uploading {storage._url(name)}"),
                                         timeout=storage.timeout)
        except Exception as error:
            raise storage._error(error, storage._url(name)) from None

    def write(self, data: bytes) -> int:
        try:
            written = self.writer.write(data)
        except Exception as error:
            raise self.storage._error(error, self.storage._url(self.name)) from None
        self.crc = google_crc32c.extend(self.crc, bytes(data))
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
            self._cancel()
            raise self.storage._error(error, self.storage._url(self.name)) from None
        self.info = self.storage.check_uploaded(self.blob, self.name, self.size, encode_crc32c(self.crc))

    def abort(self) -> None:
        self.closed = True
        self._cancel()

    def _cancel(self) -> None:
        """Cancels the resumable session, so no half-sent upload lingers for a week, and closes the BlobWriter
        without finishing it: left open, its io-base __del__ would close() it when collected, finishing the
        upload of whatever was buffered as an object. (BlobWriter.terminate() of google-cloud-storage 3.17
        sends its DELETE to the initiation URL, not to the session URI.)"""
        upload_and_transport = self.writer._upload_and_transport
        self.writer._buffer.close()  # what terminate() does too: the writer counts as closed from here on
        if upload_and_transport is None:
            return  # nothing was sent: no session was opened
        upload, transport = upload_and_transport
        if upload.resumable_url is None or upload.finished:
            return
        try:
            transport.delete(upload.resumable_url, timeout=self.storage.timeout)  # GCS answers 499
        except Exception as error:  # best effort: GCS discards the session after a week anyway
            log.debug("cancelling the upload session of %s failed: %s", self.name, error)

    def __enter__(self) -> "GCSWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type else self.close()


class GCSFileUpload:
    """A file uploaded as one object (small) or as parts under .parts/<name>/ composed into it (large).

    Parts an earlier attempt left are reused when their size and crc32c equal the local bytes, and
    deleted otherwise."""

    def __init__(self, storage: GCSStorage, src: Path, name: str, part_bytes: int) -> None:
        self.storage = storage
        self.src = src
        self.name = name
        self.size = src.stat().st_size
        self.parts = split_into_parts(self.size, part_bytes)
        self._single: ObjectInfo | None = None
        self._leftovers: dict[str, ObjectInfo] = {}
        if len(self.parts) > 1:
            planned = {part_name(name, part) for part in self.parts}
            for info in storage.list_tree(f"{PARTS_FOLDER}/{name}"):
                if info.name in planned:
                    self._leftovers[info.name] = info
                else:  # an intermediate compose, or parts of another part size
                    storage.delete_generation(info.name, info.generation)

    def _target(self, part: Part) -> str:
        return self.name if len(self.parts) == 1 else part_name(self.name, part)

    def send(self, part: Part, on_bytes: OnBytes) -> int:
        target = self._target(part)
        leftover = self._leftovers.get(target)
        if leftover is not None:
            if leftover.size == part.length:
                crc = crc32c_of_range(self.src, part.offset, part.length)
                if encode_crc32c(crc) == leftover.crc32c:
                    on_bytes(part.length)
                    return crc  # verified by an earlier attempt: not sent again
            self.storage.delete_generation(target, leftover.generation)
        with self.storage.open_writer(target) as writer, open(self.src, "rb") as reader:
            reader.seek(part.offset)
            left = part.length
            while left > 0:
                chunk = reader.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise StorageError(f"{self.src}: changed size during the upload")
                writer.write(chunk)
                left -= len(chunk)
                on_bytes(len(chunk))
        assert writer.info is not None
        if len(self.parts) == 1:
            self._single = writer.info
        return writer.crc

    def finish(self, crcs: list[int]) -> ObjectInfo:
        expected = encode_crc32c(combine_parts(crcs, self.parts))
        if self._single is not None:
            return self._single
        sources = [part_name(self.name, part) for part in self.parts]
        written = list(sources)
        level = 0
        while len(sources) > COMPOSE_SOURCES:
            level += 1
            groups = [sources[i:i + COMPOSE_SOURCES] for i in range(0, len(sources), COMPOSE_SOURCES)]
            sources = [f"{PARTS_FOLDER}/{self.name}/compose-{level}-{index}" for index in range(len(groups))]
            for group, target in zip(groups, sources):
                self.storage.compose(group, target)
            written += sources
        info = self.storage.compose(sources, self.name)
        if info.size != self.size or info.crc32c != expected:
            self.storage.delete_generation(self.name, info.generation)
            raise StorageError(f"{self.storage._url(self.name)}: composed object differs from the bytes sent (size "
                               f"{info.size} vs {self.size}, crc32c {info.crc32c} vs {expected}); deleted it")
        for source in written:  # the parts are in the object now
            self.storage.delete_generation(source, None)
        return info

    def abort(self) -> None:
        pass  # sessions were cancelled by their writers; verified parts stay for the next attempt

