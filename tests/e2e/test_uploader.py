"""utils/uploads/uploader.py and scripts/upload_manager.py against a local folder and fake-gcs-server (no training)."""
import errno
import filecmp
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gcs_emulator import FaultProxy, GCSEmulator, gcs_server  # noqa: F401  (the fixture)

from configs.training_config import ARCHIVE_FORMATS, ConfigError, TrainingConfig
from conftest import REPO_ROOT, GatedStorage
from scripts import upload_manager
from utils.errors import UploadError
from utils.storage import open_storage
from utils.storage.base import crc32c_of_file
from utils.storage.local import LocalStorage
from utils.uploads.destination import (
    check_fresh_destination,
    download_checkpoint,
    find_local_or_remote,
    open_destination,
)
from utils.uploads.formats import TAR_FORMATS, HashingWriter, extract_archive, write_archive
from utils.uploads.manifest import UploadManifest, prune_without_uploads
from utils.uploads.uploader import Uploader, UploadSettings

STEP4, STEP8 = "checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step8-files0"
STEP12 = "checkpoint-epoch0-step12-files0"


def make_checkpoint(checkpoint_dir: Path, name: str, seed: int = 0, size: int = 300_000) -> Path:
    """A folder shaped like a checkpoint: random-like weights, JSON files and a nested folder."""
    folder = checkpoint_dir / name
    (folder / "nested").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(size))
    (folder / "metadata.json").write_text(json.dumps({"step": int(name.split("step")[1].split("-")[0])}))
    (folder / "nested" / "random_states_0.pkl").write_bytes(bytes(range(256)) * 10)
    return folder


def same_tree(a: Path, b: Path) -> bool:
    comparison = filecmp.dircmp(a, b)
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file()]
    return (not comparison.left_only and not comparison.right_only
            and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
            and sorted(files) == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()))


def records(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((checkpoint_dir / "uploads.json").read_text())["checkpoints"]


@pytest.mark.parametrize("archive_format", TAR_FORMATS)
def test_archive_round_trip_is_deterministic_and_measured(tmp_path: Path, archive_format: str) -> None:
    folder = make_checkpoint(tmp_path / "checkpoints", STEP4)
    archive = tmp_path / f"{STEP4}.{archive_format}"
    with open(archive, "wb") as handle:
        sink = HashingWriter(handle)
        write_archive(folder, sink, archive_format)
    assert sink.size == archive.stat().st_size and sink.crc32c == crc32c_of_file(archive)
    again = HashingWriter()
    write_archive(folder, again, archive_format)
    assert (again.size, again.crc32c) == (sink.size, sink.crc32c)  # same bytes: an identical remote counts as done
    restored = extract_archive(archive, archive_format, tmp_path / "restored", STEP4)
    assert restored == tmp_path / "restored" / STEP4 and same_tree(folder, restored)
    assert not list((tmp_path / "restored").glob(".tmp-*"))


def test_original_tar_gz_from_the_tar_tool_is_readable(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "checkpoints", STEP4)
    archive = tmp_path / f"{STEP4}.tar.gz"
    shutil.make_archive(str(tmp_path / STEP4), "gztar", root_dir=folder.parent, base_dir=STEP4)
    assert same_tree(folder, extract_archive(archive, "tar.gz", tmp_path / "restored", STEP4))


def test_an_archive_with_foreign_entries_is_refused(tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "checkpoints", STEP8)
    archive = tmp_path / "bad.tar"
    with open(archive, "wb") as handle:
        write_archive(other, handle, "tar")
    with pytest.raises(UploadError, match="outside"):
        extract_archive(archive, "tar", tmp_path / "restored", STEP4)
    assert not (tmp_path / "restored" / STEP4).exists() and not list((tmp_path / "restored").iterdir())


def test_config_validates_upload_fields() -> None:
    assert TrainingConfig(upload_destination="gs://bucket/Checkpoints", archive_format="tar").archive_format == "tar"
    assert (TrainingConfig().archive_format, TrainingConfig().upload_streams) == ("files", 16)
    assert set(ARCHIVE_FORMATS) == {"files", "tar.zst", "tar", "tar.gz"}
    with pytest.raises(ConfigError, match="archive_format"):
        TrainingConfig(archive_format="zip")
    with pytest.raises(ConfigError, match="upload_workers"):
        TrainingConfig(upload_workers=0)
    for bad in (0, -2, True):
        with pytest.raises(ConfigError, match="^upload_streams must be a positive integer"):
            TrainingConfig(upload_streams=bad)
    with pytest.raises(ConfigError, match="names no bucket"):
        TrainingConfig(upload_destination="gs://")


def test_local_folder_round_trip_and_resume_lookup(tmp_path: Path) -> None:
    checkpoints, dest = tmp_path / "checkpoints", tmp_path / "uploads"
    folder = make_checkpoint(checkpoints, STEP4)
    uploader = Uploader(open_destination(str(dest)), checkpoints, UploadSettings("tar.zst", retry_delay_s=0.05))
    uploader.submit(folder)
    assert uploader.wait(30) == []
    remote = dest / f"{STEP4}.tar.zst"
    record = records(checkpoints)[STEP4]
    assert record["state"] == "uploaded" and record["remote_url"] == str(remote) and record["attempts"] == 1
    assert record["size"] == remote.stat().st_size and record["crc32c"] == crc32c_of_file(remote)
    assert json.loads((checkpoints / "uploads.json").read_text())["destination"] == str(dest)

    elsewhere = tmp_path / "other-machine"
    info, obj = find_local_or_remote(elsewhere, "latest", uploader.storage)
    assert info.step == 4 and obj is not None and not info.path.exists()
    download_checkpoint(uploader.storage, obj, elsewhere)
    assert same_tree(folder, elsewhere / STEP4)
    assert records(elsewhere)[STEP4]["state"] == "uploaded"  # not uploaded again from there
    with pytest.raises(UploadError, match="not found .*existing: " + STEP4):
        find_local_or_remote(elsewhere, STEP8, uploader.storage)


def test_gcs_round_trip_with_crc32c(tmp_path: Path, gcs_server: GCSEmulator) -> None:
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    folder = make_checkpoint(checkpoints, STEP4)
    uploader = Uploader(open_destination("gs://ckpts/Checkpoints"), checkpoints,
                        UploadSettings("tar", retry_delay_s=0.05))
    uploader.submit(folder)
    assert uploader.wait(60) == []
    stored = open_storage("gs://ckpts/Checkpoints").stat(f"{STEP4}.tar")
    record = records(checkpoints)[STEP4]
    assert stored is not None and record["state"] == "uploaded"
    assert (record["size"], record["crc32c"]) == (stored.size, stored.crc32c)
    assert record["remote_url"] == f"gs://ckpts/Checkpoints/{STEP4}.tar"

    shutil.rmtree(folder)
    info, obj = find_local_or_remote(checkpoints, "latest", uploader.storage)
    assert obj is not None
    download_checkpoint(uploader.storage, obj, checkpoints)
    with open(tmp_path / "again.tar", "wb") as handle:
        write_archive(info.path, handle, "tar")
    assert crc32c_of_file(tmp_path / "again.tar") == stored.crc32c  # the unpacked copy is the same checkpoint


def test_name_collision_identical_is_done_different_is_a_clear_error(tmp_path: Path, gcs_server: GCSEmulator) -> None:
    gcs_server.create_bucket("ckpts")
    first, second = tmp_path / "run1", tmp_path / "run2"
    make_checkpoint(first, STEP4)
    shutil.copytree(first, second)  # the same checkpoint on another machine (copy2 keeps mtimes)
    make_checkpoint(first, STEP8, seed=1)
    make_checkpoint(second, STEP8, seed=2)  # same name, different weights
    storage = open_destination("gs://ckpts/ck")
    uploader = Uploader(storage, first, UploadSettings("tar.zst", background=False, retry_delay_s=0.05))
    uploader.submit_pending()
    before = {o.name: o.generation for o in storage.list()}

    other = Uploader(storage, second, UploadSettings("tar.zst", background=False, retry_delay_s=0.05))
    other.submit_pending()
    result = records(second)
    assert result[STEP4]["state"] == "uploaded"
    assert result[STEP8]["state"] == "failed" and result[STEP8]["attempts"] == 1
    assert "already exists and differs" in result[STEP8]["error"] and "refusing to overwrite" in result[STEP8]["error"]
    assert {o.name: o.generation for o in storage.list()} == before  # nothing overwritten
    assert other.prune(1) == [STEP4]  # the conflicting one is never deleted locally
    assert (second / STEP8).is_dir()


class _StopOnFirstWrite:
    """Wraps a Storage: the first upload stream stops the emulator once its first bytes are written, and a
    thread starts it again after `outage_s`."""

    def __init__(self, inner: Any, server: GCSEmulator, outage_s: float) -> None:
        self.inner, self.server, self.outage_s = inner, server, outage_s
        self.url, self.auth = inner.url, inner.auth
        self.stopped = threading.Event()
        self.restart: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_writer(self, name: str) -> Any:
        writer = self.inner.open_writer(name)
        outer = self
        original_write = writer.write

        def write(data: bytes) -> int:
            if not outer.stopped.is_set():
                outer.stopped.set()
                outer.server.stop()
                outer.restart = threading.Timer(outer.outage_s, outer.server.start)
                outer.restart.start()
            return original_write(data)

        writer.write = write
        return writer


def test_emulator_stopped_mid_upload_is_retried_and_nothing_is_deleted_meanwhile(
        tmp_path: Path, gcs_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCS_RETRY_DEADLINE_S", "1")  # the client gives up fast, so the uploader's retry must act
    monkeypatch.setenv("GCS_TIMEOUT_S", "2")
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, STEP4)
    storage = _StopOnFirstWrite(open_destination("gs://ckpts/ck"), gcs_server, outage_s=3.0)
    uploader = Uploader(storage, checkpoints,  # type: ignore[arg-type]
                        UploadSettings("tar", attempts=8, retry_delay_s=0.5))
    uploader.submit(checkpoints / STEP4)
    assert storage.stopped.wait(30)
    make_checkpoint(checkpoints, STEP8)
    assert uploader.prune(1) == []  # STEP4 is not verified yet: kept, though beyond keep=1
    assert uploader.wait(120) == []
    record = records(checkpoints)[STEP4]
    assert record["state"] == "uploaded" and record["attempts"] >= 2
    stored = open_storage("gs://ckpts/ck").stat(f"{STEP4}.tar")
    assert stored is not None and stored.crc32c == record["crc32c"]
    assert uploader.prune(1) == [STEP4]  # verified now, so it may go


def test_upload_manager_finishes_what_failed_during_an_outage(
        tmp_path: Path, gcs_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("GCS_RETRY_DEADLINE_S", "1")
    monkeypatch.setenv("GCS_TIMEOUT_S", "2")
    gcs_server.create_bucket("ckpts")
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, STEP4)
    make_checkpoint(checkpoints, STEP8)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"checkpoint_dir": str(checkpoints), "upload_destination": "gs://ckpts/ck",
                                  "archive_format": "tar.gz", "upload_attempts": 2}))
    assert upload_manager.main(["upload", STEP4, "--config", str(config)]) == 0
    gcs_server.stop()
    uploader = Uploader(open_storage("gs://ckpts/ck"), checkpoints,
                        UploadSettings("tar.gz", background=False, attempts=2, retry_delay_s=0.05, keep_local=1))
    uploader.submit(checkpoints / STEP8)
    assert records(checkpoints)[STEP8]["state"] == "failed" and records(checkpoints)[STEP8]["attempts"] == 2
    assert (checkpoints / STEP8).is_dir()
    gcs_server.start()
    capsys.readouterr()

    assert upload_manager.main(["status", "--config", str(config)]) == 0
    status = capsys.readouterr().out
    row4 = next(line for line in status.splitlines() if line.startswith(STEP4))
    row8 = next(line for line in status.splitlines() if line.startswith(STEP8))
    assert "uploaded" in row4 and "tar.gz" in row4 and "failed" in row8 and "2 attempt(s)" in row8

    assert upload_manager.main(["upload-all", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{STEP4}: already uploaded and verified" in out and "1 uploaded, 0 failed" in out
    assert records(checkpoints)[STEP8]["state"] == "uploaded" and records(checkpoints)[STEP8]["attempts"] == 3
    assert upload_manager.main(["list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("uploaded") == 2


def test_upload_manager_bad_input_is_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"checkpoint_dir": str(tmp_path / "checkpoints"),
                                  "upload_destination": str(tmp_path / "up")}))
    assert upload_manager.main(["upload", STEP4, "--config", str(config)]) == 2
    assert f"checkpoint '{STEP4}' not found" in capsys.readouterr().err
    config.write_text(json.dumps({"checkpoint_dir": str(tmp_path / "checkpoints")}))
    assert upload_manager.main(["status", "--config", str(config)]) == 2
    assert "no upload_destination" in capsys.readouterr().err


def test_a_fresh_run_refuses_a_destination_that_holds_checkpoints(tmp_path: Path) -> None:
    dest = tmp_path / "uploads"
    storage = open_destination(str(dest))
    check_fresh_destination(storage)  # empty: fine
    (dest / f"{STEP8}.tar.zst").write_bytes(b"an earlier run's checkpoint")
    (dest / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(UploadError, match=f"already holds checkpoints \\(newest {STEP8}\\).*--resume latest"):
        check_fresh_destination(storage)


def test_a_full_queue_keeps_checkpoints_local_until_a_place_frees(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    names = [f"checkpoint-epoch0-step{step}-files0" for step in (2, 4, 6, 8)]
    storage = GatedStorage(open_destination(str(tmp_path / "uploads")))
    uploader = Uploader(storage, checkpoints, UploadSettings("tar", queue_size=1))  # type: ignore[arg-type]
    for index, name in enumerate(names):
        uploader.submit(make_checkpoint(checkpoints, name, seed=index))
        if index == 0:  # let the worker take the first one and block on the gate
            assert _wait_for(lambda: records(checkpoints)[names[0]]["state"] == "uploading")
    states = {name: record["state"] for name, record in records(checkpoints).items()}
    assert states == {names[0]: "uploading", names[1]: "queued", names[2]: "local", names[3]: "local"}
    assert uploader.unfinished() == names
    storage.gate.set()
    assert uploader.wait(60) == []
    assert all(records(checkpoints)[name]["state"] == "uploaded" for name in names)


def _wait_for(condition: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_new_checkpoint_under_an_uploaded_name_is_uploaded_or_kept_never_pruned(tmp_path: Path) -> None:
    # Run A uploads steps 4 and 8 and prunes them locally; run B resumes from an older checkpoint and saves
    # new checkpoints under the same names, while uploads.json still says "uploaded" for them.
    checkpoints, dest = tmp_path / "checkpoints", tmp_path / "uploads"
    run_a = Uploader(open_destination(str(dest)), checkpoints, UploadSettings("tar", background=False))
    for seed, name in enumerate((STEP4, STEP8)):
        run_a.submit_new(make_checkpoint(checkpoints, name, seed=seed))
        shutil.rmtree(checkpoints / name)  # pruned, or moved away to resume from an older step
    old_step8 = (dest / f"{STEP8}.tar").read_bytes()
    (dest / f"{STEP4}.tar").unlink()  # gone from the destination too (deleted by hand)

    run_b = Uploader(open_destination(str(dest)), checkpoints, UploadSettings("tar", background=False))
    for seed, name in enumerate((STEP4, STEP8, STEP12), start=10):
        run_b.submit_new(make_checkpoint(checkpoints, name, seed=seed))
    assert run_b.prune(1) == [STEP4]  # uploaded anew, so it may go; STEP8 may not
    result = records(checkpoints)
    assert result[STEP4]["state"] == "uploaded" and result[STEP4]["attempts"] == 1
    assert result[STEP4]["crc32c"] == crc32c_of_file(dest / f"{STEP4}.tar")
    assert result[STEP8]["state"] == "failed" and "already exists and differs" in result[STEP8]["error"]
    assert (checkpoints / STEP8).is_dir()  # the new weights are kept locally
    assert (dest / f"{STEP8}.tar").read_bytes() == old_step8  # and the old ones are not overwritten
    assert run_b.finish(1) == [STEP8]


def _fail_recording(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Makes uploads.json unwritable (disk full) for the worker's "uploading" and "failed" records while
    the returned flag is set; queueing still records."""
    real_update = UploadManifest.update
    disk_full = [True]

    def update(self: UploadManifest, name: str, **changes: Any) -> Any:
        if disk_full[0] and changes.get("state") in ("uploading", "failed"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_update(self, name, **changes)

    monkeypatch.setattr(UploadManifest, "update", update)
    return disk_full


def test_a_worker_survives_an_unwritable_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "checkpoints"
    uploader = Uploader(open_destination(str(tmp_path / "uploads")), checkpoints,
                        UploadSettings("tar", retry_delay_s=0.01))
    disk_full = _fail_recording(monkeypatch)
    uploader.submit_new(make_checkpoint(checkpoints, STEP4))
    assert uploader.wait(30) == []
    disk_full[0] = False
    uploader.submit_new(make_checkpoint(checkpoints, STEP8, seed=1))
    assert uploader.wait(30) == []
    assert records(checkpoints)[STEP8]["state"] == "uploaded"  # the worker went on with the next checkpoint
    assert uploader.prune(1) == [] and (checkpoints / STEP4).is_dir()  # never uploaded: kept


def test_finish_reports_an_upload_whose_result_was_never_recorded(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "checkpoints"
    uploader = Uploader(open_destination(str(tmp_path / "uploads")), checkpoints,
                        UploadSettings("tar", retry_delay_s=0.01))
    _fail_recording(monkeypatch)
    uploader.submit_new(make_checkpoint(checkpoints, STEP4))
    assert uploader.wait(30) == []
    assert records(checkpoints)[STEP4]["state"] == "queued"
    assert uploader.finish(1) == [STEP4]  # reported, though its record does not say "failed"


def test_a_read_only_gcs_destination_is_refused_at_start(gcs_server: GCSEmulator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_server.create_bucket("ckpts")
    proxy = FaultProxy(gcs_server.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        proxy.add("POST /upload/", "403", times=100)  # reads work, writes are refused: a public bucket
        with pytest.raises(UploadError, match=r"^upload destination gs://ckpts/ck: cannot write \(.*permission "
                                              "denied") as error:
            open_destination("gs://ckpts/ck")
        assert "\n" not in str(error.value)
        open_destination("gs://ckpts/ck", check_write=False)  # looking only needs reading
    finally:
        proxy.close()


def test_a_read_only_local_destination_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "uploads"
    dest.mkdir()

    def refused(self: LocalStorage, name: str) -> None:  # as a read-only mount (chmod does not stop root)
        raise PermissionError(13, "Permission denied", str(dest / name))

    monkeypatch.setattr(LocalStorage, "open_writer", refused)
    # Listing works on such a folder: only the write probe finds out, before any training.
    with pytest.raises(UploadError, match=f"^upload destination {dest}: cannot write \\(.*Permission denied"):
        open_destination(str(dest))
    assert not list(dest.iterdir())


def test_the_write_probe_leaves_nothing_behind(tmp_path: Path, gcs_server: GCSEmulator) -> None:
    dest = tmp_path / "uploads"
    open_destination(str(dest))
    assert dest.is_dir() and not list(dest.iterdir())
    gcs_server.create_bucket("ckpts")
    storage = open_destination("gs://ckpts/ck")
    assert [line for line in gcs_server.requests("DELETE ") if "/o/ck%2F.write-probe-" in line]  # it was written
    assert storage.list() == []


def test_a_run_without_uploads_keeps_what_an_earlier_run_left_unuploaded(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for name in (STEP4, STEP8, STEP12):
        make_checkpoint(checkpoints, name, size=1000)
    manifest = UploadManifest(checkpoints, str(tmp_path / "uploads"))
    manifest.update(STEP4, state="failed", error="network down")
    manifest.update(STEP8, state="uploaded", remote_url=str(tmp_path / "uploads" / STEP8))
    assert prune_without_uploads(checkpoints, 1) == [STEP8]
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == [STEP12, STEP4]


def test_upload_manager_list_of_a_missing_folder_is_an_error_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nonexist"
    for command in (["list"], ["upload-all", "--destination", str(tmp_path / "up")]):
        assert upload_manager.main([*command, "--checkpoint-dir", str(missing)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(missing) in err and "does not exist" in err
        assert len(err.strip().splitlines()) == 1
        assert not missing.exists()


def test_upload_manager_destination_that_is_not_a_folder_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, STEP4, size=1000)
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    for destination in (afile, afile / "sub"):
        for command in (["status"], ["upload", STEP4]):
            code = upload_manager.main([*command, "--checkpoint-dir", str(checkpoints),
                                        "--destination", str(destination)])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith(f"error: upload destination {destination}: "), (command, err)
            assert len(err.strip().splitlines()) == 1


def test_upload_manager_status_shows_only_records_of_its_destination(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoints, real, scratch = tmp_path / "checkpoints", tmp_path / "real", tmp_path / "scratch"
    make_checkpoint(checkpoints, STEP4, size=1000)
    make_checkpoint(checkpoints, STEP8, size=1000)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"checkpoint_dir": str(checkpoints), "upload_destination": str(real),
                                  "archive_format": "tar", "upload_attempts": 1}))
    assert upload_manager.main(["upload-all", "--config", str(config)]) == 0
    # Uploads elsewhere: STEP4 succeeds, STEP8 meets a different object under its name and fails.
    scratch.mkdir()
    (scratch / f"{STEP8}.tar").write_bytes(b"some other checkpoint")
    capsys.readouterr()
    assert upload_manager.main(["upload", STEP4, "--config", str(config), "--destination", str(scratch)]) == 0
    assert f"{STEP4}: uploads.json's record of its upload to {real} (uploaded) is replaced" in capsys.readouterr().out
    assert upload_manager.main(["upload", STEP8, "--config", str(config), "--destination", str(scratch)]) == 1
    capsys.readouterr()

    assert upload_manager.main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("checkpoint-")}
    assert set(rows) == {STEP4, STEP8}
    for row in rows.values():  # verified at the real destination, so neither failed nor pending
        assert "failed" not in row and "pending" not in row and "at the destination, not verified" in row
    assert "2 record(s)" in out and f"another destination than {real}" in out
    assert upload_manager.main(["list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out and "uploaded" not in out.split("\n", 1)[1].split("note:")[0]
    # The scratch destination's own view shows its records.
    assert upload_manager.main(["status", "--config", str(config), "--destination", str(scratch)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint-")}
    assert " uploaded " in rows[STEP4] and " failed " in rows[STEP8]
    # upload-all at the real destination finds both there, identical, and records them again.
    assert upload_manager.main(["upload-all", "--config", str(config)]) == 0
    assert "2 uploaded, 0 failed" in capsys.readouterr().out
    assert all(record["remote_url"].startswith(str(real)) for record in records(checkpoints).values())


# --- upload_manager: the local side first, the recorded destination, one-line errors ---------------------

def test_upload_all_with_nothing_to_upload_never_touches_the_network(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("GCS_RETRY_DEADLINE_S", "120")  # a network call would retry for two minutes

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the destination was opened")

    monkeypatch.setattr(upload_manager, "open_destination", no_network)
    (tmp_path / "checkpoints").mkdir()
    code = upload_manager.main(["upload-all", "--checkpoint-dir", str(tmp_path / "checkpoints"),
                                "--destination", "gs://refocused-ai/Checkpoints"])
    assert code == 0
    assert capsys.readouterr().out == f"No checkpoints to upload in {tmp_path / 'checkpoints'}\n"
    code = upload_manager.main(["upload", STEP4, "--checkpoint-dir", str(tmp_path / "checkpoints"),
                                "--destination", "gs://refocused-ai/Checkpoints"])
    assert code == 2 and f"checkpoint '{STEP4}' not found" in capsys.readouterr().err


def test_an_unreachable_destination_is_one_line_naming_it_once_with_its_reason(
        gcs_server: GCSEmulator, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCS_RETRY_DEADLINE_S", "1")
    gcs_server.stop()
    with caplog.at_level("WARNING"), pytest.raises(UploadError) as error:
        open_destination("gs://ckpts/Checkpoints")
    message = str(error.value)
    assert message.startswith("upload destination gs://ckpts/Checkpoints: still failing after 1 s of retries: "
                              "ConnectionError: ")
    assert message.count("gs://ckpts/Checkpoints") == 1 and "\n" not in message and len(message) < 400
    assert "Connection refused" in message[-40:]  # the reason, at the end of the library's message, is kept
    retrying = [r.message for r in caplog.records if "retrying for up to 1 s" in r.message]
    assert len(retrying) == 1 and retrying[0].startswith("⏳ listing gs://ckpts/Checkpoints failed (ConnectionError")


def test_status_of_a_folder_uses_the_destination_recorded_there(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoints, recorded, default = tmp_path / "checkpoints", tmp_path / "recorded", tmp_path / "default"
    make_checkpoint(checkpoints, STEP4, size=1000)
    Uploader(open_destination(str(recorded)), checkpoints,
             UploadSettings("files", background=False)).submit(checkpoints / STEP4)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"upload_destination": str(default)}))  # another run's bucket
    default.mkdir()
    assert upload_manager.main(["status", "--config", str(config), "--checkpoint-dir", str(checkpoints)]) == 0
    out = capsys.readouterr().out
    assert f"Destination {recorded}: recorded in {checkpoints / 'uploads.json'}" in out and f"Remote: {recorded}" in out
    row = next(line for line in out.splitlines() if line.startswith(STEP4))
    assert " uploaded " in row and " files " in row and "3.6 KB" in row  # the checkpoint's, not its manifest's
    assert upload_manager.main(["status", "--config", str(config), "--checkpoint-dir", str(checkpoints),
                                "--destination", str(default)]) == 0
    out = capsys.readouterr().out
    assert "recorded in" not in out and f"Remote: {default}" in out


# --- upload_manager: issue #26 (subfolder hint, verified checkpoints, stream counts, light imports) ---------------

def test_list_and_upload_all_name_the_subfolder_that_holds_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """After `bash run.sh tiny` the checkpoints are in checkpoints/tiny, not in the default config's checkpoints/."""
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints / "tiny", STEP4, size=1000)
    hint = f"; {checkpoints / 'tiny'} holds some: pass --checkpoint-dir {checkpoints / 'tiny'}"
    assert upload_manager.main(["list", "--checkpoint-dir", str(checkpoints)]) == 0
    assert capsys.readouterr().out == f"No checkpoints in {checkpoints}{hint}\n"
    assert upload_manager.main(["upload-all", "--checkpoint-dir", str(checkpoints),
                                "--destination", str(tmp_path / "up")]) == 0
    assert capsys.readouterr().out == f"No checkpoints to upload in {checkpoints}{hint}\n"
    assert upload_manager.main(["upload", STEP4, "--checkpoint-dir", str(checkpoints),
                                "--destination", str(tmp_path / "up")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint '{STEP4}' not found in {checkpoints} (existing: none){hint}\n"
    assert not (tmp_path / "up").exists()  # nothing was opened at the destination


def test_upload_of_a_verified_checkpoint_says_so_and_force_uploads_it_again(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoints, dest = tmp_path / "checkpoints", tmp_path / "up"
    make_checkpoint(checkpoints, STEP4, size=1000)
    where = ["--checkpoint-dir", str(checkpoints), "--destination", str(dest)]
    assert upload_manager.main(["upload", STEP4, *where]) == 0
    assert capsys.readouterr().out.endswith("1 uploaded, 0 failed\n")
    uploaded = records(checkpoints)[STEP4]

    assert upload_manager.main(["upload", STEP4, *where]) == 0
    out = capsys.readouterr().out
    assert out == (f"⏭️  {STEP4}: already uploaded and verified (pass --force to upload it again)\n"
                   "0 uploaded, 0 failed\n")
    assert records(checkpoints)[STEP4] == uploaded  # not touched: no new attempt

    # The copy at the destination is lost behind uploads.json's back: --force uploads it again.
    shutil.rmtree(dest / STEP4)
    (dest / f"{STEP4}.files.json").unlink()
    assert upload_manager.main(["upload", STEP4, *where, "--force"]) == 0
    assert capsys.readouterr().out == "1 uploaded, 0 failed\n"
    assert same_tree(checkpoints / STEP4, dest / STEP4) and (dest / f"{STEP4}.files.json").is_file()
    assert records(checkpoints)[STEP4]["state"] == "uploaded"


def test_upload_help_explains_force(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        upload_manager.main(["upload", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--force" in text and "already uploaded and verified" in text
    assert "not uploaded again (the tool says so) unless --force" in text


@pytest.mark.parametrize(("archive_format", "background", "expected"), [
    ("files", True, "in the background (2 worker(s), 16 streams each)"),
    ("files", False, "synchronously (16 streams)"),
    ("tar.zst", True, "in the background (2 worker(s), one stream each)"),
    ("tar", True, "in the background (2 worker(s), one stream each)"),
    ("tar.gz", True, "in the background (2 worker(s), one stream each)"),
    ("tar.gz", False, "synchronously (one stream)"),
])
def test_the_upload_mode_line_counts_the_streams_each_format_uses(
        tmp_path: Path, archive_format: str, background: bool, expected: str) -> None:
    """train.py's start-up line ("Uploads: ... (1 worker(s), 16 streams each)") said 16 streams for an archive,
    which goes up as one stream."""
    settings = UploadSettings(archive_format, background=background, workers=2, streams=16)
    assert settings.describe() == expected
    uploader = Uploader(LocalStorage(str(tmp_path / "up")), tmp_path / "checkpoints",
                        UploadSettings(archive_format, background=False, streams=16))
    assert uploader.streams == settings.checkpoint_streams  # what the line says is what the uploader does


def test_upload_manager_list_imports_no_torch_transformers_or_accelerate(tmp_path: Path) -> None:
    """Seconds of start-up for a listing: the tool as a user runs it, with Python's import log."""
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "scripts" / "upload_manager.py"),
                           "list", "--checkpoint-dir", str(empty)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"No checkpoints in {empty}\n"
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "utils.uploads.uploader" in imported  # the log is read right
    assert not imported & {"torch", "transformers", "accelerate"}
