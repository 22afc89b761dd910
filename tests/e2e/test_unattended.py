"""Unattended runs on preemptible machines: one command for every boot (--resume auto), every signal saves, any
config field from the command line, and a destination or log folder never shared by two runs."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gcs_emulator import GCSEmulator, gcs_server  # noqa: F401  (the fixture)

from configs.command_line import config_from_args, parse_args
from configs.training_config import ConfigError, load_config
from conftest import REPO_ROOT, read_metrics, run_train, write_config
from utils.checkpoints.folders import list_checkpoints
from utils.checkpoints.ownership import RUN_ID_FILE, claim_run
from utils.errors import UploadError
from utils.storage import open_storage


def start_train(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for_steps(log_dir: Path, steps: int, process: subprocess.Popen) -> None:
    metrics, deadline = log_dir / "metrics.jsonl", time.monotonic() + 120
    while not metrics.exists() or len(read_metrics(log_dir)) < steps:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)


def test_the_same_command_starts_resumes_after_sighup_and_finishes_like_an_uninterrupted_run(
        tmp_path: Path, sample_data: Path) -> None:
    # Long enough (a few seconds) for the signal to come mid-run.
    options = dict(max_steps=150, save_steps=20, lr_decay_steps=150)
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_train("--config", str(write_config(straight, sample_data, **options))).returncode == 0

    config = write_config(tmp_path, sample_data, **options, upload_destination=str(tmp_path / "uploads"))
    process = start_train(config, "--resume", "auto")  # empty folders: a fresh start
    wait_for_steps(tmp_path / "logs", 5, process)
    process.send_signal(signal.SIGHUP)  # the ssh session closed
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, stderr[-3000:]
    assert "--resume auto: no checkpoint in" in stderr and "SIGHUP received" in stderr
    stopped_at = list_checkpoints(tmp_path / "checkpoints")[-1].step
    assert 5 <= stopped_at < 150

    result = run_train("--config", str(config), "--resume", "auto")  # the next boot: the same command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume auto: resuming the newest checkpoint" in result.stderr
    assert f"Resumed from checkpoint-epoch0-step{stopped_at}-files0" in result.stderr
    resumed = {line["step"]: line["loss"] for line in read_metrics(tmp_path / "logs")}
    assert resumed == {line["step"]: line["loss"] for line in read_metrics(straight / "logs")}  # bit-identical


def test_a_stop_during_validation_is_honoured_between_batches(tmp_path: Path, sample_data: Path) -> None:
    # 40 validation batches of 0.25 s each: the stop comes while the first few are evaluated.
    config = write_config(tmp_path, sample_data, max_steps=100, save_steps=100, eval_holdout_files=1, eval_steps=3,
                          eval_batches=40, per_device_train_batch_size=1, lr_decay_steps=100)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_with_slow_validation.py"),
                                "--config", str(config)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                               "SLOW_BATCH_S": "0.25", "VALIDATION_TRACE": str(tmp_path / "trace")})
    wait_for_steps(tmp_path / "logs", 3, process)  # step 3 logged: its validation is under way
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    batches = len((tmp_path / "trace").read_text().splitlines())
    assert 1 <= batches < 40  # stopped between two batches, not after all 40
    assert [info.step for info in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert not [line for line in read_metrics(tmp_path / "logs") if "eval_loss" in line]  # no half validation


def test_resume_auto_on_a_fresh_disk_takes_the_checkpoints_and_logs_at_the_destination(
        tmp_path: Path, sample_data: Path, gcs_server: GCSEmulator) -> None:
    gcs_server.create_bucket("ckpts")
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    for folder in (first, fresh):
        folder.mkdir()
    options = dict(max_steps=8, save_steps=4, lr_decay_steps=8, upload_destination="gs://ckpts/run1")
    (first / "logs").mkdir()
    (first / "logs" / "notes.txt").write_text("the user's own file: not the run's logs")
    result = run_train("--config", str(write_config(first, sample_data, **options)), "--max-steps", "4",
                       env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]
    # A new machine: empty disks, the same command.
    result = run_train("--config", str(write_config(fresh, sample_data, **options)), "--resume", "auto",
                       env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint-epoch0-step4-files0" in result.stderr and "Downloading" in result.stderr
    run_id = (first / "checkpoints" / RUN_ID_FILE).read_text().strip()
    assert (fresh / "checkpoints" / RUN_ID_FILE).read_text().strip() == run_id  # the same run, carried on
    metadata = json.loads((fresh / "checkpoints" / "checkpoint-epoch0-step8-files0" / "metadata.json").read_text())
    assert metadata["run_id"] == run_id
    # Its logs came back from the destination too: one history, steps 1 to 8, here and there.
    assert "Continued the logs of this run from gs://ckpts/run1/logs" in result.stderr
    assert [line["step"] for line in read_metrics(fresh / "logs")] == list(range(1, 9))
    remote = open_storage("gs://ckpts/run1")
    remote_lines = remote.read_bytes("logs/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in remote_lines if "loss" in line] == list(range(1, 9))
    assert any("events.out.tfevents" in info.name for info in remote.list_tree("logs/refocused-ai"))
    assert {info.name for info in remote.list_tree("logs")} - {info.name for info in
                                                               remote.list_tree("logs/refocused-ai")} == {
        "logs/metrics.jsonl"}


def test_a_destination_or_log_folder_of_another_run_is_refused(tmp_path: Path, sample_data: Path) -> None:
    uploads = str(tmp_path / "uploads")
    first = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, upload_destination=uploads)
    assert run_train("--config", str(first)).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    # Its own checkpoint folder, but the first run's logs: it would append to them.
    shared_logs = write_config(other, sample_data, max_steps=2, log_dir=str(tmp_path / "logs"), upload_destination=None)
    result = run_train("--config", str(shared_logs))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: log_dir {tmp_path / 'logs'} already holds the metrics of another run" in result.stderr
    # A fresh checkpoint folder resuming with another run's id at the destination is refused too.
    (other / "checkpoints").mkdir(exist_ok=True)
    (other / "checkpoints" / RUN_ID_FILE).write_text("0123456789abcdef\n")
    resumed = run_train("--config", str(write_config(other, sample_data, max_steps=4, upload_destination=uploads,
                                                     lr_decay_steps=4)), "--resume", "auto")
    assert resumed.returncode == 2 and f"error: the upload destination {uploads} belongs to another run" in resumed.stderr


def claim_in_a_process(folder: Path, destination: str, barrier: Any, outcomes: Any) -> None:
    config = load_config("tiny").with_repo_paths()
    config.checkpoint_dir, config.log_dir = str(folder / "checkpoints"), str(folder / "logs")
    for path in (config.checkpoint_dir, config.log_dir):
        Path(path).mkdir(parents=True)
    barrier.wait()
    try:
        outcomes.put(claim_run(config, open_storage(destination), resumed=None, auto=False))
    except UploadError as error:
        outcomes.put(str(error))


def test_two_runs_claiming_one_destination_at_the_same_instant_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    context = multiprocessing.get_context("fork")
    barrier, outcomes = context.Barrier(6), context.Queue()
    runs = [context.Process(target=claim_in_a_process, args=(tmp_path / f"run{index}", str(tmp_path / "uploads"),
                                                            barrier, outcomes)) for index in range(6)]
    for run in runs:
        run.start()
    results = [outcomes.get(timeout=60) for _ in runs]
    for run in runs:
        run.join(timeout=60)
    claimed = [result for result in results if re.fullmatch("[0-9a-f]{16}", result)]  # a run id: it won
    assert len(claimed) == 1 and all("another run" in result for result in results if result not in claimed), results
    assert json.loads((tmp_path / "uploads" / RUN_ID_FILE).read_text())["run_id"] == claimed[0]
    assert not [path for path in (tmp_path / "uploads").iterdir() if path.name != RUN_ID_FILE]  # no leftovers


def test_any_field_from_the_command_line_and_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    config = config_from_args(parse_args(["--config", "tiny", "--set", "learning_rate=3e-4", "--set",
                                          "model.seq_len=128", "--set", "trackers=[\"tensorboard\"]", "--set",
                                          "upload_destination=null", "--set", "data=somewhere/else"]))
    assert config.learning_rate == 3e-4 and config.model_shape().seq_len == 128
    assert config.model_shape().hidden_size == 128  # the tiny preset's, untouched by model.seq_len
    assert config.upload_destination is None and config.data == str(Path("somewhere/else").absolute())
    for setting, message in (("learnig_rate=1", "unknown key(s) learnig_rate"), ("max_steps=ten", "max_steps has the "
                             "wrong type"), ("model.layers=3", "unknown model field(s) layers"),
                             ("warmup_steps", "--set 'warmup_steps': expected KEY=VALUE")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_args(parse_args(["--config", "tiny", "--set", setting]))

    result = run_train("--config", "tiny", "--set", "max_steps=7", "--print-config")
    assert result.returncode == 0
    printed = json.loads(result.stdout)
    assert printed["max_steps"] == 7 and printed["model_shape"]["vocab_size"] == 4096
    bad = run_train("--config", "tiny", "--set", "learnig_rate=1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {REPO_ROOT / 'configs' / 'tiny.json'} with learnig_rate=1 from the command line: unknown key(s) "
        "learnig_rate"]


def test_run_sh_help_prints_its_usage() -> None:
    result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: bash run.sh CONFIG [MAX_STEPS]")
    assert "--resume auto" in result.stdout


def test_resume_auto_carries_on_the_run_that_claimed_the_destination_and_nothing_else(tmp_path: Path) -> None:
    remote = open_storage(str(tmp_path / "uploads"))
    (tmp_path / "uploads").mkdir()

    def config_in(name: str) -> Any:
        config = load_config("tiny").with_repo_paths()
        config.checkpoint_dir, config.log_dir = str(tmp_path / name / "checkpoints"), str(tmp_path / name / "logs")
        for path in (config.checkpoint_dir, config.log_dir):
            Path(path).mkdir(parents=True)
        return config

    first = claim_run(config_in("boot1"), remote, resumed=None, auto=True)  # preempted before its first upload
    # The next boot, on a fresh disk: --resume auto finds no checkpoint anywhere and carries on that run.
    assert claim_run(config_in("boot2"), remote, resumed=None, auto=True) == first
    with pytest.raises(UploadError, match="belongs to another run"):  # a fresh start without --resume: refused
        claim_run(config_in("another"), remote, resumed=None, auto=False)
    # A checkpoint folder without its .run-id (copied, say) still names its run in each checkpoint's metadata.
    copied = config_in("copied")
    checkpoint = Path(copied.checkpoint_dir) / "checkpoint-epoch0-step4-files0"
    checkpoint.mkdir()
    (checkpoint / "metadata.json").write_text(json.dumps({"step": 4, "run_id": "0123456789abcdef"}))
    with pytest.raises(UploadError, match=f"belongs to another run \\(run {first}; this one is 0123456789abcdef\\)"):
        claim_run(copied, remote, resumed=checkpoint, auto=False)
