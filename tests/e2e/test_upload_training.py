"""train.py with checkpoint uploads: background and synchronous, resume from remote, a stalled upload,
kill -9, SIGTERM with a drain timeout, and scripts/upload_manager.py finishing what is left."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from gcs_emulator import GCSEmulator, gcs_server  # noqa: F401  (the fixture)
from safetensors.numpy import load_file

from conftest import REPO_ROOT, read_metrics, run_train, write_config
from utils.checkpoints.folders import list_checkpoints, parse_checkpoint_name
from utils.storage import open_storage
from utils.storage.base import crc32c_of_file


def local_names(checkpoint_dir: Path) -> list[str]:
    return [info.name for info in list_checkpoints(checkpoint_dir)]


def records(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "uploads.json"
    return json.loads(path.read_text())["checkpoints"] if path.exists() else {}


def step_of(name: str) -> int:
    parsed = parse_checkpoint_name(name)
    assert parsed is not None
    return parsed[1]


def losses_by_step(log_dir: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in read_metrics(log_dir) if "loss" in line}


def wait_until(condition: Any, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_train(config: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env})


def run_manager(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "upload_manager.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_background_uploads_verify_prune_and_report(tmp_path: Path, sample_data: Path) -> None:
    dest = tmp_path / "uploads"
    config = write_config(tmp_path, sample_data, max_steps=8, save_steps=2, keep_checkpoints=1,
                          upload_destination=str(dest))
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    names = [f"checkpoint-epoch0-step{step}-files0" for step in (2, 4, 6, 8)]
    assert local_names(tmp_path / "checkpoints") == names[-1:]  # older ones pruned once verified
    states = records(tmp_path / "checkpoints")
    for name in names:  # the files layout (the default): every file an object, the manifest written last
        remote = dest / f"{name}.files.json"
        assert states[name]["state"] == "uploaded" and states[name]["crc32c"] == crc32c_of_file(remote)
        assert states[name]["size"] == remote.stat().st_size
        listed = {entry["path"] for entry in json.loads(remote.read_text())["files"]}
        assert listed == {path.relative_to(dest / name).as_posix() for path in (dest / name).rglob("*") if path.is_file()}
        assert {"model.safetensors", "optimizer.bin", "metadata.json", "data_state.json"} <= listed
    assert "💾 Saving checkpoint at step 2" in result.stderr and f"✅ Saved {names[0]}" in result.stderr
    log = result.stderr
    order = [f"🚀 Starting background upload for {names[0]}",
             f"✅ Checkpoint {names[0]} queued for background upload", f"☁️  Uploading {names[0]} to {dest}/{names[0]}/",
             f"✅ Successfully uploaded {names[0]}"]
    positions = [log.index(line) for line in order]
    assert positions == sorted(positions)
    everything = result.stdout + log
    assert f"Removed old checkpoint {names[0]}" in everything or f"Cleaned up {names[0]}" in everything
    assert "All 4 checkpoint upload(s) of this run verified" in log

    status = run_manager("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("checkpoint-")}
    assert sorted(rows) == sorted(names) and all("uploaded" in rows[name] for name in names)
    assert rows[names[-1]].split()[1:3] != ["-"]  # the newest is also local, with its size

    # The final upload did not make it (say the destination was down at the end): a rerun with nothing
    # left to train still uploads it, and only then reports success.
    manifest = json.loads((tmp_path / "checkpoints" / "uploads.json").read_text())
    manifest["checkpoints"][names[-1]]["state"] = "failed"
    (tmp_path / "checkpoints" / "uploads.json").write_text(json.dumps(manifest))
    (dest / f"{names[-1]}.files.json").unlink()
    rerun = run_train("--config", str(config), "--resume", "latest")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Nothing to train: step 8 has reached max_steps 8" in rerun.stderr
    assert records(tmp_path / "checkpoints")[names[-1]]["state"] == "uploaded"
    assert (dest / f"{names[-1]}.files.json").is_file()
    assert f"♻️  {names[-1]}: " in rerun.stderr  # its files, still there, were not sent again


def test_resume_from_remote_after_local_checkpoints_are_deleted_is_exact(tmp_path: Path, sample_data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
    options = dict(max_steps=12, save_steps=4, lr_decay_steps=12)
    assert run_train("--config", str(write_config(straight, sample_data, **options))).returncode == 0
    config = write_config(split, sample_data, upload_destination=str(split / "uploads"), **options)
    first = run_train("--config", str(config), "--max-steps", "8", "--no-background-upload")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Uploading checkpoint-epoch0-step8-files0 now (background uploads are off)" in first.stderr
    assert "queued for background upload" not in first.stderr

    shutil.rmtree(split / "checkpoints")  # a fresh machine: only the uploads are left
    resumed = run_train("--config", str(config), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Downloading" in resumed.stderr and "Resumed from checkpoint-epoch0-step8-files0" in resumed.stderr
    assert losses_by_step(split / "logs") == losses_by_step(straight / "logs")  # bit-identical
    final = "checkpoint-epoch0-step12-files0"
    a = load_file(str(straight / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(split / "checkpoints" / final / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert (split / "uploads" / f"{final}.files.json").is_file()

    # Branching off an older checkpoint would save under names already uploaded (never overwritten), so
    # the new checkpoints could never be uploaded: refused, before anything is written.
    for name in ("checkpoint-epoch0-step8-files0", final):  # moved away, as the local refusal tells
        shutil.move(split / "checkpoints" / name, tmp_path / name)
    before = sorted(path.name for path in (split / "checkpoints").iterdir())
    older = run_train("--config", str(config), "--resume", "checkpoint-epoch0-step4-files0", "--max-steps", "16")
    assert older.returncode == 2 and "Traceback" not in older.stderr
    assert "would save under names that" in older.stderr and final in older.stderr
    assert sorted(path.name for path in (split / "checkpoints").iterdir()) == before


def test_stalled_upload_never_blocks_training_and_survives_kill_9_and_sigterm(
        tmp_path: Path, sample_data: Path, gcs_server: GCSEmulator) -> None:
    gcs_server.create_bucket("ckpts")
    checkpoint_dir = tmp_path / "checkpoints"
    config = write_config(tmp_path, sample_data, max_steps=100000, save_steps=4, keep_checkpoints=1,
                          upload_destination="gs://ckpts/Checkpoints", archive_format="tar", upload_timeout_s=120,
                          lr_decay_steps=100000)
    impatient = tmp_path / "impatient.json"  # the same run, waiting only 2 s for uploads at exit
    impatient.write_text(json.dumps({**json.loads(config.read_text()), "upload_timeout_s": 2}))
    remote = open_storage("gs://ckpts/Checkpoints")
    server = gcs_server.process
    assert server is not None

    # --- the emulator freezes with an upload in flight; training goes on; then kill -9 ------------
    process = start_train(config, env=gcs_server.env)
    try:
        wait_until(lambda: local_names(checkpoint_dir), "the first checkpoint")
        server.send_signal(signal.SIGSTOP)
        wait_until(lambda: (tmp_path / "logs" / "metrics.jsonl").exists()
                   and read_metrics(tmp_path / "logs")[-1]["step"] >= 20, "training to go on to step 20")
        process.kill()  # kill -9, wherever it is: mid-step, mid-save or mid-upload
        process.wait(timeout=30)
    finally:
        server.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    last_logged = read_metrics(tmp_path / "logs")[-1]["step"]
    states = records(checkpoint_dir)
    in_flight = [name for name, record in states.items() if record["state"] == "uploading"]
    assert in_flight and all(step_of(name) < last_logged for name in in_flight)  # steps went on meanwhile
    for name, record in states.items():  # no local checkpoint lost, no partial object left at the destination
        if record["state"] != "uploaded":
            assert (checkpoint_dir / name).is_dir() and not remote.exists(f"{name}.tar")
    newest = local_names(checkpoint_dir)[-1]
    crashed_save = checkpoint_dir / f".tmp-checkpoint-epoch0-step{step_of(newest) + 4}-files0"
    crashed_save.mkdir(exist_ok=True)  # what a kill -9 during a save leaves (the kill may have left it already)
    (crashed_save / "half-written.bin").write_bytes(b"half a checkpoint")

    # --- the next run cleans up, resumes from the newest complete checkpoint and finishes the uploads --
    target = step_of(newest) + 2
    result = run_train("--config", str(config), "--resume", "latest", "--max-steps", str(target), env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {newest}" in result.stderr and f"Removed {crashed_save.name}" in result.stderr
    assert "Picking up the pending upload" in result.stderr
    assert not crashed_save.exists()
    states = records(checkpoint_dir)
    assert all(record["state"] == "uploaded" for record in states.values())
    for name, record in states.items():
        stored = remote.stat(f"{name}.tar")
        assert stored is not None and (stored.size, stored.crc32c) == (record["size"], record["crc32c"])
    assert local_names(checkpoint_dir) == [f"checkpoint-epoch0-step{target}-files0"]

    # --- SIGTERM while the destination hangs: save, wait upload_timeout_s, report, keep the record --
    process = start_train(impatient, "--resume", "latest", env=gcs_server.env)
    try:
        wait_until(lambda: read_metrics(tmp_path / "logs")[-1]["step"] > target, "the run to start stepping")
        server.send_signal(signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        server.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = local_names(checkpoint_dir)[-1]
    assert "upload(s) unfinished after 2 s" in stderr and stopped_at in stderr and "upload-all" in stderr
    assert records(checkpoint_dir)[stopped_at]["state"] in ("queued", "uploading")
    pending = [name for name, record in records(checkpoint_dir).items() if record["state"] != "uploaded"]
    assert all((checkpoint_dir / name).is_dir() for name in pending)  # a scheduled save may be pending too

    # --- upload_manager finishes them ---------------------------------------------------------------
    finished = run_manager("upload-all", "--config", str(config), env=gcs_server.env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"{len(pending)} uploaded, 0 failed" in finished.stdout
    assert all(record["state"] == "uploaded" for record in records(checkpoint_dir).values())
    assert all(remote.exists(f"{name}.tar") for name in pending)


def test_a_signal_while_the_run_waits_for_its_uploads_ends_the_wait(
        tmp_path: Path, sample_data: Path, gcs_server: GCSEmulator) -> None:
    gcs_server.create_bucket("ckpts")
    config = write_config(tmp_path, sample_data, max_steps=20, save_steps=20, upload_destination="gs://ckpts/Checkpoints",
                          archive_format="tar", upload_timeout_s=600, lr_decay_steps=20)
    stderr_file = tmp_path / "stderr.txt"
    server = gcs_server.process
    assert server is not None
    with stderr_file.open("w") as stderr:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config)],
                                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                   env={**os.environ, **gcs_server.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        wait_until(lambda: (tmp_path / "logs" / "metrics.jsonl").exists(), "the first step")
        server.send_signal(signal.SIGSTOP)  # the destination hangs: the final checkpoint's upload never ends
        wait_until(lambda: "Waiting for 1 upload(s)" in stderr_file.read_text(), "the wait for the upload")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)  # not the 600 s upload_timeout_s
    finally:
        server.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    output = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received: no more waiting for the uploads" in output
    assert "1 upload(s) unfinished when interrupted" in output and "upload-all" in output
    final = "checkpoint-epoch0-step20-files0"
    assert local_names(tmp_path / "checkpoints") == [final] and records(tmp_path / "checkpoints")[final]["state"] in (
        "queued", "uploading")


def test_two_processes_upload_once_and_resume_from_remote(tmp_path: Path, sample_data: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    dest = tmp_path / "uploads"
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2, upload_destination=str(dest),
                          lr_decay_steps=6)
    first = run_train("--config", str(config), launcher=launcher)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in dest.glob("checkpoint-*")) == [f"checkpoint-epoch0-step{s}-files0{suffix}"
                                                                 for s in (2, 4) for suffix in ("", ".files.json")]
    assert first.stderr.count("Starting background upload for checkpoint-epoch0-step4-files0") == 1  # rank 0 only

    shutil.rmtree(tmp_path / "checkpoints")
    resumed = run_train("--config", str(config), "--resume", "latest", "--max-steps", "6", launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("⬇️  Downloading") == 1  # one process per machine downloads, the other waits
    assert "Resumed from checkpoint-epoch0-step4-files0" in resumed.stderr
    final = tmp_path / "checkpoints" / "checkpoint-epoch0-step6-files0"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final.iterdir()}
    assert records(tmp_path / "checkpoints")[final.name]["state"] == "uploaded"
