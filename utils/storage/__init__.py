"""One small object-storage interface with two backends: a local folder (utils/storage/local.py) and
gs://bucket/prefix (utils/storage/gcs.py, utils/storage/gcs_upload.py); the interface is utils/storage/base.py.

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
import os

from utils.storage.base import Storage, StorageError

GCS_SCHEME = "gs://"


def is_gcs_url(location: str) -> bool:
    return location.startswith(GCS_SCHEME)


def open_storage(url: str, credentials: str | None = None, *, timeout_s: float | None = None,
                 retry_deadline_s: float | None = None) -> Storage:
    """The backend for a local path or gs://bucket/prefix. Creates no bucket and no folder. Each backend is imported
    when needed: the tools that read a local folder start without google-cloud-storage."""
    if not is_gcs_url(url):
        from utils.storage.local import LocalStorage
        return LocalStorage(url)
    from utils.storage.gcs import GCSStorage, make_client
    bucket, _, prefix = url[len(GCS_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket name (expected gs://BUCKET or gs://BUCKET/PREFIX)")
    client, auth = make_client(credentials)
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("GCS_TIMEOUT_S", "60"))
    deadline = retry_deadline_s if retry_deadline_s is not None else float(os.environ.get("GCS_RETRY_DEADLINE_S", "120"))
    return GCSStorage(client, bucket, prefix.strip("/"), auth, timeout, deadline)
