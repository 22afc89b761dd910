"""DDP as torchtitan tunes it reaches the DistributedDataParallel that train.py builds on two processes (gloo on
CPU, NCCL on GPUs: the same Accelerate path): 100 MB buckets, no buffer broadcast (the rotary tables are
constants), gradients as views into the buckets; and zero_grad frees the gradients when a step is one micro-batch,
zeroing them in place under accumulation, where no_sync micro-batches would otherwise make a second set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.utils import DistributedType
from helpers import free_port

from conftest import REPO_ROOT, write_config
from utils.training_utils import grads_to_none


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ddp_settings_reach_ddp_and_gradients_are_freed_without_accumulation(accumulation: int, tmp_path: Path,
                                                                             sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=3, save_steps=1000, per_device_train_batch_size=1,
                          gradient_accumulation_steps=accumulation)
    command = [sys.executable, str(REPO_ROOT / "scripts" / "launch.py"), "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "e2e" / "train_recording_ddp.py"), "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_LOG": str(tmp_path / "ddp")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"ddp.{rank}.json").read_text())
        assert record["ddp"] == [{"bucket_bytes_cap": 100 * 1024 * 1024, "broadcast_buffers": False,
                                  "gradient_as_bucket_view": True}]
        assert record["set_to_none"] == [accumulation == 1] * 3  # once a step


def test_gradients_are_freed_except_under_ddp_with_accumulation() -> None:
    assert grads_to_none(DistributedType.NO, 4) and grads_to_none(DistributedType.FSDP, 4)
    assert grads_to_none(DistributedType.MULTI_GPU, 1) and grads_to_none(DistributedType.MULTI_CPU, 1)
    assert not grads_to_none(DistributedType.MULTI_GPU, 2) and not grads_to_none(DistributedType.MULTI_CPU, 4)
