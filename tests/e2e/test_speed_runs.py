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
