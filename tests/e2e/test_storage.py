"""utils/storage/: the same contract from the local-folder and the GCS backend (against fake-gcs-server),
plus verification, retries and one-line errors of the GCS backend."""
import base64
import json
import os
from pathlib import Path

import google_crc32c
import pytest
from gcs_emulator import FaultProxy, GCSEmulator, gcs_server  # noqa: F401  (fixture)

from utils.storage import open_storage
from utils.storage.base import NotFoundError, PreconditionFailedError, StorageError, crc32c_of_file
from utils.storage.gcs import make_client


@pytest.fixture(params=["local", "gcs"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty storage location of each backend; the GCS one is gs://bucket/run1 on the emulator."""
    if request.param == "local":
        (tmp_path / "store").mkdir()
        return str(tmp_path / "store")
    server: GCSEmulator = request.getfixturevalue("gcs_server")
    server.create_bucket("bucket")
    return "gs://bucket/run1"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_list_stat_download_upload_delete(storage_url: str, tmp_path: Path) -> None:
    storage = open_storage(storage_url)
    for name, data in [("tokenized_b.npz", b"bb" * 1000), ("tokenized_a.npz", b"a"), ("notes.txt", b"n")]:
        storage.upload_file(write(tmp_path / name, data), name)
    storage.upload_file(write(tmp_path / "deeper", b"d"), "sub/tokenized_c.npz")

    listed = storage.list("tokenized_*.npz")
    assert [info.name for info in listed] == ["tokenized_a.npz", "tokenized_b.npz"]  # sorted, direct children only
    assert [info.size for info in listed] == [1, 2000]
    assert len(storage.list()) == 3
    assert storage.stat("tokenized_b.npz").size == 2000
    assert storage.stat("missing.npz") is None
    assert storage.exists("sub/tokenized_c.npz") and not storage.exists("missing.npz")

    dest = tmp_path / "out" / "b.npz"
    info = storage.download("tokenized_b.npz", dest)
    assert dest.read_bytes() == b"bb" * 1000
    assert info.crc32c == crc32c_of_file(dest)
    assert not dest.with_name("b.npz.tmp").exists()
    with pytest.raises(NotFoundError):
        storage.download("missing.npz", tmp_path / "never")
    assert not (tmp_path / "never").exists()

    storage.delete("notes.txt")
    assert not storage.exists("notes.txt")
    with pytest.raises(NotFoundError):
        storage.delete("notes.txt")


def test_uploads_never_overwrite(storage_url: str, tmp_path: Path) -> None:
    storage = open_storage(storage_url)
    storage.upload_file(write(tmp_path / "first", b"first"), "Checkpoints/c.tar")
    with pytest.raises(PreconditionFailedError, match="already exists"):
        storage.upload_file(write(tmp_path / "second", b"second"), "Checkpoints/c.tar")
    with pytest.raises(PreconditionFailedError):
        with storage.open_writer("Checkpoints/c.tar") as writer:
            writer.write(b"third")
    storage.download("Checkpoints/c.tar", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"first"


def test_open_writer_streams_and_an_error_leaves_nothing(storage_url: str, tmp_path: Path) -> None:
    storage = open_storage(storage_url)
    parts = [os.urandom(3_000_000) for _ in range(4)]  # over one resumable chunk in total
    with storage.open_writer("stream.bin") as writer:
        for part in parts:
            writer.write(part)
    storage.download("stream.bin", tmp_path / "stream.bin")
    assert (tmp_path / "stream.bin").read_bytes() == b"".join(parts)

    with pytest.raises(RuntimeError):
        with storage.open_writer("broken.bin") as writer:
            writer.write(b"half of it")
            raise RuntimeError("the archiver failed")
    assert not storage.exists("broken.bin")
    assert [info.name for info in storage.list()] == ["stream.bin"]


def test_crc32c_matches_what_gcs_reports(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    gcs_server.create_bucket("bucket")
    data = os.urandom(100_000)
    gcs_server.put("bucket", "blob", data)  # uploaded without our code: the server computes the crc32c
    expected = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
    assert open_storage("gs://bucket").stat("blob").crc32c == expected == crc32c_of_file(write(tmp_path / "f", data))


def test_download_cut_halfway_or_corrupted_is_retried(gcs_server: GCSEmulator, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_server.create_bucket("bucket")
    data = os.urandom(2_000_000)
    gcs_server.put("bucket", "shard.npz", data)
    proxy = FaultProxy(gcs_server.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    storage = open_storage("gs://bucket")
    try:
        for action in ("cut", "corrupt", "503"):
            proxy.add("alt=media", action, times=1)
            dest = tmp_path / f"{action}.npz"
            storage.download("shard.npz", dest)
            assert dest.read_bytes() == data, action
        assert proxy.hits["alt=media"] == 6  # each fault cost exactly one extra request

        proxy.add("alt=media", "corrupt", times=100)
        with pytest.raises(StorageError, match="crc32c mismatch"):
            storage.download("shard.npz", tmp_path / "bad.npz")
        assert not (tmp_path / "bad.npz").exists() and not (tmp_path / "bad.npz.tmp").exists()
    finally:
        proxy.close()


def test_errors_are_one_line(gcs_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundError, match=r"^gs://no-such-bucket: bucket does not exist$"):
        open_storage("gs://no-such-bucket/x").list()

    gcs_server.create_bucket("bucket")
    proxy = FaultProxy(gcs_server.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        proxy.add("/o", "403", times=1)
        with pytest.raises(StorageError, match="permission denied") as error:
            open_storage("gs://bucket").list()
        assert "\n" not in str(error.value)
    finally:
        proxy.close()

    gcs_server.stop()
    with pytest.raises(StorageError, match="still failing after 1 s of retries") as error:
        open_storage("gs://bucket", retry_deadline_s=1).list()
    assert "\n" not in str(error.value)


def test_credentials_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login here
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and no metadata server to probe
    client, auth = make_client(None)
    assert auth == "anonymous access (no credentials found)"
    assert client._credentials.__class__.__name__ == "AnonymousCredentials"

    with pytest.raises(StorageError, match="credentials file does not exist"):
        make_client(str(tmp_path / "missing.json"))
    with pytest.raises(StorageError, match="not a usable service-account key"):
        make_client(str(write(tmp_path / "key.json", b'{"type": "service_account"}')))

    user_login = {"type": "authorized_user", "client_id": "id", "client_secret": "secret", "refresh_token": "token"}
    adc = write(tmp_path / "adc.json", json.dumps(user_login).encode())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    assert make_client(None)[1] == "Application Default Credentials"

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert make_client(None)[1] == "emulator at http://127.0.0.1:9 (anonymous)"


def test_local_storage_reports_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="folder does not exist"):
        open_storage(str(tmp_path / "nowhere")).list()


def test_local_destination_that_drops_out_is_not_recreated_on_the_boot_disk(tmp_path: Path) -> None:
    mounted = tmp_path / "mnt" / "checkpoints"
    mounted.mkdir(parents=True)
    storage = open_storage(str(mounted))
    storage.upload_file(write(tmp_path / "a.bin", b"first"), "a.bin")  # the run's first upload
    for path in mounted.iterdir():
        path.unlink()
    mounted.rmdir()  # what unmounting the filesystem that held it looks like from here
    with pytest.raises(NotFoundError, match="destination folder is gone"):
        storage.upload_file(write(tmp_path / "b.bin", b"second"), "b.bin")
    assert not mounted.exists()

    mounted.mkdir()  # an empty mount point left behind: a folder again, on this test's filesystem
    storage._root_device = os.stat(tmp_path).st_dev + 1  # as if the first upload had gone to a mounted filesystem
    with pytest.raises(StorageError, match="another filesystem"):
        storage.upload_file(write(tmp_path / "b.bin", b"second"), "b.bin")
    assert list(mounted.iterdir()) == []


def test_a_broken_google_application_credentials_is_an_error_not_anonymous_access(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login to fall back on
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    missing = tmp_path / "missing-key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    # Refused before any request: there is no server to talk to here.
    with pytest.raises(StorageError, match=f"^GOOGLE_APPLICATION_CREDENTIALS={missing}: credentials file does not "
                                           "exist$"):
        open_storage("gs://bucket/Checkpoints")

    for broken in (b"not json at all", b'{"type": "no_such_type"}'):
        key = write(tmp_path / "key.json", broken)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        with pytest.raises(StorageError, match=f"^GOOGLE_APPLICATION_CREDENTIALS={key}: not usable credentials") \
                as error:
            make_client(None)
        assert "\n" not in str(error.value)

