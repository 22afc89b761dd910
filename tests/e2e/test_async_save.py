"""Asynchronous checkpoint saves (on by default on CUDA; `async_save: true` here on CPU) and the time-based
cadence: the same files as a synchronous save, exact resume, a kill -9 during a background write, a save that
waits for the previous write, and saves every N minutes."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from configs.training_config import ConfigError, config_from_dict
from conftest import MICRO_MODEL, REPO_ROOT, read_events, read_metrics, run_train, write_config
from utils.accelerator import dynamo_plugin
from utils.checkpoints.folders import list_checkpoints
from utils.checkpoints.writer import HostBuffers, StateSnapshot
from utils.model import build_model
from utils.training_utils import make_optimizer

STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def names(folder: Path) -> list[str]:
    return [info.name for info in list_checkpoints(folder / "checkpoints")]


def test_async_saves_write_the_same_files_and_resume_bit_identically(tmp_path: Path, sample_data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    options = dict(max_steps=8, save_steps=4, lr_decay_steps=8, gradient_accumulation_steps=2)
    for folder in (straight, split):
        folder.mkdir()
    result = run_train("--config", str(write_config(straight, sample_data, async_save=False, **options)))
    assert result.returncode == 0, result.stderr[-3000:]
    config = write_config(split, sample_data, async_save=True, **options)
    assert run_train("--config", str(config), "--max-steps", "4").returncode == 0
    result = run_train("--config", str(config), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written asynchronously" in result.stderr and "Resumed from checkpoint-epoch0-step4-files0" in result.stderr
    assert re.search(r"✅ Saved checkpoint-epoch\d+-step8-files\d+ \(training paused \d+\.\d s for it, written in "
                     r"the background in \d+\.\d s\)", result.stderr), result.stderr[-3000:]
    assert re.search(r"Host memory for asynchronous saves: \d+\.\d\d GB in one allocation \(\d+\.\d s\), reused by "
                     r"the next saves", result.stderr), result.stderr[-3000:]

    assert [line["loss"] for line in read_metrics(split / "logs")] == [line["loss"] for line in
                                                                      read_metrics(straight / "logs")]
    final = "checkpoint-epoch0-step8-files0"
    for name in STATE_FILES:  # byte for byte what Accelerate's synchronous save_state writes
        assert (split / "checkpoints" / final / name).read_bytes() == (straight / "checkpoints" / final / name).read_bytes()
    saves = read_events(split / "logs", "save")
    assert [(event["step"], event["checkpoint"], event["async"]) for event in saves] == [
        (4, "checkpoint-epoch0-step4-files0", True), (8, final, True)]
    assert all(event["bytes"] > 0 and event["seconds_blocked"] >= 0 and event["seconds_writing"] > 0
               for event in saves)
    assert [event["async"] for event in read_events(straight / "logs", "save")] == [False, False]


def test_a_compiled_model_is_written_in_the_background_under_its_own_names(tmp_path: Path) -> None:
    # torch.compile wraps the model (its state dict says "_orig_mod.<name>"); save_state writes the model inside.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, dynamo_plugin=dynamo_plugin(True, fsdp=False, backend="aot_eager"))
    torch.manual_seed(0)
    config = config_from_dict({"model_preset": "tiny", "model": MICRO_MODEL, "warmup_steps": 1}, "test")
    model = build_model(config.model_shape())
    objects = accelerator.prepare(model, *make_optimizer(model, config, fused=True))
    model, optimizer, _ = objects
    tokens = torch.randint(0, 4096, (2, 64))
    accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
    optimizer.step()
    assert next(iter(model.state_dict())).startswith("_orig_mod.")
    accelerator.save_state(str(tmp_path / "sync"))
    (tmp_path / "async").mkdir()
    StateSnapshot(accelerator, objects, HostBuffers(pin=False)).write(tmp_path / "async")
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin"):
        assert (tmp_path / "async" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes(), name
    assert all(not key.startswith("_orig_mod.") for key in load_file(tmp_path / "async" / "model.safetensors"))
    AcceleratorState._reset_state(reset_partial_state=True)


def test_kill_9_during_a_background_write_leaves_no_checkpoint_and_resume_takes_the_previous(
        tmp_path: Path, sample_data: Path) -> None:
    options = dict(max_steps=6, save_steps=2, lr_decay_steps=6, async_save=True)
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_train("--config", str(write_config(straight, sample_data, **options))).returncode == 0

    config = write_config(tmp_path, sample_data, **options)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_with_slow_writes.py"),
                                "--config", str(config)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SLOW_WRITE_S": "4"})
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 120
    # Step 2's write done, step 4's under way (the loop waited for step 2's, and said so).
    while not (names(tmp_path) and (checkpoints / ".tmp-checkpoint-epoch0-step4-files0").is_dir()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert "checkpoint-epoch0-step2-files0 is still being written: waiting for it" in stderr
    assert names(tmp_path) == ["checkpoint-epoch0-step2-files0"]  # nothing partial looks complete

    result = run_train("--config", str(config), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint-epoch0-step2-files0" in result.stderr
    assert "Removed .tmp-checkpoint-epoch0-step4-files0" in result.stderr
    resumed = {line["step"]: line["loss"] for line in read_metrics(tmp_path / "logs")}
    assert {line["step"]: line["loss"] for line in read_metrics(straight / "logs")} == resumed  # bit-identical
    assert names(tmp_path)[-1] == "checkpoint-epoch0-step6-files0"


def test_a_failed_background_write_stops_the_run_without_another_save(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=40, save_steps=4, keep_checkpoints=1, lr_decay_steps=40,
                          async_save=True)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_with_slow_writes.py"), "--config",
                             str(config)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FAIL_WRITE": "2"})
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("error: saving checkpoint-epoch0-step8-files0 in ") and "Input/output error" in errors[0]
    assert errors[0].endswith("; saved checkpoint-epoch0-step4-files0")  # the newest good one
    assert "then stopping without a save" in result.stderr
    # The loop went on while the write ran, then stopped without another save: step 4's stays, unpruned.
    assert names(tmp_path) == ["checkpoint-epoch0-step4-files0"]
    assert read_metrics(tmp_path / "logs")[-1]["step"] < 12


def test_saves_every_few_minutes_instead_of_every_save_steps(tmp_path: Path, sample_data: Path) -> None:
    # 0.003 minutes = 0.18 s: a save every few steps of the micro model, whatever save_steps says.
    config = write_config(tmp_path, sample_data, max_steps=40, save_steps=1000, save_every_minutes=0.003,
                          keep_checkpoints=100, lr_decay_steps=40)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoints: every 0.003 minutes" in result.stderr
    steps = [info.step for info in list_checkpoints(tmp_path / "checkpoints")]
    assert len(steps) >= 3 and steps[-1] == 40 and 1000 not in steps


@pytest.mark.parametrize("values, message", [
    ({"save_every_minutes": 0}, "save_every_minutes must be a positive number"),
    ({"async_save": "yes"}, "async_save must be")])
def test_a_bad_async_setting_or_cadence_is_a_config_error(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values, "test")


def test_two_processes_agree_on_timed_asynchronous_saves(tmp_path: Path, sample_data: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    config = write_config(tmp_path, sample_data, max_steps=24, save_steps=1000, save_every_minutes=0.003,
                          keep_checkpoints=100, lr_decay_steps=24, async_save=True)
    result = run_train("--config", str(config), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert len(saved) >= 2 and saved[-1].step == 24
    for info in saved:  # both processes took part in every save (each wrote its RNG state)
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in info.path.iterdir()}
