"""train.py's memory preflight and MFU as a run reports them: a model that cannot fit is refused before anything is
built, and every metrics line carries MFU against the given peak (bf16 autocast on the CPU)."""
import json
from pathlib import Path

import pytest

from configs.model_config import resolve_shape
from conftest import MICRO_MODEL, read_metrics, run_train, write_config
from utils.performance import flops_per_token


def test_train_refuses_a_model_that_cannot_fit_and_logs_mfu(tmp_path: Path, sample_data: Path) -> None:
    huge = write_config(tmp_path, sample_data, model={**MICRO_MODEL, "hidden_size": 65536, "intermediate_size": 65536})
    result = run_train("--config", str(huge))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: memory preflight: the tiny model")
    assert not (tmp_path / "checkpoints").exists()

    # bf16 autocast on the CPU: the precision path GPUs take by default, logits kept in bf16
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, mixed_precision="bf16")
    result = run_train("--config", str(config), "--peak-tflops", "0.001")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mixed precision bf16" in result.stderr
    shape = resolve_shape("tiny", MICRO_MODEL)
    for record in read_metrics(tmp_path / "logs"):
        assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * flops_per_token(shape) / 1e9)
        assert record["gpu_memory_gib"] is None  # no GPU
    assert "MFU against 0.001 TFLOP/s per process" in result.stderr
    saved = json.loads(next((tmp_path / "checkpoints").glob("checkpoint-*/training_config.json")).read_text())
    assert saved["peak_tflops"] == 0.001 and saved["memory_preflight"] is True


def test_an_auto_micro_batch_is_chosen_said_and_recorded(tmp_path: Path, sample_data: Path) -> None:
    # On this machine's RAM the micro model fits any micro-batch: the largest that shares 8 samples over 1 process.
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, global_batch_size=8,
                          per_device_train_batch_size="auto")
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'Micro-batch: 8 (per_device_train_batch_size "auto": the largest that shares global_batch_size 8 over ' \
           "1 process(es) and fits, about " in result.stderr
    assert "Batch: 8 samples a step = micro-batch 8 x 1 accumulated x 1 process(es)" in result.stderr
    assert "💾 Saving checkpoint at step 2 (final)" in result.stderr  # the last step's save, not "(scheduled)"
    saved = json.loads(next((tmp_path / "checkpoints").glob("checkpoint-*/training_config.json")).read_text())
    assert saved["per_device_train_batch_size"] == 8 and saved["samples_per_step"] == 8
