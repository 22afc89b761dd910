"""Credentials stay out of everything a run writes: a service-account key whose private key and id are
recognisable is given to a run (--gcs-credentials, and GOOGLE_APPLICATION_CREDENTIALS), and neither appears in its
output, logs, metrics, TensorBoard events (the trackers' hyperparameters), checkpoints or uploads. Its path may:
it names a file on the machine, not the secret."""
import json
from pathlib import Path

import pytest

from conftest import read_metrics, run_train, write_config

CANARY = "LEAK-CANARY-7f3e9c"


def fake_key(folder: Path) -> Path:
    key = folder / "key.json"
    key.write_text(json.dumps({
        "type": "service_account", "project_id": "canary-project", "private_key_id": f"{CANARY}-id",
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{CANARY}-secret\n-----END PRIVATE KEY-----\n",
        "client_email": "trainer@canary-project.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    return key


def files_holding(folder: Path, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def test_a_key_never_reaches_the_logs_checkpoints_or_uploads(tmp_path: Path, sample_data: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    key = fake_key(secrets)
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(run, sample_data, max_steps=4, save_steps=2, upload_destination=str(run / "uploads"),
                          gcs_credentials=str(key))
    result = run_train("--config", str(config), env={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run / "logs") and list((run / "logs").rglob("events.out.tfevents.*"))
    assert list((run / "uploads").iterdir()) and list((run / "checkpoints").glob("checkpoint-*"))
    # The scan reads every file: the key's path is recorded (training_config.json, the trackers' hyperparameters).
    assert files_holding(run, str(key))
    assert files_holding(run, CANARY) == []
    assert CANARY not in result.stdout + result.stderr


def test_a_key_that_cannot_be_used_is_refused_without_its_content(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)  # the key is read only for the real GCS
    key = fake_key(tmp_path)
    config = write_config(tmp_path, "gs://canary-bucket/shards", gcs_credentials=str(key))
    result = run_train("--config", str(config))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{key}: not a usable service-account key" in errors[0]
    assert CANARY not in result.stdout + result.stderr
    assert files_holding(tmp_path, CANARY) == [str(key)]
