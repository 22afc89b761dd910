"""Names read from the upload destination never lead outside the local folder they become paths in: whoever can
write the bucket chooses them. Real GCS keeps a name like `logs/../../x` as given, while the emulator cleans it
and a local folder cannot hold it, so a destination whose listings also return such names stands in for it."""
from __future__ import annotations  # a method named `list` must not hide the builtin in annotations

import fnmatch
import io
import tarfile
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from utils.errors import UploadError
from utils.storage.base import ObjectInfo, StorageError, encode_crc32c
from utils.storage.local import LocalStorage
from utils.uploads.destination import find_local_or_remote, remote_checkpoints, restore_checkpoint
from utils.uploads.formats import FileEntry, files_manifest
from utils.uploads.log_mirror import LogMirror

STEP4, STEP8 = "checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step8-files0"
REFUSED = "a remote name must be a relative path inside its folder, without '..'"


class CraftedDestination:
    """A local-folder destination whose listings also return the names of `crafted` (served with its bytes)."""

    def __init__(self, folder: Path, crafted: dict[str, bytes]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.inner, self.crafted = LocalStorage(folder), crafted
        self.url, self.auth = self.inner.url, self.inner.auth

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _info(self, name: str) -> ObjectInfo:
        data = self.crafted[name]
        return ObjectInfo(name, len(data), encode_crc32c(google_crc32c.value(data)), None)

    def list(self, pattern: str = "*") -> list[ObjectInfo]:
        crafted = [self._info(name) for name in self.crafted if fnmatch.fnmatchcase(name, pattern)]
        return sorted(self.inner.list(pattern) + crafted, key=lambda info: info.name)

    def list_tree(self, folder: str) -> list[ObjectInfo]:
        crafted = [self._info(name) for name in self.crafted if name.startswith(folder + "/")]
        return sorted(self.inner.list_tree(folder) + crafted, key=lambda info: info.name)

    def download(self, name: str, dest: Path, on_bytes: Any = None) -> ObjectInfo:
        if name not in self.crafted:
            return self.inner.download(name, dest, on_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.crafted[name])
        return self._info(name)


def refused(where: str, name: str) -> str:
    return f"{where}: refusing {name!r}: {REFUSED}"


def leftovers(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")) if folder.exists() else []


# --- the log mirror ------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", ["../../escaped.txt", "/ABSOLUTE/escaped.txt"])
def test_the_log_mirror_refuses_a_remote_name_outside_log_dir_and_fetches_nothing(relative: str,
                                                                                   tmp_path: Path) -> None:
    relative = relative.replace("/ABSOLUTE", str(tmp_path))  # logs//tmp/.../escaped.txt: an absolute path
    log_dir = tmp_path / "run" / "logs"
    storage = CraftedDestination(tmp_path / "dest", {"logs/metrics.jsonl": b'{"step": 1}\n',
                                                     f"logs/{relative}": b"written by whoever can write the bucket"})
    with pytest.raises(UploadError) as raised:
        LogMirror(storage, log_dir, "project").pull()  # type: ignore[arg-type]
    assert str(raised.value) == refused(f"{storage.url}/logs", relative)
    assert not (tmp_path / "escaped.txt").exists() and leftovers(log_dir) == []


# --- files-layout manifests ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../escaped.bin", "/ABSOLUTE/escaped.bin", "nested/../../escaped.bin"])
def test_a_manifest_entry_outside_the_checkpoint_is_refused_and_nothing_is_restored(path: str,
                                                                                    tmp_path: Path) -> None:
    path = path.replace("/ABSOLUTE", str(tmp_path))
    dest = tmp_path / "dest"
    (dest / STEP4).mkdir(parents=True)
    (dest / STEP4 / "model.safetensors").write_bytes(b"weights")
    (dest / "escaped.bin").write_bytes(b"evil")  # what the entry names, so that only the check can stop it
    entries = [FileEntry("model.safetensors", 7, encode_crc32c(google_crc32c.value(b"weights"))),
               FileEntry(path, 4, encode_crc32c(google_crc32c.value(b"evil")))]
    (dest / f"{STEP4}.files.json").write_bytes(files_manifest(STEP4, entries))
    storage = LocalStorage(dest)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(UploadError) as raised:
        restore_checkpoint(storage, storage.stat(f"{STEP4}.files.json"), checkpoints)  # type: ignore[arg-type]
    assert str(raised.value) == refused(f"{dest}/{STEP4}.files.json", path)
    assert leftovers(checkpoints) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "dest"]


# --- archive members -----------------------------------------------------------------------------

def tar_with(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A tar of `links` (name: target), then of the files `members` (name: bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("member", [f"{STEP4}/../{STEP8}/model.safetensors",  # inside the unpacking folder
                                    f"{STEP4}/../../escaped.bin", "/ABSOLUTE/escaped.bin"])
def test_an_archive_member_outside_the_checkpoint_is_refused_and_nothing_is_restored(member: str,
                                                                                     tmp_path: Path) -> None:
    member = member.replace("/ABSOLUTE", str(tmp_path))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / f"{STEP4}.tar").write_bytes(tar_with({f"{STEP4}/model.safetensors": b"weights", member: b"evil"}))
    storage = LocalStorage(dest)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(UploadError) as raised:
        restore_checkpoint(storage, storage.stat(f"{STEP4}.tar"), checkpoints)  # type: ignore[arg-type]
    assert str(raised.value) == refused(f"{dest}/{STEP4}.tar", member)
    assert leftovers(checkpoints) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "dest"]


def test_an_archive_with_a_link_is_refused_and_nothing_is_restored(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = tar_with({f"{STEP4}/link/model.safetensors": b"evil"}, links={f"{STEP4}/link": f"../{STEP8}"})
    (dest / f"{STEP4}.tar").write_bytes(archive)  # the link stays inside the unpacking folder: filter="data" allows it
    storage = LocalStorage(dest)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(UploadError) as raised:
        restore_checkpoint(storage, storage.stat(f"{STEP4}.tar"), checkpoints)  # type: ignore[arg-type]
    assert str(raised.value) == (f"{dest}/{STEP4}.tar: entry '{STEP4}/link' is a link or a special file, not a "
                                 "checkpoint's file or folder")
    assert leftovers(checkpoints) == []


# --- checkpoint names from a listing -------------------------------------------------------------

def test_a_listed_checkpoint_name_outside_the_checkpoint_folder_is_never_taken(tmp_path: Path) -> None:
    """--resume latest (and auto) take the newest remote checkpoint, and upload_manager status lists them:
    a listed name becomes checkpoint_dir/<name> only when it is a checkpoint name, one path component."""
    manifest = files_manifest(STEP4, [])
    crafted = {f"../{STEP8}.files.json": manifest, f"/tmp/{STEP8}.files.json": manifest,
               f"{STEP8}/../../escaped.files.json": manifest}
    storage = CraftedDestination(tmp_path / "dest", crafted)
    (tmp_path / "dest" / f"{STEP4}.files.json").write_bytes(manifest)
    assert list(remote_checkpoints(storage)) == [STEP4]  # type: ignore[arg-type]
    info, obj = find_local_or_remote(tmp_path / "checkpoints", "latest", storage)  # type: ignore[arg-type]
    assert info.path == tmp_path / "checkpoints" / STEP4 and obj is not None and obj.name == f"{STEP4}.files.json"


def test_a_link_planted_in_a_local_destination_leads_no_write_or_read_outside_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    destination = tmp_path / "destination"
    destination.mkdir()
    (destination / STEP8).symlink_to(outside)  # named like the checkpoint the run will upload next
    storage = LocalStorage(destination)
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights")
    with pytest.raises(StorageError, match=f"refusing '{STEP8}/model.safetensors': it leads outside the folder"):
        storage.upload_file(source, f"{STEP8}/model.safetensors")
    with pytest.raises(StorageError, match="leads outside the folder"):
        storage.read_bytes(f"{STEP8}/model.safetensors")
    assert list(outside.iterdir()) == []
    assert storage.upload_file(source, f"{STEP4}/model.safetensors").size == len(b"weights")  # a real folder is fine
