"""scripts/checkpoint_viewer.py on the checkpoints of a real (tiny) training run."""
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gcs_emulator import gcs_server  # noqa: F401  (the fixture)

from configs import training_config
from conftest import REPO_ROOT, read_metrics, run_train, write_config
from scripts.checkpoint_viewer import load_record, main, plot_metrics, validation_history, validation_points
from utils.checkpoints.folders import find_checkpoint

STEP4, STEP8 = "checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step8-files0"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    """One 8-step run validating and saving at steps 4 and 8 (as the tiny config does, at 50 and 100) and
    uploading the checkpoints to a local folder, bucket/; the tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("viewer_run")
    config = write_config(folder, sample_data, upload_destination=str(folder / "bucket"), eval_holdout_files=1,
                          eval_steps=4, eval_batches=2)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "checkpoints"


@pytest.fixture
def checkpoints(run: Path, tmp_path: Path) -> Path:
    """A private copy of the run's checkpoint folder: its JSON files (the viewer reads nothing else), without
    the upload state."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(run, copy, ignore=lambda _, names: [n for n in names if (not n.endswith(".json") and "." in n)
                                                        or n == "uploads.json"])
    return copy


@pytest.fixture
def logs(run: Path, tmp_path: Path) -> Path:
    """A private copy of the run's log folder: metrics.jsonl, with validation lines at steps 4 and 8."""
    shutil.copytree(run.parent / "logs", tmp_path / "logs")
    return tmp_path / "logs"


def viewer(capsys: pytest.CaptureFixture[str], checkpoint_dir: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--checkpoint-dir", str(checkpoint_dir), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def metadata(checkpoint_dir: Path, name: str) -> dict:
    return json.loads((checkpoint_dir / name / "metadata.json").read_text())


def write_uploads(checkpoint_dir: Path, destination: str) -> None:
    entry = {"remote_url": None, "size": None, "crc32c": None, "error": None, "attempts": 1,
             "updated": "2026-01-01T00:00:00+00:00"}
    (checkpoint_dir / "uploads.json").write_text(json.dumps({"destination": destination, "checkpoints": {
        STEP4: {**entry, "state": "uploaded", "remote_url": f"{destination}/{STEP4}.tar.gz"},
        STEP8: {**entry, "state": "failed", "error": "403 Forbidden", "attempts": 3},
    }}))


# --- list ------------------------------------------------------------------------------------------

def test_list_shows_each_checkpoint_sorted_by_step(capsys, checkpoints):
    # A step-12 copy sorts before step4 by name, after it by step.
    step12 = checkpoints / "checkpoint-epoch0-step12-files0"
    shutil.copytree(checkpoints / STEP8, step12)
    meta = metadata(checkpoints, STEP8) | {"step": 12, "current_loss": 1.5}
    (step12 / "metadata.json").write_text(json.dumps(meta))
    code, out, _ = viewer(capsys, checkpoints, "list")
    assert code == 0
    assert "Found 3 checkpoints" in out
    rows = [line for line in out.splitlines() if "Step:" in line]
    assert [row.split()[1] for row in rows] == [STEP4, STEP8, step12.name]
    expected_loss = metadata(checkpoints, STEP4)["current_loss"]
    assert f"Loss: {expected_loss:.6f}" in rows[0]
    assert all("Upload: n/a" in row for row in rows)


def test_list_shows_upload_states(capsys, checkpoints):
    write_uploads(checkpoints, "gs://bucket/Checkpoints")
    _, out, _ = viewer(capsys, checkpoints, "list")
    row4, row8 = [line for line in out.splitlines() if "Step:" in line]
    assert "Upload: uploaded" in row4 and "Upload: failed" in row8


def test_list_marks_a_corrupt_checkpoint_and_shows_the_rest(capsys, checkpoints):
    (checkpoints / STEP4 / "metadata.json").write_text('{"step": 4, "curr')
    (checkpoints / STEP8 / "metadata.json").unlink()
    shutil.copytree(checkpoints / STEP4, checkpoints / "checkpoint-epoch0-step9-files0")
    (checkpoints / "checkpoint-epoch0-step9-files0" / "metadata.json").write_text(json.dumps({"step": 9}))
    code, out, _ = viewer(capsys, checkpoints, "list")
    assert code == 0
    lines = out.splitlines()
    assert any(STEP4 in line and "unreadable" in line for line in lines)
    assert any(STEP8 in line and "missing" in line for line in lines)
    assert any("step9" in line and "Step: 9" in line for line in lines)


@pytest.mark.parametrize("command", [["list"], ["view", "latest"]])
def test_list_and_view_import_no_torch_transformers_or_accelerate(checkpoints, command):
    """Seconds of start-up for reading a few JSON files: the tool as a user runs it, with Python's import log."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "scripts" / "checkpoint_viewer.py"),
                           *command, "--checkpoint-dir", str(checkpoints)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and STEP8 in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "utils.uploads.manifest" in imported  # the log is read right
    assert not imported & {"torch", "transformers", "accelerate"}


def test_list_of_an_empty_or_missing_folder(capsys, tmp_path):
    code, out, err = viewer(capsys, tmp_path, "list")
    assert code == 2 and out == "" and err.startswith(f"error: no checkpoints in {tmp_path}")
    assert len(err.strip().splitlines()) == 1
    code, _, err = viewer(capsys, tmp_path / "nowhere", "list")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_empty_folder_names_the_subfolders_holding_checkpoints(capsys, checkpoints, tmp_path):
    parent = tmp_path / "all"
    parent.mkdir()
    shutil.move(checkpoints, parent / "tiny")
    (parent / "other").mkdir()
    for command in (["list"], ["view", "latest"], ["plot", "latest"], ["compare", STEP4, STEP8]):
        code, out, err = viewer(capsys, parent, *command)
        assert code == 2 and out == "", command
        assert err == (f"error: no checkpoints in {parent}; {parent / 'tiny'} holds some: "
                       f"pass --checkpoint-dir {parent / 'tiny'}\n"), command
        assert "--resume" not in err


def test_empty_folder_hint_names_the_config_of_a_subfolder(capsys, checkpoints, tmp_path, monkeypatch):
    """checkpoints/ holding tiny/ (the tiny config's checkpoint_dir, relative to the repo) as a first run leaves it."""
    monkeypatch.setattr(training_config, "REPO_ROOT", tmp_path)  # where a config's relative paths start
    shutil.move(checkpoints, tmp_path / "tiny")
    (tmp_path / "checkpoints").mkdir()
    shutil.move(tmp_path / "tiny", tmp_path / "checkpoints" / "tiny")
    code, _, err = viewer(capsys, tmp_path / "checkpoints", "list")
    assert code == 2 and err.strip().endswith(
        f"holds some: pass --checkpoint-dir {tmp_path / 'checkpoints' / 'tiny'} or --config tiny")
    code = main(["list", "--config", "tiny"])
    assert code == 0 and "Found 2 checkpoints" in capsys.readouterr().out


def test_folder_options_are_accepted_after_the_command(capsys, checkpoints, tmp_path):
    code, out, _ = viewer(capsys, tmp_path / "nowhere", "list", "--checkpoint-dir", str(checkpoints))
    assert code == 0 and f"Found 2 checkpoints in {checkpoints}" in out
    code = main(["view", "latest", "--checkpoint-dir", str(checkpoints)])
    assert code == 0 and f"Checkpoint Summary: {STEP8}" in capsys.readouterr().out
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_preset": "tiny", "checkpoint_dir": str(checkpoints)}))
    for argv in (["list", "--config", str(config)], ["--config", str(config), "list"]):
        code = main(argv)
        assert code == 0 and f"Found 2 checkpoints in {checkpoints}" in capsys.readouterr().out, argv
    # An option given before the command is kept when the command does not repeat it.
    code = main(["--checkpoint-dir", str(checkpoints), "compare", STEP4, STEP8])
    assert code == 0 and "Comparing 2 checkpoints" in capsys.readouterr().out


def test_list_remote_with_no_local_checkpoints_lists_the_destination(capsys, checkpoints, tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / f"{STEP4}.tar.zst").write_bytes(b"x" * 100)
    write_uploads(checkpoints, str(bucket))
    shutil.rmtree(checkpoints / STEP4)
    shutil.rmtree(checkpoints / STEP8)
    code, out, _ = viewer(capsys, checkpoints, "list", "--remote")
    assert code == 0 and "No local checkpoints" in out and f"1 remote checkpoint in {bucket}" in out


def test_list_remote_without_a_destination_or_storage_module(capsys, checkpoints, monkeypatch):
    code, out, err = viewer(capsys, checkpoints, "list", "--remote")
    assert code == 2 and STEP4 in out and "no upload destination" in err
    write_uploads(checkpoints, str(checkpoints.parent / "bucket"))
    monkeypatch.setitem(sys.modules, "utils.storage", None)  # makes `import utils.storage` fail
    code, out, err = viewer(capsys, checkpoints, "list", "--remote")
    assert code == 2 and STEP4 in out
    assert "cannot import utils.storage" in err and len(err.strip().splitlines()) == 1


def test_list_remote_and_view_after_a_run_that_uploaded(capsys, run):
    bucket = run.parent / "bucket"
    code, out, _ = viewer(capsys, run, "list", "--remote")
    assert code == 0
    local, remote = out.split(f"2 remote checkpoints in {bucket}")
    assert [line.split()[1] for line in local.splitlines() if "Upload: uploaded" in line] == [STEP4, STEP8]
    rows = [line for line in remote.splitlines() if "Size:" in line]
    for row, name in zip(rows, (STEP4, STEP8), strict=True):
        archive = next(bucket.glob(f"{name}.*"))
        assert archive.name in row and "Local: yes" in row
    code, out, _ = viewer(capsys, run, "view", STEP8)
    assert code == 0 and f"Upload: uploaded -> {next(bucket.glob(STEP8 + '.*'))}, 1 attempt(s)" in out


def test_list_remote_lists_the_upload_destination(capsys, checkpoints, tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / f"{STEP4}.tar.zst").write_bytes(b"x" * 2**20)
    (bucket / "checkpoint-epoch0-step12-files0.tar").write_bytes(b"x" * 3 * 2**20)
    (bucket / "unrelated.txt").write_text("not a checkpoint")
    write_uploads(checkpoints, str(bucket))
    code, out, _ = viewer(capsys, checkpoints, "list", "--remote")
    assert code == 0
    remote = out.split(f"2 remote checkpoints in {bucket}")[1].splitlines()
    rows = [line for line in remote if "Size:" in line]
    assert len(rows) == 2
    assert STEP4 in rows[0] and "Step: 4" in rows[0] and "1.0 MB" in rows[0] and "Local: yes" in rows[0]
    assert "step12" in rows[1] and "Step: 12" in rows[1] and "Local: no" in rows[1]


def test_list_remote_on_a_gcs_bucket(capsys, checkpoints, gcs_server):
    gcs_server.create_bucket("bucket")
    gcs_server.put("bucket", f"Checkpoints/{STEP8}.tar.zst", b"z" * 5000)
    gcs_server.put("bucket", "Checkpoints/notes.txt", b"not a checkpoint")
    write_uploads(checkpoints, "gs://bucket/Checkpoints")
    code, out, err = viewer(capsys, checkpoints, "list", "--remote")
    assert code == 0, err
    remote = out.split("1 remote checkpoint in gs://bucket/Checkpoints")[1]
    rows = [line for line in remote.splitlines() if "Size:" in line]
    assert len(rows) == 1 and f"{STEP8}.tar.zst" in rows[0] and "5.0 KB" in rows[0] and "Local: yes" in rows[0]


# --- view ------------------------------------------------------------------------------------------

def test_view_shows_the_detailed_summary(capsys, checkpoints):
    write_uploads(checkpoints, "gs://bucket/Checkpoints")
    code, out, _ = viewer(capsys, checkpoints, "view", STEP8)
    assert code == 0
    metrics = json.loads((checkpoints / STEP8 / "training_metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["loss_history"]]
    meta = metadata(checkpoints, STEP8)
    validation = meta["validation_metrics"]
    assert f"Checkpoint Summary: {STEP8}" in out
    for expected in ("Step: 8", "Epoch: 0", "Files Processed: 0", "Tokens Seen: 1,024", "CUDA Available: False",
                     "GPU Count: 0", "Mixed Precision: no", f"💥 Current training loss: {losses[-1]:.6f}\n",
                     f"🏆 Best validation loss (step {validation['best_eval_step']}): "
                     f"{validation['best_eval_loss']:.6f}\n", f"Loss History Length: {len(losses)}",
                     f"Average Loss: {statistics.fmean(losses):.6f}",
                     f"Loss Std Dev: {statistics.stdev(losses):.6f}", "Loss Trend: insufficient data",
                     f"Current LR: {metrics['learning_rates'][-1]['lr']:.2e}",
                     f"Recent Average Loss (last 10 logged): {validation['current_avg_loss']:.6f}",
                     "Steps Since Best:", "Upload: failed (403 Forbidden)"):
        assert expected in out, expected


def view_sections(out: str) -> tuple[str, str]:
    """view's output under its "Training Metrics" heading, and under its "Validation Metrics" heading."""
    training, validation = out.split("📈 Training Metrics:")[1].split("🎯 Validation Metrics:")
    return training, validation


def test_view_puts_training_and_validation_numbers_under_their_own_headings(capsys, checkpoints):
    """metadata.json's validation_metrics holds training statistics too (current_avg_loss, loss_trend):
    they are training numbers, shown as such."""
    code, out, _ = viewer(capsys, checkpoints, "view", STEP8)
    assert code == 0
    block = metadata(checkpoints, STEP8)["validation_metrics"]
    training, validation = view_sections(out)
    assert f"📉 Recent Average Loss (last 10 logged): {block['current_avg_loss']:.6f}\n" in training
    assert "🔄 Loss Trend: insufficient data\n" in training
    assert f"{block['current_avg_loss']:.6f}" not in validation and "trend" not in validation.lower()
    assert "avg" not in validation and "since_best" not in validation
    assert (f"🏆 Best validation loss (step {block['best_eval_step']}): {block['best_eval_loss']:.6f}\n"
            f"⏳ Steps Since Best: {block['steps_since_best']}\n") in validation  # counted from the best validation
    assert f"  eval_loss: {block['eval_loss']:.6f}\n" in validation
    assert f"  eval_perplexity: {block['eval_perplexity']:.6f}\n" in validation
    assert "eval" not in training and "validation" not in training and "Steps Since Best" not in training


def as_an_earlier_version(checkpoints: Path) -> None:
    """Checkpoints as saved before training_metrics.json recorded the validation history."""
    for path in checkpoints.glob("checkpoint-*/training_metrics.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "validation_history"}))


def without_validation(checkpoint: Path) -> list[float]:
    """Rewrites a checkpoint's JSON files as a run without validation writes them: best_loss is the best
    training loss, and validation_metrics holds only training statistics. Returns the training losses."""
    metrics = json.loads((checkpoint / "training_metrics.json").read_text())
    best = min(metrics["loss_history"], key=lambda entry: entry["loss"])
    metrics |= {"best_loss": best["loss"], "best_step": best["step"], "validation_metrics": {}, "validation_history": []}
    (checkpoint / "training_metrics.json").write_text(json.dumps(metrics))
    meta = json.loads((checkpoint / "metadata.json").read_text())
    meta["best_loss"] = best["loss"]
    meta["validation_metrics"] = {key: value for key, value in meta["validation_metrics"].items()
                                  if key in ("current_avg_loss", "steps_since_best", "loss_trend")}
    meta["validation_metrics"]["steps_since_best"] = meta["step"] - best["step"]  # since the best training loss
    (checkpoint / "metadata.json").write_text(json.dumps(meta))
    return [entry["loss"] for entry in metrics["loss_history"]]


def test_view_of_a_run_without_validation_labels_the_best_as_training(capsys, checkpoints):
    losses = without_validation(checkpoints / STEP8)
    code, out, _ = viewer(capsys, checkpoints, "view", STEP8)
    assert code == 0
    best_step = losses.index(min(losses)) + 1  # the history starts at step 1
    assert f"💥 Current training loss: {losses[-1]:.6f}\n" in out
    assert f"🏆 Best training loss (step {best_step}): {min(losses):.6f}\n" in out
    assert "validation loss" not in out
    training, validation = view_sections(out)
    assert f"🏆 Best training loss (step {best_step}): {min(losses):.6f}\n⏳ Steps Since Best: {8 - best_step}\n" \
        in training
    assert validation.strip().splitlines()[1:] == ["  (none recorded)"]


def test_view_latest_and_upload_state(capsys, checkpoints):
    write_uploads(checkpoints, "gs://bucket/Checkpoints")
    code, out, _ = viewer(capsys, checkpoints, "view", STEP4)
    assert code == 0 and f"Upload: uploaded -> gs://bucket/Checkpoints/{STEP4}.tar.gz" in out
    code, out, _ = viewer(capsys, checkpoints, "view", "latest")
    assert code == 0 and f"Checkpoint Summary: {STEP8}" in out


def test_view_without_training_metrics_says_so(capsys, checkpoints):
    (checkpoints / STEP8 / "training_metrics.json").unlink()
    code, out, _ = viewer(capsys, checkpoints, "view", STEP8)
    assert code == 0
    assert "training_metrics.json: missing" in out and "metadata.json's last 8 losses" in out


def test_view_bad_input_gives_one_line_errors(capsys, checkpoints, tmp_path):
    code, _, err = viewer(capsys, checkpoints, "view", "checkpoint-epoch9-step9-files9")
    assert code == 2 and f"existing: {STEP4}, {STEP8}" in err and len(err.strip().splitlines()) == 1
    (checkpoints / STEP4 / "metadata.json").write_text("{not json")
    code, _, err = viewer(capsys, checkpoints, "view", STEP4)
    assert code == 2 and "metadata.json: unreadable" in err and len(err.strip().splitlines()) == 1
    (checkpoints / STEP4 / "metadata.json").write_text("[]")
    code, _, err = viewer(capsys, checkpoints, "view", STEP4)
    assert code == 2 and "not a checkpoint metadata file" in err
    (tmp_path / "empty").mkdir()
    code, _, err = viewer(capsys, tmp_path / "empty", "view", "latest")
    assert code == 2 and "no checkpoint" in err


# --- compare ---------------------------------------------------------------------------------------

def test_compare_orders_by_step_and_shows_changes(capsys, checkpoints):
    code, out, _ = viewer(capsys, checkpoints, "compare", STEP8, STEP4)
    assert code == 0
    lines = out.splitlines()
    row4 = next(i for i, line in enumerate(lines) if line.startswith(STEP4))
    row8 = next(i for i, line in enumerate(lines) if line.startswith(STEP8))
    assert row4 < row8
    delta = lines[row8 - 1].split()
    loss4, loss8 = metadata(checkpoints, STEP4)["current_loss"], metadata(checkpoints, STEP8)["current_loss"]
    assert delta[0] == "Δ" and delta[1] == "+4" and delta[2] == f"{loss8 - loss4:+.6f}"
    assert "+512" in delta
    assert lines[row8].split()[5] == "1,024"
    assert f"Overall: loss {loss8 - loss4:+.6f}" in out


def test_compare_needs_two_existing_checkpoints(capsys, checkpoints):
    code, _, err = viewer(capsys, checkpoints, "compare", STEP4, STEP4)
    assert code == 2 and "at least two" in err
    code, _, err = viewer(capsys, checkpoints, "compare", STEP4, "checkpoint-nope")
    assert code == 2 and "not found" in err


# --- plot ------------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_plot_saves_a_png(capsys, checkpoints, tmp_path):
    target = tmp_path / "plot.png"
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--save", str(target))
    assert code == 0 and str(target) in out
    width, height = png_size(target)
    assert width >= 800 and height >= 500
    assert target.stat().st_size > 20_000  # two drawn curves, not a blank canvas
    code, _, err = viewer(capsys, checkpoints, "plot", STEP8, "--save", str(tmp_path / "no" / "plot.png"))
    assert code == 2 and "does not exist" in err


def drawn(checkpoints: Path, name: str, log_dir: Path) -> tuple[dict[str, list[tuple[float, float]]], tuple]:
    """What plot draws on its loss axis for a checkpoint: each curve's points by label, and the best point
    with its label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    record = load_record(find_checkpoint(checkpoints, name))
    figure = plot_metrics(plt, record, validation_history(record, log_dir)[0])
    axis = figure.axes[0]
    curves = {line.get_label(): [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
              for line in axis.get_lines()}
    (best,) = axis.collections
    point = tuple(float(value) for value in best.get_offsets()[0])
    plt.close(figure)
    return curves, (point, best.get_label())


def test_plot_draws_the_validation_loss_as_a_curve_of_its_own(capsys, checkpoints, logs, tmp_path):
    recorded = json.loads((checkpoints / STEP8 / "training_metrics.json").read_text())["validation_history"]
    assert [entry["step"] for entry in recorded] == [4, 8]  # the checkpoint records its curve
    as_an_earlier_version(checkpoints)  # which did not: metrics.jsonl has it
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--log-dir", str(logs), "--save", str(tmp_path / "p.png"))
    assert code == 0 and f"📏 Validation loss from {logs / 'metrics.jsonl'} (2 points)\n" in out
    logged = [(float(r["step"]), r["eval_loss"]) for r in read_metrics(logs) if "eval_loss" in r]
    losses = json.loads((checkpoints / STEP8 / "training_metrics.json").read_text())["loss_history"]
    validation = metadata(checkpoints, STEP8)["validation_metrics"]
    curves, (best, label) = drawn(checkpoints, STEP8, logs)
    assert curves["training loss"] == [(float(entry["step"]), entry["loss"]) for entry in losses]
    assert curves["validation loss"] == logged and [step for step, _ in logged] == [4.0, 8.0]
    assert best == (validation["best_eval_step"], validation["best_eval_loss"]) and best in curves["validation loss"]
    assert label == f"best validation loss {validation['best_eval_loss']:.4f} @ {validation['best_eval_step']}"
    # The log goes on past an older checkpoint: its curve stops at its own step.
    assert drawn(checkpoints, STEP4, logs)[0]["validation loss"] == logged[:1]


def test_validation_points_keep_a_steps_last_line_up_to_the_checkpoint():
    """A run resumed from an earlier checkpoint logs the steps after it again; other lines are not validations."""
    entries = [{"step": 4, "eval_loss": 2.0}, {"step": 4, "loss": 1.0}, {"step": 8, "eval_loss": 1.5},
               {"step": 4, "eval_loss": 1.9}, {"step": 12, "eval_loss": 1.0}, "junk", {"step": "8", "eval_loss": 1.0},
               {"event": "save", "step": 8}]
    assert validation_points(entries, up_to_step=8) == [(4, 1.9), (8, 1.5)]


def test_plot_prefers_the_checkpoints_own_validation_history(capsys, checkpoints, logs, tmp_path):
    path = checkpoints / STEP8 / "training_metrics.json"
    history = [{"step": 2, "eval_loss": 8.6}, {"step": 4, "eval_loss": 8.5}, {"step": 6, "eval_loss": 8.45}]
    path.write_text(json.dumps(json.loads(path.read_text()) | {"validation_history": history}))
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--log-dir", str(logs), "--save", str(tmp_path / "p.png"))
    assert code == 0 and f"📏 Validation loss from {path} (3 points)\n" in out
    assert drawn(checkpoints, STEP8, logs)[0]["validation loss"] == [(2.0, 8.6), (4.0, 8.5), (6.0, 8.45)]


def test_plot_without_validation_history_says_so_in_one_line(capsys, checkpoints, tmp_path):
    as_an_earlier_version(checkpoints)
    target = str(tmp_path / "p.png")
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--log-dir", str(tmp_path / "nowhere"), "--save", target)
    lines = [line for line in out.splitlines() if line.startswith("📏")]
    assert code == 0 and len(lines) == 1
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    assert lines[0].startswith(f"📏 No validation history found ({missing}: No such file")
    (tmp_path / "training-only").mkdir()
    (tmp_path / "training-only" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--log-dir", str(tmp_path / "training-only"),
                          "--save", target)
    assert code == 0 and f"No validation history found (no validation lines in {tmp_path / 'training-only'}" in out


def test_plot_of_a_run_without_validation_marks_the_best_training_loss(checkpoints, tmp_path):
    losses = without_validation(checkpoints / STEP8)
    curves, (best, label) = drawn(checkpoints, STEP8, tmp_path / "nowhere")
    best_step = losses.index(min(losses)) + 1
    assert "validation loss" not in curves
    assert best == (best_step, min(losses)) and best in curves["training loss"]
    assert label == f"best training loss {min(losses):.4f} @ {best_step}"


def test_plot_log_dir_defaults_to_the_configs_then_to_logs(capsys, checkpoints, logs, tmp_path, monkeypatch):
    as_an_earlier_version(checkpoints)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_preset": "tiny", "checkpoint_dir": str(checkpoints), "log_dir": str(logs)}))
    code = main(["plot", STEP8, "--config", str(config), "--save", str(tmp_path / "p.png")])
    assert code == 0 and f"Validation loss from {logs / 'metrics.jsonl'}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # holds logs/
    code, out, _ = viewer(capsys, checkpoints, "plot", STEP8, "--save", str(tmp_path / "p.png"))
    assert code == 0 and "Validation loss from logs/metrics.jsonl (2 points)" in out


def test_plot_without_a_display_writes_into_the_checkpoint_folder(capsys, checkpoints, tmp_path):
    """Run as a user would, from another folder and with no display: the plot lands beside the checkpoints,
    and list, view and the no-checkpoints hint take plots/ for no checkpoint."""
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "checkpoint_viewer.py"),
                             "--checkpoint-dir", str(checkpoints), "plot", "latest"],
                            cwd=tmp_path / "elsewhere", capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    target = checkpoints / "plots" / f"{STEP8}-plot.png"
    assert f"No display available: saving the plot to {target}" in result.stdout
    width, height = png_size(target)
    assert width >= 800 and height >= 500
    assert list((tmp_path / "elsewhere").iterdir()) == []
    code, out, _ = viewer(capsys, checkpoints, "list")
    assert code == 0 and "Found 2 checkpoints" in out and "plots" not in out
    code, out, _ = viewer(capsys, checkpoints, "view", "latest")
    assert code == 0 and f"Checkpoint Summary: {STEP8}" in out
    shutil.rmtree(checkpoints / STEP4)
    shutil.rmtree(checkpoints / STEP8)
    code, _, err = viewer(capsys, checkpoints, "list")
    assert code == 2
    assert err == f"error: no checkpoints in {checkpoints} (pass --checkpoint-dir or --config to look elsewhere)\n"
