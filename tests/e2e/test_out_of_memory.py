"""Running out of GPU memory (raised as CUDA's allocator raises it, by tests/e2e/train_running_out_of_memory.py):
at a micro-batch train.py chose ("auto"), the first step is taken again once at the next smaller micro-batch that
shares the global batch, and the run is the one that micro-batch gives; a micro-batch the user set, or a second
failure, is one error line with the ways out, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, read_metrics, run_train, write_config

OPTIONS = dict(max_steps=4, save_steps=4, lr_decay_steps=4, global_batch_size=8)


def run_out_of_memory(config: Path, oom_above: int) -> subprocess.CompletedProcess:
    """train.py whose model runs out of memory at micro-batches above `oom_above`."""
    command = [sys.executable, str(REPO_ROOT / "tests" / "e2e" / "train_running_out_of_memory.py"),
               "--config", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OOM_ABOVE": str(oom_above)}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, env=env)


def test_an_auto_micro_batch_that_runs_out_of_memory_is_retried_once_smaller(tmp_path: Path,
                                                                              sample_data: Path) -> None:
    (tmp_path / "auto").mkdir()
    (tmp_path / "four").mkdir()
    # On this machine's RAM "auto" picks 8, the whole global batch; the model holds at most 4.
    result = run_out_of_memory(write_config(tmp_path / "auto", sample_data, per_device_train_batch_size="auto",
                                            **OPTIONS), oom_above=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ('⚠️  Out of GPU memory in the first step at micro-batch 8 (per_device_train_batch_size "auto"): trying '
            "micro-batch 4, 2 a step (the global batch stays)") in result.stderr
    reference = run_train("--config", str(write_config(tmp_path / "four", sample_data, per_device_train_batch_size=4,
                                                       **OPTIONS)))
    assert reference.returncode == 0, reference.stderr[-3000:]
    losses = [line["loss"] for line in read_metrics(tmp_path / "auto" / "logs")]
    assert len(losses) == 4 and losses == [line["loss"] for line in read_metrics(tmp_path / "four" / "logs")]


@pytest.mark.parametrize("micro_batch, oom_above", [(8, 4), ("auto", 2)], ids=["set by the user", "twice"])
def test_running_out_of_memory_otherwise_is_one_line(tmp_path: Path, sample_data: Path, micro_batch: object,
                                                     oom_above: int) -> None:
    config = write_config(tmp_path, sample_data, per_device_train_batch_size=micro_batch, **OPTIONS)
    result = run_out_of_memory(config, oom_above)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 1.50 GiB); use a smaller "
        'per_device_train_batch_size (global_batch_size keeps the batch), "activation_checkpointing": true, or '
        'per_device_train_batch_size "auto"')
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # nothing trained, nothing saved
