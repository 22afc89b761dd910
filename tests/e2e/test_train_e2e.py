"""train.py end to end on CPU: checkpoints, exact resume, refusals, signals, bad data, two processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from configs.training_config import ConfigError
from conftest import REPO_ROOT, read_metrics, run_train, write_config
from utils.accelerator import check_process_group
from utils.data.order import epoch_shard_order
from utils.training_utils import lr_multiplier

CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                    "training_config.json", "metadata.json", "training_metrics.json", "data_state.json"}
METADATA_FIELDS = {"step", "epoch", "current_loss", "best_loss", "loss_history", "learning_rates",
                   "validation_metrics", "training_progress", "system_info", "timestamp"}


def checkpoints(folder: Path) -> list[str]:
    return sorted((p.name for p in (folder / "checkpoints").glob("checkpoint-*")),
                  key=lambda name: int(name.split("-step")[1].split("-")[0]))


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_tiny_run_writes_complete_checkpoints_and_learns(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=30, save_steps=10, keep_checkpoints=2)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]

    names = checkpoints(tmp_path)
    assert [n.split("-step")[1].split("-")[0] for n in names] == ["20", "30"]  # newest 2 kept
    final = tmp_path / "checkpoints" / names[-1]
    assert CHECKPOINT_FILES <= {p.name for p in final.iterdir()}
    metadata = json.loads((final / "metadata.json").read_text())
    assert METADATA_FIELDS <= set(metadata)
    assert metadata["step"] == 30 and metadata["training_progress"]["tokens_seen"] == 30 * 2 * 64
    assert metadata["system_info"]["num_processes"] == 1 and metadata["system_info"]["mixed_precision"] == "no"
    assert {"current_avg_loss", "steps_since_best", "loss_trend"} <= set(metadata["validation_metrics"])
    assert json.loads((final / "training_config.json").read_text())["max_steps"] == 30

    lines = read_metrics(tmp_path / "logs")
    assert [line["step"] for line in lines] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_sec", "elapsed_s"):
        assert all(key in line for line in lines)
    first, last = np.mean([x["loss"] for x in lines[:3]]), np.mean([x["loss"] for x in lines[-3:]])
    assert first > np.log(4096) - 1.0  # an untrained model starts near ln(vocab)
    assert last < first - 0.5
    assert metadata["current_loss"] == pytest.approx(lines[-1]["loss"])
    assert metadata["best_loss"] == pytest.approx(min(x["loss"] for x in lines))
    assert list((tmp_path / "logs" / "refocused-ai").rglob("events.out.tfevents.*"))  # project_name


@pytest.mark.parametrize("init, output_std, other_std", [("pythia", 2 / (2 * 64 ** 0.5), (2 / (5 * 64)) ** 0.5),
                                                         ("hf", 0.02, 0.02)])
def test_a_fresh_model_starts_from_the_configured_init(tmp_path: Path, sample_data: Path, init: str,
                                                       output_std: float, other_std: float) -> None:
    # One step at a negligible rate: the saved weights are the initial ones to ~1e-9.
    config = write_config(tmp_path, sample_data, max_steps=1, save_steps=1, learning_rate=1e-9, warmup_steps=0,
                          init=init)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = weights(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1])
    for name, tensor in saved.items():
        if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            assert tensor.std() == pytest.approx(output_std, rel=0.1), name
        elif name.endswith(("query_key_value.weight", "dense_h_to_4h.weight", "embed_in.weight")):
            assert tensor.std() == pytest.approx(other_std, rel=0.1), name


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, sample_data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
    # lr_decay_steps pins the schedule, so a run stopped at step 6 follows the same learning rates.
    options = dict(max_steps=12, save_steps=6, lr_decay_steps=12, gradient_accumulation_steps=2)
    result = run_train("--config", str(write_config(straight, sample_data, **options)))
    assert result.returncode == 0, result.stderr[-3000:]
    config = write_config(split, sample_data, **options)
    assert run_train("--config", str(config), "--max-steps", "6").returncode == 0
    result = run_train("--config", str(config), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint-epoch0-step6" in result.stderr

    losses = [line["loss"] for line in read_metrics(straight / "logs")]
    resumed = [line["loss"] for line in read_metrics(split / "logs")]
    assert len(losses) == 12 and resumed == losses  # bit-identical, not approximately equal
    a = weights(straight / "checkpoints" / checkpoints(straight)[-1])
    b = weights(split / "checkpoints" / checkpoints(split)[-1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    state_a = json.loads((straight / "checkpoints" / checkpoints(straight)[-1] / "data_state.json").read_text())
    state_b = json.loads((split / "checkpoints" / checkpoints(split)[-1] / "data_state.json").read_text())
    assert state_a == state_b


def test_logged_learning_rate_is_the_one_each_step_used_and_a_resume_applies_a_changed_config(
        tmp_path: Path, sample_data: Path) -> None:
    options = dict(max_steps=4, save_steps=4, lr_decay_steps=8, warmup_steps=2, weight_decay=0.1)
    config = write_config(tmp_path, sample_data, **options)
    assert run_train("--config", str(config)).returncode == 0
    # A changed peak learning rate and weight decay: the resumed steps must use them, not the saved ones.
    config = write_config(tmp_path, sample_data, **{**options, "learning_rate": 5e-4, "weight_decay": 0.0})
    result = run_train("--config", str(config), "--resume", "latest", "--max-steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learning_rate: 0.001 -> 0.0005" in result.stderr and "weight_decay: 0.1 -> 0.0" in result.stderr

    peaks = [1e-3] * 4 + [5e-4] * 2
    expected = [peak * lr_multiplier(index, warmup_steps=2, schedule_steps=8, min_lr_ratio=0.1)
                for index, peak in enumerate(peaks)]  # optimizer step index: 0-based
    assert [line["lr"] for line in read_metrics(tmp_path / "logs")] == pytest.approx(expected, rel=1e-12)
    saved = torch.load(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1] / "optimizer.bin", weights_only=True)
    assert [group["weight_decay"] for group in saved["param_groups"]] == [0.0, 0.0]
    assert [group["initial_lr"] for group in saved["param_groups"]] == [5e-4, 5e-4]


def test_a_resume_never_reshapes_the_schedule_unasked(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=6, save_steps=6, warmup_steps=2)
    assert run_train("--config", str(config)).returncode == 0
    # lr_decay_steps unset: the cosine ran over max_steps 6, and --max-steps 9 would stretch what is left of it.
    refused = run_train("--config", str(config), "--resume", "latest", "--max-steps", "9")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: resuming checkpoint-epoch0-step6-files0 would "
                                                               "change the learning-rate schedule from 6 to 9 steps")
    assert "lr_decay_steps 6 to keep it" in refused.stderr and "lr_decay_steps 9 to decay" in refused.stderr
    # The first way out: keep the schedule; the extra steps run at the final rate.
    kept = write_config(tmp_path, sample_data, max_steps=9, save_steps=9, warmup_steps=2, lr_decay_steps=6)
    result = run_train("--config", str(kept), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Changed since" not in result.stderr
    rates = [line["lr"] for line in read_metrics(tmp_path / "logs")]
    assert rates == pytest.approx([1e-3 * lr_multiplier(i, 2, 6, 0.1) for i in range(9)], rel=1e-12)
    assert rates[-3:] == pytest.approx([1e-4] * 3)
    # The second: an explicit new length applies from the resumed step on, and says so.
    longer = write_config(tmp_path, sample_data, max_steps=12, save_steps=12, warmup_steps=2, lr_decay_steps=12)
    result = run_train("--config", str(longer), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Changed since checkpoint-epoch0-step9-files0: lr_decay_steps: 6 -> 12" in result.stderr
    assert [line["lr"] for line in read_metrics(tmp_path / "logs")][9:] == pytest.approx(
        [1e-3 * lr_multiplier(i, 2, 12, 0.1) for i in range(9, 12)], rel=1e-12)


def run_diverging(after_step: int, *args: str) -> subprocess.CompletedProcess:
    """train.py whose weights turn NaN after `after_step` (tests/e2e/train_diverging.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DIVERGE_AFTER_STEP": str(after_step)}
    return subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_diverging.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240, env=env)


def test_a_diverging_run_stops_before_a_nan_reaches_a_checkpoint(tmp_path: Path, sample_data: Path) -> None:
    options = dict(max_steps=30, save_steps=5, logging_steps=5, keep_checkpoints=1, lr_decay_steps=30, warmup_steps=0)
    config = write_config(tmp_path, sample_data, **options)
    assert run_train("--config", str(config), "--max-steps", "5").returncode == 0
    good = checkpoints(tmp_path)
    # NaN weights after step 7, between two logging steps (tests/e2e/train_diverging.py).
    result = run_diverging(7, "--config", str(config), "--resume", "latest")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].endswith("NaN or infinite since step 8 (seen at step 10); nothing after step 5 was saved; the "
                              "newest good checkpoint is checkpoint-epoch0-step5-files0: resume it (--resume latest) "
                              "with a lower learning_rate or max_grad_norm"), errors[0]
    assert checkpoints(tmp_path) == good  # nothing saved, nothing pruned
    assert all(np.isfinite(tensor).all() for tensor in weights(tmp_path / "checkpoints" / good[0]).values())
    assert not np.isfinite(read_metrics(tmp_path / "logs")[-1]["loss"])  # the log shows what happened


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, lr_decay_steps=4)
    assert run_train("--config", str(config)).returncode == 0
    checkpoint = tmp_path / "checkpoints" / checkpoints(tmp_path)[-1]
    recorded = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert set(recorded) == {p.name for p in checkpoint.iterdir()} - {"checksums.json"}
    # 64 random bytes inside the weights: the same size, a file that loads fine, and wrong (tests/unit/test_checkpointer.py
    # has the other cases in process).
    damaged = checkpoint / "model.safetensors"
    original = damaged.read_bytes()
    middle = len(original) // 2
    damaged.write_bytes(original[:middle] + np.random.default_rng(0).bytes(64) + original[middle + 64:])
    result = run_train("--config", str(config), "--resume", "latest", "--max-steps", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {damaged}: damaged (crc32c ")


def test_resume_refusals_never_start_fresh_or_overwrite(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2)
    assert run_train("--config", str(config)).returncode == 0
    before = checkpoints(tmp_path)

    missing = run_train("--config", str(config), "--resume", "checkpoint-epoch0-step99-files0")
    assert missing.returncode == 2
    assert "not found" in missing.stderr and before[-1] in missing.stderr  # lists what exists
    assert "Traceback" not in missing.stderr

    fresh = run_train("--config", str(config), "--max-steps", "6")
    assert fresh.returncode == 2 and "--resume latest" in fresh.stderr

    older = run_train("--config", str(config), "--resume", before[0], "--max-steps", "6")
    assert older.returncode == 2 and "would overwrite newer checkpoints" in older.stderr
    assert checkpoints(tmp_path) == before

    other_shape = write_config(tmp_path, sample_data, max_steps=6, model={"hidden_size": 32, "seq_len": 64,
                                                                        "num_attention_heads": 4,
                                                                        "num_hidden_layers": 2,
                                                                        "intermediate_size": 64})
    mismatch = run_train("--config", str(other_shape), "--resume", "latest")
    assert mismatch.returncode == 2 and "holds a model of shape" in mismatch.stderr


def test_incomplete_save_is_ignored_and_cleaned(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, lr_decay_steps=4)
    assert run_train("--config", str(config)).returncode == 0
    crashed = tmp_path / "checkpoints" / ".tmp-checkpoint-epoch0-step4-files0"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    result = run_train("--config", str(config), "--resume", "latest", "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint-epoch0-step2" in result.stderr
    assert not crashed.exists() and checkpoints(tmp_path)[-1] == "checkpoint-epoch0-step4-files0"


def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=100000, save_steps=100000, warmup_steps=2,
                          lr_decay_steps=100000)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    second = run_train("--config", str(config), "--resume", "latest")  # started again by mistake, say
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: another training run (pid {process.pid} on ")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last_step = read_metrics(tmp_path / "logs")[-1]["step"]
    assert checkpoints(tmp_path) == [f"checkpoint-epoch0-step{last_step}-files0"]

    result = run_train("--config", str(config), "--resume", "latest", "--max-steps", str(last_step + 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in read_metrics(tmp_path / "logs")][-3:] == [last_step, last_step + 1,
                                                                               last_step + 2]


def good_then_corrupt_shard(data: Path, steps: int) -> int:
    """One good shard with exactly `steps` steps of samples (batch 2 x 64 tokens), then a corrupt one; returns a
    seed that reads them in that order."""
    data.mkdir()
    np.savez(data / "tokenized_a.npz", input_ids=np.arange(1, 2 * steps * 64 + 10) % 4000)
    (data / "tokenized_b.npz").write_bytes(b"PK\x03\x04 truncated")
    return next(s for s in range(100) if list(epoch_shard_order(2, s, 0)) == [0, 1])


def test_bad_shard_mid_run_saves_progress_and_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed = good_then_corrupt_shard(data, steps=3)
    # Shard by shard, so that the good shard trains before the bad one is read (in one window of both, or in
    # windows that mix every shard, the bad shard would stop the run before its first step).
    config = write_config(tmp_path, data, max_steps=10, save_steps=100, seed=seed, shuffle_window_shards=1,
                          mix_whole_dataset=False)
    result = run_train("--config", str(config))
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "tokenized_b.npz" in error_lines[0]
    assert checkpoints(tmp_path) == ["checkpoint-epoch0-step3-files1"]

    skipping = write_config(tmp_path, data, max_steps=5, save_steps=100, seed=seed, skip_bad_shards=True,
                            shuffle_window_shards=1, mix_whole_dataset=False, checkpoint_dir=str(tmp_path / "skip"),
                            log_dir=str(tmp_path / "skiplogs"))
    result = run_train("--config", str(skipping))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping bad shard" in result.stderr
    assert read_metrics(tmp_path / "skiplogs")[-1]["shards_skipped"] == 1


def test_a_nan_since_the_last_logging_step_never_reaches_the_save_of_a_data_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed = good_then_corrupt_shard(data, steps=8)
    # The weights turn NaN after step 3, and no step is logged before the bad shard stops the run after step 8.
    config = write_config(tmp_path, data, max_steps=20, save_steps=100, logging_steps=100, seed=seed,
                          shuffle_window_shards=1, mix_whole_dataset=False, warmup_steps=0, lr_decay_steps=20)
    result = run_diverging(3, "--config", str(config))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "error: training diverged: the loss or the gradient norm is NaN or infinite since step 4 (seen at step 8); " \
           "nothing after step 0 was saved" in result.stderr, result.stderr[-3000:]
    assert checkpoints(tmp_path) == []


def test_no_shards_and_bad_config_are_one_line_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    result = run_train("--config", str(config))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "no shards matching" in result.stderr and "Traceback" not in result.stderr
    result = run_train("--config", "no-such-config")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_explains_the_options() -> None:
    result = run_train("--help")
    assert result.returncode == 0
    for flag in ("--config", "--max-steps", "--resume", "--no-background-upload", "--data"):
        assert flag in result.stdout


def test_two_processes_on_cpu_share_one_run(tmp_path: Path, sample_data: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    result = run_train("--config", str(config), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "checkpoints" / checkpoints(tmp_path)[-1]
    metadata = json.loads((final / "metadata.json").read_text())
    assert metadata["system_info"]["num_processes"] == 2
    assert metadata["training_progress"]["tokens_seen"] == 4 * 2 * 2 * 64  # both processes' samples count
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final.iterdir()}
    assert [line["step"] for line in read_metrics(tmp_path / "logs")] == [1, 2, 3, 4]  # one writer


def test_processes_that_did_not_join_one_group_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched as 2 processes but Accelerate sees 1"):
        check_process_group(1)
    check_process_group(2)


def test_unwritable_output_folders_are_refused_before_training(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2)
    (tmp_path / "a_file").write_text("not a folder")
    for flag in ("--checkpoint-dir", "--log-dir"):
        result = run_train("--config", str(config), flag, str(tmp_path / "a_file"))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{flag[2:].replace('-', '_')} {tmp_path / 'a_file'}: not a writable folder" in result.stderr
        assert "Model:" not in result.stderr  # refused before the model was built


def test_a_resume_after_a_kill_logs_each_step_once(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=6, save_steps=4, keep_checkpoints=5)
    assert run_train("--config", str(config)).returncode == 0
    # As if killed after logging step 6 but before its checkpoint: the log is ahead of the newest checkpoint.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-epoch0-step6-files0")
    result = run_train("--config", str(config), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in read_metrics(tmp_path / "logs")] == [1, 2, 3, 4, 5, 6]


def test_an_unreadable_upload_record_is_found_before_training(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "uploads.json").write_text('{"checkpoints": {"checkpoint-epoch0-st')  # cut short
    result = run_train("--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Model:" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'checkpoints' / 'uploads.json'}: "
                                                             "unreadable")
