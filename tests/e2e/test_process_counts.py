"""A run is the same run on any number of processes: its global batch is the config's (accumulation makes up the
difference), and a checkpoint saved by N processes resumes on M, 2 -> 1 and 1 -> 2, with the losses, weights, tokens
seen and data position of an uninterrupted run; another global batch is refused unless asked for."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO_ROOT, read_metrics, run_train, write_config
from helpers import assert_same_weights, free_port

OPTIONS = dict(global_batch_size=4, per_device_train_batch_size=1, max_steps=6, lr_decay_steps=6, save_steps=2,
               keep_checkpoints=10)


def checkpoint(step: int) -> str:
    return f"checkpoint-epoch0-step{step}-files0"


def train(folder: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, str(REPO_ROOT / "scripts" / "launch.py"), "--nproc_per_node", str(processes),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else None)
    result = run_train("--config", str(folder / "config.json"), *args, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_checkpoint_of_two_processes_resumes_on_one_and_back_on_two(tmp_path: Path, sample_data: Path) -> None:
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    for folder in (straight, moved):
        folder.mkdir()
        write_config(folder, sample_data, **OPTIONS)
    result = train(straight, 2)
    assert "Batch: 4 samples a step = micro-batch 1 x 2 accumulated x 2 process(es)" in result.stderr

    (moved / "checkpoints").mkdir()
    shutil.copytree(straight / "checkpoints" / checkpoint(2), moved / "checkpoints" / checkpoint(2))
    one = train(moved, 1, "--resume", "latest", "--max-steps", "4")  # 2 -> 1: four micro-batches a step
    assert "Batch: 4 samples a step = micro-batch 1 x 4 accumulated x 1 process(es)" in one.stderr
    assert f"{checkpoint(2)} was saved by 2 process(es), this run has 1" in one.stderr
    two = train(moved, 2, "--resume", "latest")  # 1 -> 2
    assert f"{checkpoint(4)} was saved by 1 process(es), this run has 2" in two.stderr

    expected, resumed = read_metrics(straight / "logs")[2:], read_metrics(moved / "logs")
    assert [line["step"] for line in resumed] == [line["step"] for line in expected] == [3, 4, 5, 6]
    for a, b in zip(expected, resumed):  # the same samples each step; sums in another order
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
        assert b["tokens_seen"] == a["tokens_seen"]
    final = checkpoint(6)
    assert_same_weights(load_file(straight / "checkpoints" / final / "model.safetensors"),
                        load_file(moved / "checkpoints" / final / "model.safetensors"))
    positions = [json.loads((folder / "checkpoints" / final / "data_state.json").read_text())["position"]
                 for folder in (straight, moved)]
    assert positions[0] == positions[1] and positions[0]["samples_consumed"] == 6 * 4


def test_another_global_batch_is_refused_unless_asked_for(tmp_path: Path, sample_data: Path) -> None:
    # The batch of a config without global_batch_size changes with the number of processes: refused on resume.
    write_config(tmp_path, sample_data, per_device_train_batch_size=2, max_steps=2, save_steps=2, lr_decay_steps=4)
    train(tmp_path, 1)
    result = run_train("--config", str(tmp_path / "config.json"), "--resume", "latest", "--max-steps", "4",
                       "--set", "per_device_train_batch_size=4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: resuming {checkpoint(2)} would change the global batch from 2 to 4 samples a step "
        "(per_device_train_batch_size x accumulation x 1 process(es)): set global_batch_size 2 to keep it on any "
        "number of processes, or --set accept_new_global_batch=true to train on with the new one")
    result = run_train("--config", str(tmp_path / "config.json"), "--resume", "latest", "--max-steps", "4",
                       "--set", "per_device_train_batch_size=4", "--set", "accept_new_global_batch=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Changed since {checkpoint(2)}: global batch: 2 -> 4 samples a step" in result.stderr
