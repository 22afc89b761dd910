"""scripts/monitor_training.py on the logs and checkpoints of a real (tiny) training run."""
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from configs import training_config
from conftest import REPO_ROOT, read_events, read_log, read_metrics, run_train, write_config
from scripts import monitor_training
from scripts.monitor_training import MetricsReader, eta_seconds, main
from utils.run_lock import RUN_LOCK

MONITOR = str(REPO_ROOT / "scripts" / "monitor_training.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    """One finished 8-step run (checkpoints at steps 4 and 8); returns the folder holding logs/ and checkpoints/."""
    folder = tmp_path_factory.mktemp("monitor_run")
    result = run_train("--config", str(write_config(folder, sample_data)))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    """A private copy of logs/ and of the checkpoints' JSON files, to change freely."""
    shutil.copytree(run / "logs", tmp_path / "logs")
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints",
                    ignore=lambda _, names: [n for n in names if not n.endswith(".json") and "." in n])
    return tmp_path


def monitor(capsys: pytest.CaptureFixture[str], folder: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--log-dir", str(folder / "logs"), "--checkpoint-dir", str(folder / "checkpoints"), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


# --- reading a log that is still being written ---------------------------------------------------

def test_reader_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    reader = MetricsReader(path)
    assert [r["step"] for r in reader.read_new()] == [1, 2]
    assert reader.read_new() == []
    with open(path, "a") as handle:
        handle.write('ss": 7.0}\nnot json\n{"step": 4, "loss": 6.0}\n')
    assert [(r["step"], r["loss"]) for r in reader.read_new()] == [(3, 7.0), (4, 6.0)]
    assert reader.bad_lines == 1
    assert not reader.restarted
    path.write_text('{"step": 1, "loss": 5.0}\n')  # truncated by a new run: read from the start again
    assert [r["loss"] for r in reader.read_new()] == [5.0] and reader.restarted
    replacement = tmp_path / "new.jsonl"
    replacement.write_text("".join(json.dumps({"step": s, "loss": 4.0}) + "\n" for s in range(1, 30)))
    os.replace(replacement, path)  # a longer file under the same name
    assert [r["step"] for r in reader.read_new()] == list(range(1, 30)) and reader.restarted


def test_reader_tail_starts_at_a_line_boundary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0, "pad": "x" * 50}) + "\n" for step in range(1, 101)))
    records = MetricsReader(path).read_new(tail_bytes=1000)
    assert records and records[-1]["step"] == 100
    assert [r["step"] for r in records] == list(range(records[0]["step"], 101))
    assert len(records) < 20


def test_eta_uses_the_current_segment_after_a_resume():
    # 10 steps in 100 s, then a resume (elapsed restarts) running 10 steps in 20 s.
    first = [{"step": s, "elapsed_s": 10.0 * s} for s in range(1, 11)]
    second = [{"step": 10 + s, "elapsed_s": 2.0 * s} for s in range(1, 11)]
    assert eta_seconds(first + second, 120) == pytest.approx(100 * 2.0)
    assert eta_seconds(first, None) is None
    assert eta_seconds([{"step": 4, "tokens_seen": 400, "tokens_per_sec": 50.0}], 10) == pytest.approx(6 * 2.0)


# --- the snapshot --------------------------------------------------------------------------------

def test_once_shows_progress_checkpoints_and_system(capsys, run):
    code, out, _ = monitor(capsys, run, "--once")
    last = read_metrics(run / "logs")[-1]
    assert code == 0
    assert "Step: 8 / 8 (100.0%)" in out and "finished" in out and "ETA: done" in out
    assert f"Loss: {last['loss']:.6f}" in out and f"LR: {last['lr']:.2e}" in out
    assert f"Tokens/s: {last['tokens_per_sec']:,.0f}" in out and "tokens seen: 1,024" in out
    assert "MFU" not in out and "GPU memory" not in out  # the CPU has neither
    assert "checkpoint-epoch0-step4-files0" in out and "checkpoint-epoch0-step8-files0" in out
    assert "upload: n/a" in out
    assert "CPU:" in out and "RAM:" in out and "Disk (checkpoints):" in out
    assert "GPU" in out


def test_once_mid_run_with_mfu_eta_and_uploads(capsys, copy):
    metrics = copy / "logs" / "metrics.jsonl"
    records = read_metrics(copy / "logs")[:4]
    for index, record in enumerate(records):
        record.update(elapsed_s=10.0 * (index + 1), mfu=0.42, gpu_memory_gib=41.3)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    shutil.rmtree(copy / "checkpoints" / "checkpoint-epoch0-step8-files0")
    (copy / "checkpoints" / "uploads.json").write_text(json.dumps({"destination": "gs://b/Checkpoints", "checkpoints": {
        "checkpoint-epoch0-step4-files0": {"state": "uploading", "remote_url": None, "size": None, "crc32c": None,
                                           "error": None, "attempts": 1, "updated": "2026-01-01T00:00:00+00:00"}}}))
    code, out, _ = monitor(capsys, copy, "--once", "--max-steps", "10")
    assert code == 0
    assert "Step: 4 / 10 (40.0%)" in out and "finished" not in out
    assert "MFU: 42.0%" in out and "GPU memory (peak): 41.3 GiB" in out
    assert "ETA: 0:01:00" in out  # 6 steps left at 10 s per step
    assert "upload: uploading" in out and "Uploads to gs://b/Checkpoints: 1 pending, 0 failed" in out


def test_config_gives_folders_and_max_steps(capsys, run):
    code = main(["--once", "--config", str(run / "config.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Step: 8 / 8" in out and "max steps from the run's log" in out
    assert str(run / "checkpoints") in out


def rewrite_metrics(copy: Path, **changes: object) -> list[dict]:
    """Rewrites the copied log's training lines with `changes` (as a newer train.py would have written them)."""
    records = [record | changes if "loss" in record else record for record in read_metrics(copy / "logs")]
    (copy / "logs" / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def test_max_steps_of_the_running_run_wins_over_the_config(capsys, run, copy):
    """A run resumed with --max-steps 300 while its config says 8: the log's max_steps is the run's."""
    rewrite_metrics(copy, max_steps=300)
    code, out, _ = monitor(capsys, copy, "--once", "--config", str(run / "config.json"))
    assert code == 0
    assert "Step: 8 / 300 (2.7%)" in out and "finished" not in out and "ETA: done" not in out
    assert "(max steps from the run's log)" in out
    code, out, _ = monitor(capsys, copy, "--once", "--config", str(run / "config.json"), "--max-steps", "16")
    assert "Step: 8 / 16 (50.0%)" in out and "(max steps from --max-steps)" in out


def test_bad_input_gives_one_line_errors(capsys, tmp_path):
    code, _, err = monitor(capsys, tmp_path / "nowhere", "--once")
    assert code == 2 and "nothing to show" in err and len(err.strip().splitlines()) == 1
    code = main(["--once", "--config", "no-such-config"])
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "logs").mkdir()
    code, out, _ = monitor(capsys, tmp_path, "--once")
    assert code == 0 and "No metrics yet" in out and "No checkpoints yet" in out


def test_after_the_quick_start_the_defaults_point_at_the_runs_subfolders(capsys, run, tmp_path, monkeypatch):
    """`bash run.sh tiny` writes logs/tiny/ and checkpoints/tiny/; the monitor's defaults are logs/ and checkpoints/."""
    monkeypatch.setattr(training_config, "REPO_ROOT", tmp_path)  # where the tiny config's relative paths start
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run / "logs", tmp_path / "logs" / "tiny")
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints" / "tiny",
                    ignore=lambda _, names: [n for n in names if not n.endswith(".json") and "." in n])
    (tmp_path / "logs" / "other").mkdir()  # holds no metrics: not named
    assert (tmp_path / "logs" / "tiny" / "refocused-ai").is_dir()  # the project_name's TensorBoard folder
    code = main(["--once"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("⏳ No metrics in logs/metrics.jsonl; logs/tiny holds some: pass --log-dir logs/tiny or --config tiny"
            in out.splitlines())
    assert ("💾 No checkpoints yet in checkpoints; checkpoints/tiny holds some: pass --checkpoint-dir "
            "checkpoints/tiny or --config tiny" in out.splitlines())
    assert "📈 TensorBoard: tensorboard --logdir logs" in out.splitlines()  # it finds logs/tiny/refocused-ai
    code = main(["--once", "--logs-only"])
    assert code == 0 and "No metrics yet in logs/metrics.jsonl; logs/tiny holds some" in capsys.readouterr().out
    code = main(["--once", "--config", "tiny"])
    out = capsys.readouterr().out
    assert code == 0 and "Step: 8 / 8" in out  # the run's own max_steps, logged, not the config's 200
    assert f"📈 TensorBoard: tensorboard --logdir {tmp_path / 'logs' / 'tiny' / 'refocused-ai'}" in out.splitlines()


def test_logs_only_once_prints_the_tail(capsys, run):
    code, out, _ = monitor(capsys, run, "--logs-only", "--once", "--lines", "3")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [int(row.split()[0]) for row in rows] == [7, 8, 8] and rows[-1].split()[1] == "save:"  # step 8's save
    last = read_metrics(run / "logs")[-1]
    assert rows[-2].split()[1] == f"{last['loss']:.6f}"


def add_validation(copy: Path, step: int, loss: float, perplexity: float) -> dict:
    """Appends a validation line, as train.py writes it after the training line of the same step."""
    record = {"step": step, "eval_loss": loss, "eval_perplexity": perplexity, "eval_tokens": 512}
    with open(copy / "logs" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def test_once_after_a_validation_shows_the_last_training_line_and_the_validation(capsys, copy):
    add_validation(copy, 4, 7.5, 1808.04)
    add_validation(copy, 8, 7.25, 1408.1)
    last = read_metrics(copy / "logs")[-3]
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0
    assert f"Loss: {last['loss']:.6f}" in out and f"LR: {last['lr']:.2e}" in out
    assert f"Tokens/s: {last['tokens_per_sec']:,.0f}" in out
    assert "n/a" not in out.split("Loss:")[1].split("\n")[0] and "nan" not in out
    assert f"Elapsed: {monitor_training.fmt_duration(last['elapsed_s'])}" in out
    assert "Validation at step 8: loss 7.2500, perplexity 1408.10" in out
    assert "unreadable" not in out


def test_logs_only_shows_validation_lines_as_validation(capsys, copy):
    add_validation(copy, 8, 7.25, 1408.1)
    code, out, _ = monitor(capsys, copy, "--logs-only", "--once", "--lines", "3")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [row.split()[:2] for row in rows][:2] == [["8", rows[0].split()[1]], ["8", "save:"]]
    assert rows[-1].split()[:1] == ["8"]
    assert rows[-1].split()[1:] == ["validation:", "loss", "7.250000,", "perplexity", "1408.10"]
    assert "nan" not in out and "n/a" not in out


GB = 10**9  # sizes are shown in decimal units, labelled as such


def add_events(copy: Path) -> None:
    """Replaces the run's event lines with these, as train.py writes them: saves, uploads, and a kind this
    monitor does not know."""
    metrics = copy / "logs" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if '"event"' not in line))
    events = [
        {"event": "save", "step": 4, "checkpoint": "checkpoint-epoch0-step4-files0", "bytes": GB,
         "seconds_blocked": 0.5, "seconds_writing": 4.0},
        {"event": "upload", "checkpoint": "checkpoint-epoch0-step4-files0", "bytes": GB, "seconds": 5.0,
         "mb_per_s": 204.8, "streams": 16, "queue": 0},
        {"event": "save", "step": 8, "checkpoint": "checkpoint-epoch0-step8-files0", "bytes": int(1.2 * GB),
         "seconds_blocked": 0.8, "seconds_writing": 6.1},
        {"event": "something-new", "step": 8, "detail": "a kind added to train.py later"},
        {"event": "upload", "checkpoint": "checkpoint-epoch0-step8-files0", "bytes": int(1.2 * GB), "seconds": 5.9,
         "mb_per_s": 210.4, "streams": 16, "queue": 2},
    ]
    with open(copy / "logs" / "metrics.jsonl", "a") as handle:
        handle.write("".join(json.dumps(event) + "\n" for event in events))


def test_once_shows_the_latest_save_and_upload(capsys, copy):
    last = read_metrics(copy / "logs")[-1]
    add_events(copy)
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0
    lines = out.splitlines()
    assert "💾 Last save: checkpoint-epoch0-step8-files0 at step 8, 1.2 GB, blocked 0.8 s, written in 6.1 s" in lines
    assert "☁️  Last upload: checkpoint-epoch0-step8-files0, 1.2 GB at 210 MB/s, 16 streams, 2 queued" in lines
    assert "Step: 8 / 8 (100.0%)" in out and f"Loss: {last['loss']:.6f}" in out  # training lines as before
    assert "unreadable" not in out and "n/a" not in out.split("Last save")[1].split("\n")[0]


def test_logs_only_shows_saves_and_uploads_as_rows(capsys, copy):
    add_events(copy)
    code, out, _ = monitor(capsys, copy, "--logs-only", "--once", "--lines", "5")
    assert code == 0
    rows = out.splitlines()[1:]
    assert rows[0].split()[0] == "8" and len(rows[0].split()) == 6  # the last training line
    assert rows[1:] == [
        "       4 save: checkpoint-epoch0-step4-files0, 1.0 GB, blocked 0.5 s, written in 4.0 s",
        "         upload: checkpoint-epoch0-step4-files0, 1.0 GB at 205 MB/s, 16 streams, 0 queued",
        "       8 save: checkpoint-epoch0-step8-files0, 1.2 GB, blocked 0.8 s, written in 6.1 s",
        "         upload: checkpoint-epoch0-step8-files0, 1.2 GB at 210 MB/s, 16 streams, 2 queued",
    ]


def test_gpu_lines_through_nvml(monkeypatch):
    """The NVML path, with a stand-in for the library (no GPU here)."""
    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda index: index
    fake.nvmlDeviceGetName = lambda handle: "NVIDIA H100 80GB HBM3"
    fake.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=97 - handle)
    fake.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=60 * 2**30, total=80 * 2**30)
    fake.nvmlDeviceGetTemperature = lambda handle, sensor: 65
    fake.nvmlDeviceGetPowerUsage = lambda handle: 650_000

    def power_unsupported(handle: int) -> int:
        raise fake.NVMLError("Not Supported")

    monkeypatch.setitem(sys.modules, "pynvml", fake)
    lines = monitor_training.GpuProbe().lines()
    # In decimal units, as every size is shown: the "80GB" card holds 80 GiB = 85.9 GB.
    assert lines == ["🎮 GPU 0 NVIDIA H100 80GB HBM3: 97% busy   memory 64.4 GB / 85.9 GB   65°C   650 W",
                     "🎮 GPU 1 NVIDIA H100 80GB HBM3: 96% busy   memory 64.4 GB / 85.9 GB   65°C   650 W"]
    fake.nvmlDeviceGetPowerUsage = power_unsupported
    assert monitor_training.GpuProbe().lines()[0].endswith("memory 64.4 GB / 85.9 GB")


# --- live modes, as a separate process -----------------------------------------------------------

def start(*args: str) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    process = subprocess.Popen([sys.executable, MONITOR, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO_ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


def wait_for(lines: "queue.Queue[str]", text: str, seen: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{text!r} never appeared in:\n{''.join(seen)}"
        try:
            seen.append(lines.get(timeout=remaining))
        except queue.Empty:
            pass


def stop(process: subprocess.Popen, lines: "queue.Queue[str]", seen: list[str]) -> str:
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    time.sleep(0.1)  # let the reader thread drain the pipe
    while not lines.empty():
        seen.append(lines.get())
    return "".join(seen)


def test_live_view_refreshes_and_exits_cleanly_on_ctrl_c(copy):
    process, lines = start("--refresh", "0.2", "--log-dir", str(copy / "logs"),
                           "--checkpoint-dir", str(copy / "checkpoints"))
    seen: list[str] = []
    wait_for(lines, "Training monitor", seen)
    with open(copy / "logs" / "metrics.jsonl", "a") as handle:  # the run goes on in "another process"
        handle.write(json.dumps({"step": 9, "loss": 1.25, "lr": 1e-4, "elapsed_s": 1.0}) + "\n")
    wait_for(lines, "Loss: 1.250000", seen)
    output = stop(process, lines, seen)
    assert "Monitor stopped" in output and "Traceback" not in output


def test_logs_only_follows_a_growing_log(copy):
    metrics = copy / "logs" / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 9, "loss": 2.5, "lr": 0.0001, "grad_norm": 1.0, "tokens_per_sec": 10.0, ')
    process, lines = start("--logs-only", "--refresh", "0.2", "--lines", "2", "--log-dir", str(copy / "logs"))
    seen: list[str] = []
    wait_for(lines, "       8 ", seen)
    with open(metrics, "a") as handle:
        handle.write('"elapsed_s": 3.0}\n')
    wait_for(lines, "2.500000", seen)
    output = stop(process, lines, seen)
    rows = [line.split()[0] for line in output.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert rows == ["8", "8", "9"]  # step 8's training line and its save, then step 9
    assert "Monitor stopped" in output and "Traceback" not in output


# --- a resumed run: its lock, its start line, its elapsed time --------------------------------------

def test_a_run_writes_a_start_line_with_its_max_steps(run):
    """train.py's first line, before its first logging step: where a resumed run says its own max_steps."""
    assert read_events(run / "logs", "start") == [{"event": "start", "step": 0, "max_steps": 8}]
    assert read_log(run / "logs")[0]["event"] == "start"


def test_a_resumed_runs_start_line_gives_its_max_steps(capsys, copy):
    """The 8-step run resumed with --max-steps 20 has written its start line, not yet a training line."""
    with open(copy / "logs" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "start", "step": 8, "max_steps": 20}) + "\n")
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0
    assert "Step: 8 / 20 (40.0%)" in out and "finished" not in out and "(max steps from the run's log)" in out
    code, out, _ = monitor(capsys, copy, "--logs-only", "--once", "--lines", "1")
    assert out.splitlines()[1:] == ["       8 resumed: max steps 20"]


def test_a_live_run_lock_means_running_not_finished(capsys, copy):
    """Resumed with more steps, a run says its max_steps only once it trains (after loading the model and the
    data); until then its log reads 8 / 8, but the run holds its lock: running, not finished."""
    lock = copy / "logs" / RUN_LOCK
    written = lock.read_text()  # by the run's train.py, which has ended
    assert re.fullmatch(rf"pid \d+ on {re.escape(socket.gethostname())}, since [\d: -]+\n", written)
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0 and "✅ finished" in out and "ETA: done" in out and "Running" not in out

    holder = re.sub(r"pid \d+", f"pid {os.getpid()}", written)  # as held by a live process: this one
    lock.write_text(holder)
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0 and f"🏃 Running: {holder.strip()}" in out.splitlines()
    assert "Step: 8 / 8 (100.0%)   epoch 0   🏃 still running" in out
    assert "finished" not in out and "ETA: n/a" in out

    # The same pid, but a lock written before this process started: a pid reused after the run ended.
    lock.write_text(re.sub(r"since .*", "since 2001-01-01 00:00:00", holder))
    code, out, _ = monitor(capsys, copy, "--once")
    assert code == 0 and "✅ finished" in out and "Running" not in out


def training_line(step: int, elapsed_s: float) -> dict:
    return {"step": step, "loss": 5.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_sec": 100.0, "elapsed_s": elapsed_s,
            "max_steps": 20}


def write_log(log_dir: Path, records: list[dict]) -> None:
    """A new metrics.jsonl of these records, put in place at once, as a resume's rewind does."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "metrics.jsonl.tmp").write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(log_dir / "metrics.jsonl.tmp", log_dir / "metrics.jsonl")


# Three runs of one history: 3 steps in 30 s; resumed at step 3, its first line at 40 s (a slow first step) after
# its start line; resumed at step 5 by an older train.py, without a start line (its elapsed_s falls back to 5 s).
RESUMED_LOG = ([{"event": "start", "step": 0, "max_steps": 20}] + [training_line(s, 10.0 * s) for s in (1, 2, 3)]
               + [{"event": "start", "step": 3, "max_steps": 20}] + [training_line(4, 40.0), training_line(5, 50.0)]
               + [training_line(6, 5.0)])


def test_logs_only_elapsed_goes_on_across_resumes(capsys, tmp_path):
    write_log(tmp_path / "logs", RESUMED_LOG)
    code, out, _ = monitor(capsys, tmp_path, "--logs-only", "--once")
    assert code == 0
    rows = [row.split() for row in out.splitlines()[1:]]
    assert [" ".join(row) for row in rows if len(row) != 6] == ["0 start: max steps 20", "3 resumed: max steps 20"]
    assert [(row[0], row[-1]) for row in rows if len(row) == 6] == [
        ("1", "0:00:10"), ("2", "0:00:20"), ("3", "0:00:30"),
        ("4", "0:01:10"), ("5", "0:01:20"),  # 30 s trained before the resume, then 40 s and 50 s
        ("6", "0:01:25")]  # 80 s, then 5 s


def test_logs_only_following_a_resume_goes_on_counting(tmp_path):
    """A resume rewrites metrics.jsonl (cut back to the resumed step), then appends its start line and steps."""
    write_log(tmp_path / "logs", RESUMED_LOG[:4] + [training_line(4, 40.0)])  # killed after step 4, saved at 3
    process, lines = start("--logs-only", "--refresh", "0.2", "--lines", "2", "--log-dir", str(tmp_path / "logs"))
    seen: list[str] = []
    wait_for(lines, "0:00:40", seen)
    write_log(tmp_path / "logs", RESUMED_LOG[:4])  # the resume from step 3: a new file
    with open(tmp_path / "logs" / "metrics.jsonl", "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in RESUMED_LOG[4:6]))
    wait_for(lines, "0:01:10", seen)
    output = stop(process, lines, seen)
    assert "was rewritten: a resume or a new run" in output
    steps = [row.split()[0] for row in output.split("was rewritten")[1].splitlines()[1:] if row[:8].strip().isdigit()]
    assert steps[-2:] == ["3", "4"] and "1" not in steps  # the last rows, not the whole history again
    assert "Traceback" not in output


# --- start-up cost -------------------------------------------------------------------------------------

def imported_modules(*args: str) -> set[str]:
    """The modules a tool's command imports, as a user runs it (from Python's import log); it must succeed."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("mode", [["--once"], ["--logs-only", "--once"]])
def test_the_monitor_imports_no_torch_transformers_or_accelerate(copy, mode):
    """Seconds of start-up for reading a few files: the monitor needs none of them."""
    imported = imported_modules(MONITOR, "--log-dir", str(copy / "logs"), "--checkpoint-dir",
                                str(copy / "checkpoints"), *mode)
    assert "utils.run_lock" in imported  # the log is read right
    assert not imported & {"torch", "transformers", "accelerate"}
