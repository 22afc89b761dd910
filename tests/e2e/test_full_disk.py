"""A full disk anywhere is one line naming the folder, after saving what can still be saved."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, read_metrics, run_train, write_config
from utils.checkpoints.folders import list_checkpoints


def run_on_full_disk(kind: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_with_full_disk.py"), "--config",
                           str(config), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "FULL_DISK": kind})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind, what", [("metrics:4", "metrics.jsonl"), ("tensorboard:4", "the trackers' logs")])
def test_a_full_log_disk_saves_a_checkpoint_then_stops_in_one_line(tmp_path: Path, sample_data: Path, kind: str,
                                                                   what: str) -> None:
    config = write_config(tmp_path, sample_data, max_steps=50, save_steps=50, lr_decay_steps=50)
    result = run_on_full_disk(kind, config)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and 4 <= saved[0].step <= 6  # saved at the step after the failed write
    assert error_lines(result) == [f"error: log_dir {tmp_path / 'logs'}: cannot write {what} (No space left on "
                                   f"device); saved {saved[0].name}"]
    resumed = run_train("--config", str(config), "--resume", "latest", "--max-steps", "8")  # once there is room
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(tmp_path / "logs")[-1]["step"] == 8


def test_a_log_disk_full_before_the_first_step_stops_the_start_in_one_line(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2)
    result = run_on_full_disk("trackers", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"error: log_dir {tmp_path / 'logs'}: cannot write the trackers' logs (No space "
                                   "left on device)"]
    assert list_checkpoints(tmp_path / "checkpoints") == [] and "training:" not in result.stderr


def test_a_full_checkpoint_disk_at_the_upload_record_is_one_line_and_leaves_no_temporary_file(
        tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2, upload_destination=str(tmp_path / "up"))
    result = run_on_full_disk("manifest", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    manifest = tmp_path / "checkpoints" / "uploads.json"
    assert error_lines(result) == [f"error: {manifest}: cannot write (No space left on device)"]
    assert [info.name for info in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-epoch0-step2-files0"]
    assert not manifest.with_name("uploads.json.tmp").exists()
