"""The files layout of uploads: parallel parts, composes, reuse of leftovers, kill -9 and
outages mid-upload, the prune that checks the remote copy first, leftovers of dead writers, restores
without a second copy, the report callback, the falling-behind warning and disk_warning."""
import builtins
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import google_crc32c
import numpy as np
import pytest
from gcs_emulator import GCSEmulator, gcs_server  # noqa: F401  (the fixture)

from configs.training_config import FILES_FORMAT
from conftest import REPO_ROOT, GatedStorage, disk_peak
from scripts import upload_manager
from utils.checkpoints.checksums import ChecksumError, record_checksums
from utils.display import shorten_middle
from utils.errors import UploadError
from utils.storage import gcs as storage_gcs
from utils.storage import gcs_upload as storage_gcs_upload
from utils.storage import local as storage_local
from utils.storage import open_storage
from utils.storage.base import Part, combine_crc32c, combine_parts, crc32c_of_file, split_into_parts
from utils.storage.local import TMP_UPLOAD_PREFIX, tmp_upload_name
from utils.uploads import uploader as uploader_module
from utils.uploads.destination import download_checkpoint, find_local_or_remote, open_destination
from utils.uploads.formats import FileEntry, files_manifest, parse_files_manifest
from utils.uploads.transfer import upload_checkpoint
from utils.uploads.uploader import Uploader, UploadSettings, disk_warning

STEP4, STEP8, STEP12 = ("checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step8-files0",
                        "checkpoint-epoch0-step12-files0")
PART = 64 * 1024  # small parts: a 300 KB file goes up in 5, a 2.1 MB one in 33 (two compose levels)


def make_checkpoint(checkpoint_dir: Path, name: str, seed: int = 0, weights: int = 300_000,
                    optimizer: int = 150_000) -> Path:
    folder = checkpoint_dir / name
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (folder / "model.safetensors").write_bytes(rng.bytes(weights))
    (folder / "optimizer.bin").write_bytes(rng.bytes(optimizer))
    (folder / "metadata.json").write_text(json.dumps({"step": int(name.split("step")[1].split("-")[0])}))
    (folder / "nested" / "random_states_0.pkl").write_bytes(bytes(range(256)) * 10)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((checkpoint_dir / "uploads.json").read_text())["checkpoints"]


def destination(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "local":
        return str(tmp_path / "uploads")
    server: GCSEmulator = request.getfixturevalue("gcs_server")
    server.create_bucket("ckpts")
    return "gs://ckpts/ck"


# --- pure parts ------------------------------------------------------------------------------------

def test_crc32c_of_parts_combines_to_the_whole_and_messages_keep_their_end() -> None:
    data = np.random.default_rng(1).bytes(200_003)
    parts = split_into_parts(len(data), PART)
    assert [part.length for part in parts] == [PART, PART, PART, 200_003 - 3 * PART]
    crcs = [google_crc32c.value(data[p.offset:p.offset + p.length]) for p in parts]
    assert combine_parts(crcs, parts) == google_crc32c.value(data)
    assert combine_crc32c(google_crc32c.value(b"abc"), google_crc32c.value(b""), 0) == google_crc32c.value(b"abc")
    assert split_into_parts(0, PART) == [Part(0, 0)]
    line = shorten_middle("HTTPSConnectionPool(host='x'): " + "q" * 500 + " Failed to resolve 'storage.googleapis.com'")
    assert len(line) <= 300 and line.startswith("HTTPSConnectionPool") and line.endswith("'storage.googleapis.com'")


def test_files_manifest_is_deterministic_and_checked() -> None:
    entries = [FileEntry("model.safetensors", 10, "AAAAAA=="), FileEntry("a/b.pkl", 3, "AAAAAB==")]
    data = files_manifest(STEP4, entries)
    assert data == files_manifest(STEP4, list(reversed(entries)))
    assert parse_files_manifest(data, STEP4, "here") == sorted(entries, key=lambda entry: entry.path)
    with pytest.raises(UploadError, match="describes 'checkpoint-epoch0-step4-files0'"):
        parse_files_manifest(data, STEP8, "here")
    for bad in ("../escape", "/etc/passwd", "a/../../b", "", "a\\b"):
        with pytest.raises(UploadError, match=re.escape(f"here: refusing {bad!r}: a remote name")):
            parse_files_manifest(files_manifest(STEP4, [FileEntry(bad, 1, "AAAAAA==")]), STEP4, "here")


# --- upload and restore --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_round_trip_in_parts_by_several_streams(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = destination(kind, tmp_path, request)
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4, weights=2_100_000)  # 33 parts: composed in two levels on GCS
    concurrent, peak = [0], [0]
    lock = threading.Lock()
    storage = open_destination(url)
    upload_class = type(storage.begin_file(folder / "metadata.json", "probe/metadata.json"))
    real_send = upload_class.send

    def send(self: Any, part: Part, on_bytes: Any) -> int:
        with lock:
            concurrent[0] += 1
            peak[0] = max(peak[0], concurrent[0])
        try:
            time.sleep(0.01)
            return real_send(self, part, on_bytes)
        finally:
            with lock:
                concurrent[0] -= 1

    monkeypatch.setattr(upload_class, "send", send)
    uploader = Uploader(storage, checkpoints, UploadSettings(background=False, streams=3, part_bytes=PART))
    uploader.submit_new(folder)
    record = records(checkpoints)[STEP4]
    manifest = storage.stat_with_crc32c(f"{STEP4}.files.json")
    assert record["state"] == "uploaded" and record["remote_url"] == f"{storage.url}/{STEP4}.files.json"
    assert manifest is not None and (record["size"], record["crc32c"]) == (manifest.size, manifest.crc32c)
    assert peak[0] == 3  # three parts in flight at once, never more
    stored = {info.name: info for info in storage.list_tree(STEP4)}
    for relative, data in tree(folder).items():
        info = storage.stat_with_crc32c(f"{STEP4}/{relative}")
        assert info is not None and info.size == len(data)
        assert info.crc32c == crc32c_of_file(folder / relative)
    assert len(stored) == 4 and storage.list_tree(".parts") == []  # the parts are gone once composed
    listed = parse_files_manifest(storage.read_bytes(f"{STEP4}.files.json"), STEP4, "manifest")
    assert {entry.path for entry in listed} == set(tree(folder))

    elsewhere = tmp_path / "elsewhere"
    info, obj = find_local_or_remote(elsewhere, "latest", storage)
    assert info.name == STEP4 and obj is not None and obj.name == f"{STEP4}.files.json"
    assert tree(download_checkpoint(storage, obj, elsewhere)) == tree(folder)
    assert records(elsewhere)[STEP4]["state"] == "uploaded"  # not uploaded again from there
    assert not list(elsewhere.glob(".tmp-*"))


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_leftovers_are_reused_when_identical_and_replaced_when_not(kind: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    url = destination(kind, tmp_path, request)
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4)
    storage = open_destination(url)
    # An earlier attempt got two files there (one of them from another checkpoint of this name) and a stray.
    storage.upload_file(folder / "optimizer.bin", f"{STEP4}/optimizer.bin")
    other = make_checkpoint(tmp_path / "other", STEP4, seed=9)
    storage.upload_file(other / "model.safetensors", f"{STEP4}/model.safetensors")
    storage.upload_file(other / "metadata.json", f"{STEP4}/stray.json")
    before = storage.stat(f"{STEP4}/optimizer.bin")
    Uploader(storage, checkpoints, UploadSettings(background=False, part_bytes=PART)).submit(folder)
    assert records(checkpoints)[STEP4]["state"] == "uploaded"
    assert storage.stat(f"{STEP4}/optimizer.bin") == before  # reused: not sent again
    assert storage.stat_with_crc32c(f"{STEP4}/model.safetensors").crc32c == crc32c_of_file(folder / "model.safetensors")
    assert storage.stat(f"{STEP4}/stray.json") is None
    restored = download_checkpoint(storage, storage.stat(f"{STEP4}.files.json"), tmp_path / "restored")
    assert tree(restored) == tree(folder)


def test_a_file_that_differs_from_its_saved_checksum_when_sent_gets_no_manifest(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "checkpoints", STEP4)
    record_checksums(folder)
    damaged = bytearray((folder / "optimizer.bin").read_bytes())
    damaged[1000] ^= 1  # one bit, after the save (the uploader's check before the upload is not called here)
    (folder / "optimizer.bin").write_bytes(bytes(damaged))
    storage = open_destination(str(tmp_path / "uploads"))
    with pytest.raises(ChecksumError, match="optimizer.bin: damaged \\(crc32c"):
        upload_checkpoint(storage, folder, f"{STEP4}.files.json", FILES_FORMAT, 4, lambda sent: None, PART)
    assert storage.stat(f"{STEP4}.files.json") is None  # nothing a resume would take


def test_an_existing_manifest_is_accepted_when_identical_and_a_conflict_when_not(tmp_path: Path) -> None:
    dest = tmp_path / "uploads"
    first, second = tmp_path / "run1", tmp_path / "run2"
    make_checkpoint(first, STEP4)
    shutil.copytree(first, second)
    make_checkpoint(first, STEP8, seed=1)
    make_checkpoint(second, STEP8, seed=2)  # same name, other weights
    Uploader(open_destination(str(dest)), first, UploadSettings(background=False)).submit_pending()
    manifest_before = (dest / f"{STEP8}.files.json").read_bytes()
    other = Uploader(open_destination(str(dest)), second, UploadSettings(background=False))
    other.submit_pending()
    result = records(second)
    assert result[STEP4]["state"] == "uploaded" and result[STEP4]["attempts"] == 1
    assert result[STEP8]["state"] == "failed" and "already exists and differs" in result[STEP8]["error"]
    assert (dest / f"{STEP8}.files.json").read_bytes() == manifest_before
    assert tree(dest / STEP8) == tree(first / STEP8)  # nothing overwritten
    assert other.prune(1) == [STEP4] and (second / STEP8).is_dir()


# --- kill -9 and outages mid-upload --------------------------------------------------------------

KILLED_UPLOADER = r"""
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from utils.uploads import uploader
from utils.storage import gcs_upload as storage_gcs_upload, local as storage_local
from utils.uploads.destination import open_destination
marker = Path(sys.argv[4])
uploader.PART_BYTES = 64 * 1024
for upload_class in (storage_gcs_upload.GCSFileUpload, storage_local.LocalFileUpload):
    def send(self, part, on_bytes, real=upload_class.send):
        crc = real(self, part, on_bytes)
        marker.write_text("a part is up")
        time.sleep(0.3)  # later parts are still on their way when the kill comes
        return crc
    upload_class.send = send
checkpoints = Path(sys.argv[3])
up = uploader.Uploader(open_destination(sys.argv[2]), checkpoints, uploader.UploadSettings(background=False, streams=2))
up.submit(checkpoints / "checkpoint-epoch0-step4-files0")
print("finished: the kill came too late")
"""


KILLED_COMPOSER = r"""
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from utils.uploads import uploader
from utils.storage import gcs as storage_gcs
from utils.uploads.destination import open_destination
marker = Path(sys.argv[4])
uploader.PART_BYTES = 64 * 1024
def compose(self, sources, name, real=storage_gcs.GCSStorage.compose):
    info = real(self, sources, name)
    if not name.startswith(".parts/"):  # a file's object is composed; its parts are not deleted yet
        marker.write_text("composed")
        time.sleep(60)
    return info
storage_gcs.GCSStorage.compose = compose
checkpoints = Path(sys.argv[3])
up = uploader.Uploader(open_destination(sys.argv[2]), checkpoints, uploader.UploadSettings(background=False, streams=2))
up.submit(checkpoints / "checkpoint-epoch0-step4-files0")
print("finished: the kill came too late")
"""


def kill_uploader(script_text: str, url: str, checkpoints: Path, tmp_path: Path) -> None:
    """Runs the script, which uploads STEP4 of `checkpoints` to `url`, and kills it with SIGKILL once it has
    written its marker file."""
    marker = tmp_path / "marker"
    script = tmp_path / "killed_uploader.py"
    script.write_text(script_text)
    process = subprocess.Popen([sys.executable, str(script), str(REPO_ROOT), url, str(checkpoints), str(marker)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert "finished" not in out


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_kill_9_mid_upload_leaves_nothing_complete_looking_and_upload_all_finishes_it(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = destination(kind, tmp_path, request)
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4, weights=600_000, optimizer=600_000)  # 10 parts each
    make_checkpoint(checkpoints, STEP8, seed=1, weights=1000, optimizer=1000)  # newer: STEP4 is one to prune
    kill_uploader(KILLED_UPLOADER, url, checkpoints, tmp_path)
    storage = open_storage(url)
    assert storage.stat(f"{STEP4}.files.json") is None  # nothing complete-looking
    assert records(checkpoints)[STEP4]["state"] == "uploading"
    # Nothing pruned.
    assert Uploader(storage, checkpoints, UploadSettings(background=False)).prune(1) == [] and folder.is_dir()
    if kind == "local":
        left = list((tmp_path / "uploads").rglob(".tmp-upload-*"))
        assert left and all(f"+{socket.gethostname()}+" in path.name for path in left)
    else:
        assert storage.list_tree(f".parts/{STEP4}")  # verified parts, kept for the next attempt
        started_before = len(uploads_started(request.getfixturevalue("gcs_server")))

    monkeypatch.setattr(uploader_module, "PART_BYTES", PART)  # the parts of the killed upload, to reuse
    assert upload_manager.main(["upload-all", "--checkpoint-dir", str(checkpoints), "--destination", url]) == 0
    assert "2 uploaded, 0 failed" in capsys.readouterr().out
    assert records(checkpoints)[STEP4]["state"] == "uploaded"
    assert tree(download_checkpoint(storage, storage.stat(f"{STEP4}.files.json"), tmp_path / "back")) == tree(folder)
    if kind == "local":
        assert not list((tmp_path / "uploads").rglob(".tmp-upload-*"))  # the dead writer's leftovers are gone
    else:
        resent = len(uploads_started(request.getfixturevalue("gcs_server"))) - started_before
        assert resent < 20 + 2 + 1 + 5  # fewer than every part, the two small files and the manifest of STEP4 (+ the
        # write probe and STEP8's four objects)
        assert storage.list_tree(".parts") == []


@pytest.mark.parametrize("then", ["start", "upload-all"])
def test_parts_of_a_writer_killed_during_the_composes_are_removed_and_a_live_writers_kept(
        then: str, tmp_path: Path, gcs_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_server.create_bucket("ckpts")
    url, checkpoints = "gs://ckpts/ck", tmp_path / "checkpoints"
    make_checkpoint(checkpoints, STEP4, weights=600_000, optimizer=600_000)  # 10 parts each
    kill_uploader(KILLED_COMPOSER, url, checkpoints, tmp_path)
    storage = open_storage(url)
    composed = [name for name in ("model.safetensors", "optimizer.bin") if storage.exists(f"{STEP4}/{name}")]
    assert composed and all(storage.list_tree(f".parts/{STEP4}/{name}") for name in composed)  # parts left behind
    live = f".parts/{STEP12}/model.safetensors/0-65536"  # another machine's upload, its object not composed yet
    gcs_server.put("ckpts", f"ck/{live}", b"p" * 65536)
    if then == "start":
        open_destination(url)  # as a run (or any process opening it for writing) does first
        assert not any(storage.list_tree(f".parts/{STEP4}/{name}") for name in composed)
    else:
        monkeypatch.setattr(uploader_module, "PART_BYTES", PART)
        assert upload_manager.main(["upload-all", "--checkpoint-dir", str(checkpoints), "--destination", url]) == 0
        assert records(checkpoints)[STEP4]["state"] == "uploaded"
        assert [info.name for info in storage.list_tree(".parts")] == [live]
    assert storage.exists(live)


def uploads_started(server: GCSEmulator) -> list[str]:
    """The resumable uploads the emulator has seen started (each object, part or manifest is one)."""
    return [line for line in server.requests("POST /upload/") if "uploadType=resumable" in line]


class _OutageOnFirstPart:
    """Wraps a Storage: the first part sent stops the emulator; a timer starts it again after `outage_s`
    (never, with None)."""

    def __init__(self, inner: Any, server: GCSEmulator, outage_s: float | None) -> None:
        self.inner, self.server, self.outage_s = inner, server, outage_s
        self.url, self.auth = inner.url, inner.auth
        self.stopped = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def begin_file(self, src: Path, name: str, part_bytes: int) -> Any:
        upload = self.inner.begin_file(src, name, part_bytes)
        real_send, outer = upload.send, self

        def send(part: Part, on_bytes: Any) -> int:
            if not outer.stopped.is_set():
                outer.stopped.set()
                outer.server.stop()
                if outer.outage_s is not None:
                    threading.Timer(outer.outage_s, outer.server.start).start()
            return real_send(part, on_bytes)

        upload.send = send
        return upload


@pytest.mark.parametrize("outage_s", [2.0, None])
def test_emulator_stopped_mid_upload_completes_after_retries_or_fails_keeping_the_checkpoint(
        outage_s: float | None, tmp_path: Path, gcs_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCS_RETRY_DEADLINE_S", "1")  # the client gives up fast, so the uploader's retry must act
    monkeypatch.setenv("GCS_TIMEOUT_S", "2")
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4)
    storage = _OutageOnFirstPart(open_destination("gs://ckpts/ck"), gcs_server, outage_s)
    settings = UploadSettings(attempts=6 if outage_s else 2, retry_delay_s=0.5, streams=2, part_bytes=PART)
    uploader = Uploader(storage, checkpoints, settings)
    uploader.submit(folder)
    assert uploader.wait(90) == []
    record = records(checkpoints)[STEP4]
    if outage_s is None:
        assert record["state"] == "failed" and record["attempts"] == 2 and folder.is_dir()
        gcs_server.start()
        assert open_storage("gs://ckpts/ck").stat(f"{STEP4}.files.json") is None
        return
    assert record["state"] == "uploaded" and record["attempts"] > 1
    restored = download_checkpoint(open_storage("gs://ckpts/ck"), open_storage("gs://ckpts/ck").stat(
        f"{STEP4}.files.json"), tmp_path / "restored")
    assert tree(restored)["model.safetensors"] == np.random.default_rng(0).bytes(300_000)


def test_an_aborted_upload_cancels_its_resumable_session(tmp_path: Path, gcs_server: GCSEmulator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_server.create_bucket("ckpts")
    monkeypatch.setattr(storage_gcs_upload, "UPLOAD_CHUNK_BYTES", 256 * 1024)  # a session opens at 256 KiB
    storage = open_storage("gs://ckpts/ck")
    with pytest.raises(RuntimeError):
        with storage.open_writer("broken.bin") as writer:
            writer.write(os.urandom(600_000))
            raise RuntimeError("the sender failed")
    cancelled = gcs_server.requests("DELETE /upload/storage/v1/b/ckpts/o")
    assert len(cancelled) == 1 and "upload_id=" in cancelled[0]


# --- nothing verified is deleted on stale evidence ---------------------------------------------

@pytest.mark.parametrize("gone", ["manifest", "bucket"])
def test_prune_keeps_a_checkpoint_whose_remote_copy_is_gone(gone: str, tmp_path: Path, gcs_server: GCSEmulator,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    for seed, name in enumerate((STEP4, STEP8)):
        make_checkpoint(checkpoints, name, seed=seed)
    storage = open_destination("gs://ckpts/ck")
    uploader = Uploader(storage, checkpoints, UploadSettings(background=False))
    uploader.submit_pending()
    assert all(record["state"] == "uploaded" for record in records(checkpoints).values())
    if gone == "manifest":
        storage.delete(f"{STEP4}.files.json")
    else:
        storage.bucket.delete(force=True)  # deleted mid-run, while uploads.json still says "uploaded"
    caplog.set_level("INFO")
    assert uploader.prune(1) == []
    assert (checkpoints / STEP4).is_dir()
    assert f"Keeping {STEP4} locally: its uploaded copy gs://ckpts/ck/{STEP4}.files.json is gone" in caplog.text
    assert records(checkpoints)[STEP4]["state"] == "failed"  # so that upload-all uploads it again
    if gone == "bucket":
        return
    uploader.submit_pending()  # what upload-all does: the files still there are reused
    assert records(checkpoints)[STEP4]["state"] == "uploaded" and "♻️" in caplog.text
    assert uploader.prune(1) == [STEP4]


def test_prune_keeps_a_checkpoint_whose_local_copy_was_replaced(tmp_path: Path) -> None:
    checkpoints, dest = tmp_path / "checkpoints", tmp_path / "uploads"
    make_checkpoint(checkpoints, STEP4)
    make_checkpoint(checkpoints, STEP8, seed=1)
    uploader = Uploader(open_destination(str(dest)), checkpoints, UploadSettings("tar", background=False))
    uploader.submit_pending()
    (dest / f"{STEP4}.tar").write_bytes(b"something else now")
    assert uploader.prune(1) == [] and (checkpoints / STEP4).is_dir()
    assert "different" in records(checkpoints)[STEP4]["error"]


# --- leftovers of dead writers -----------------------------------------------------------------

def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_removed_at_start_and_a_live_ones_kept(tmp_path: Path) -> None:
    dest, host, pid = tmp_path / "uploads", socket.gethostname(), dead_pid()
    (dest / STEP4).mkdir(parents=True)
    dead = [dest / f".tmp-upload-{pid}+{host}+{STEP4}.files.json",
            dest / STEP4 / f".tmp-upload-{pid}+{host}+optimizer.bin",
            dest / f".tmp-upload-{pid}-{STEP8}.tar.zst"]  # the old name, without the host: idle for two hours
    kept = [dest / tmp_upload_name(f"{STEP12}.tar.zst"),  # this process: a live writer
            dest / f".tmp-upload-{pid}+another-host+{STEP8}.tar",  # its pids mean nothing here
            dest / f".tmp-upload-{pid}-{STEP12}.tar"]  # old name, written to a minute ago
    for path in dead + kept:
        path.write_bytes(b"x" * 1000)
    os.utime(dead[2], (time.time() - 7200, time.time() - 7200))
    os.utime(kept[2], (time.time() - 60, time.time() - 60))
    open_destination(str(dest), check_write=False)  # only looking (status): nothing removed
    assert all(path.exists() for path in dead)
    open_destination(str(dest))  # a run (or upload-all) opens it for writing
    assert not any(path.exists() for path in dead) and all(path.exists() for path in kept)


def fill_up(monkeypatch: pytest.MonkeyPatch, at: str) -> None:
    """Writes into a local destination fail with ENOSPC, as on a full disk. at="write": every write, of the parts
    of the files layout (os.pwrite) and of a streamed archive or manifest (into /dev/full, whose writes the
    kernel refuses); at="open": creating any temporary file after the first."""
    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return builtins.open("/dev/full" if TMP_UPLOAD_PREFIX in str(file) else file, mode, *args, **kwargs)

    created, real_open = [0], os.open

    def open_second(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if TMP_UPLOAD_PREFIX in str(path):
            created[0] += 1
            if created[0] > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kwargs)

    if at == "write":
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(storage_local, "open", open_full, raising=False)  # the module's open, not everyone's
    else:
        monkeypatch.setattr(os, "open", open_second)


@pytest.mark.parametrize("archive_format, full_at", [("files", "write"), ("files", "open"), ("tar", "write")])
def test_a_full_destination_folder_is_one_line_naming_it_and_leaves_nothing_there(
        archive_format: str, full_at: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest, checkpoints = tmp_path / "uploads", tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4)
    storage = open_destination(str(dest))  # opened while there was room
    fill_up(monkeypatch, full_at)
    Uploader(storage, checkpoints,
             UploadSettings(archive_format, background=False, attempts=1, part_bytes=PART)).submit(folder)
    record = records(checkpoints)[STEP4]
    assert record["state"] == "failed" and folder.is_dir()
    written = rf"{STEP4}/\S+" if archive_format == FILES_FORMAT else re.escape(f"{STEP4}.tar")
    assert re.fullmatch(rf"StorageError: upload destination {re.escape(str(dest))}: cannot write {written} "
                        r"\(No space left on device\)", record["error"]), record["error"]
    assert list(dest.iterdir()) == []  # no temporary file, no empty checkpoint folder


def test_part_objects_older_than_a_day_are_removed_at_start(tmp_path: Path, gcs_server: GCSEmulator,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_server.create_bucket("ckpts")
    gcs_server.put("ckpts", f"ck/.parts/{STEP4}/optimizer.bin/0-65536", b"p" * 100)
    open_destination("gs://ckpts/ck")
    assert open_storage("gs://ckpts/ck").list_tree(".parts")  # young: perhaps an upload in progress
    tomorrow = time.time() + 25 * 3600
    monkeypatch.setattr(storage_gcs, "time", SimpleNamespace(time=lambda: tomorrow, sleep=time.sleep))
    open_destination("gs://ckpts/ck")
    assert open_storage("gs://ckpts/ck").list_tree(".parts") == []


# --- restores without a second copy --------------------------------------------------------------

@pytest.mark.parametrize("archive_format", ["files", "tar"])
def test_a_restore_from_the_emulator_holds_one_checkpoint_on_disk(archive_format: str, tmp_path: Path,
                                                                  gcs_server: GCSEmulator,
                                                                  capfd: pytest.CaptureFixture) -> None:
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4, weights=6_000_000, optimizer=12_000_000)
    size = sum(len(data) for data in tree(folder).values())
    storage = open_destination("gs://ckpts/ck")
    Uploader(storage, checkpoints, UploadSettings(archive_format, background=False)).submit(folder)
    target = tmp_path / "restore"
    target.mkdir()
    obj = find_local_or_remote(target, "latest", storage)[1]
    peak, restored = disk_peak(target, lambda: download_checkpoint(storage, obj, target))
    assert tree(restored) == tree(folder)
    assert size <= peak <= size + 1_000_000  # the checkpoint (plus tar headers), never an archive beside it
    assert "100%" in capfd.readouterr().err  # the progress bar
    assert sorted(p.name for p in target.iterdir()) == [STEP4, "uploads.json", "uploads.json.lock"]


def test_a_corrupted_archive_download_leaves_nothing(tmp_path: Path, gcs_server: GCSEmulator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from gcs_emulator import FaultProxy
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4)
    Uploader(open_destination("gs://ckpts/ck"), checkpoints, UploadSettings("tar", background=False)).submit(folder)
    proxy = FaultProxy(gcs_server.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        storage = open_storage("gs://ckpts/ck")
        proxy.add("alt=media", "corrupt", times=1)
        with pytest.raises(UploadError, match="crc32c mismatch"):
            download_checkpoint(storage, storage.stat(f"{STEP4}.tar"), tmp_path / "restore")
        assert not list((tmp_path / "restore").iterdir())
    finally:
        proxy.close()


# --- saying when uploads cannot keep up ------------------------------------------------------------

def test_reports_each_upload_and_warns_once_the_queue_grows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoints = tmp_path / "checkpoints"
    storage = GatedStorage(open_destination(str(tmp_path / "uploads")))
    reports: list[dict[str, Any]] = []
    threads: set[str] = set()

    def report(figures: dict[str, Any]) -> None:
        threads.add(threading.current_thread().name)
        reports.append(figures)
        if len(reports) == 1:
            raise RuntimeError("a broken callback")  # logged, and the uploads go on

    uploader = Uploader(storage, checkpoints, UploadSettings(streams=2), report=report)  # type: ignore[arg-type]
    names = [STEP4, STEP8, STEP12]
    with caplog.at_level("WARNING"):
        for seed, name in enumerate(names):
            uploader.submit_new(make_checkpoint(checkpoints, name, seed=seed))
    warnings = [r.message for r in caplog.records if "not keeping up" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith(f"⚠️  Uploads are not keeping up: {STEP12} joins 2 ")
    assert "save_steps" in warnings[0] and "save_every_minutes" in warnings[0] and "upload_streams, now 2" in warnings[0]
    storage.gate.set()
    assert uploader.wait(60) == []
    assert all(record["state"] == "uploaded" for record in records(checkpoints).values())
    assert [r["checkpoint"] for r in reports] == names and threads == {"uploader-0"}
    size = sum(len(data) for data in tree(checkpoints / STEP4).values())
    assert set(reports[0]) == {"event", "checkpoint", "bytes", "seconds", "mb_per_s", "streams", "queue"}
    assert reports[0]["event"] == "upload" and reports[0]["bytes"] == size and reports[0]["streams"] == 2
    assert [r["queue"] for r in reports] == [2, 1, 0]
    assert "The upload report callback failed: RuntimeError: a broken callback" in caplog.text


def test_disk_warning_says_when_the_next_save_would_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "checkpoints"
    stuck = [make_checkpoint(checkpoints, name, seed=seed) for seed, name in enumerate((STEP4, STEP8))]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(uploader_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5_000_000, 5_000_000))
    assert disk_warning(checkpoints, 4_000_000, stuck) is None
    line = disk_warning(checkpoints, 6_000_000, stuck)
    assert line is not None and "\n" not in line
    assert line.startswith(f"⚠️  {checkpoints}: 5.0 MB free, the next save needs about 6.0 MB; 2 checkpoint(s) (905.1 KB)")
    assert "upload_streams" in line and "save_every_minutes" in line
    assert "lower keep_checkpoints" in disk_warning(checkpoints, 6_000_000, [])
    uploader = Uploader(open_destination(str(tmp_path / "uploads")), checkpoints, UploadSettings(background=False))
    uploader.submit(stuck[0])
    assert uploader.unverified_checkpoints() == [stuck[1]]
