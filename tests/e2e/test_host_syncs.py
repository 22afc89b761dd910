"""The loop never waits for the device between logging steps: on two processes with the GPU defaults forced on
(bf16 autocast, the fused AdamW, asynchronous saves, DDP), eager and compiled, ten steps read no tensor's value on
the host (tests/e2e/train_counting_syncs.py counts every such read). On a GPU each read would make the host wait until
the device had finished its queued work, and the device then idles while the host queues the next step.

What once synced, and no longer does:
- transformers' SDPA mask (masking_utils.find_packed_sequence_indices) checked the position ids for packed
  sequences with `.all()` on every micro-batch; the model's attention is now utils/model.py's CAUSAL_SDPA, for
  which transformers builds no mask;
- the stop vote read its all-reduced flags with `.tolist()` from the device; it now travels over a gloo group
  between the hosts (utils/stopping.py's StopVote).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from conftest import REPO_ROOT, write_config

STEPS = 12  # the first compiles, the last logs and saves: ten steps between


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ten_steps_between_logging_steps_never_wait_for_the_device(compiled: bool, tmp_path: Path,
                                                                   sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=STEPS, lr_decay_steps=STEPS, logging_steps=STEPS,
                          save_steps=1000, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                          mixed_precision="bf16", fused_adamw=True, async_save=True, compile=compiled,
                          compile_backend="aot_eager")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "launch.py"), "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(REPO_ROOT / "tests" / "e2e" / "train_counting_syncs.py"),
               "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNC_LOG": str(tmp_path / "syncs")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        log = json.loads((tmp_path / f"syncs.{rank}.json").read_text())
        assert log["logging_steps"] == [STEPS]
        reads = {int(step): sources for step, sources in log["reads"].items()}
        assert {step: reads[step] for step in range(2, STEPS) if reads.get(step)} == {}
        # The count works: the logging step reads the window's loss, once per process.
        assert any("run_log.py" in source and "tolist" in source for source in reads[STEPS])
