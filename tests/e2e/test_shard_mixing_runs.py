"""train.py over shards of disjoint token ranges: with samples shuffled across a window of shards the loss never
jumps at a shard boundary; read shard by shard, it does."""
from pathlib import Path

import numpy as np
import pytest

from conftest import read_metrics, run_train, write_config


@pytest.mark.parametrize("window, jumps", [(16, False), (1, True)])
def test_the_loss_does_not_jump_at_shard_boundaries(tmp_path: Path, window: int, jumps: bool) -> None:
    # 8 shards whose token ids come from 8 disjoint ranges of 64 ids. Read shard by shard, the model learns one
    # range, and the next shard's ids, never seen, cost far more: the loss jumps at every shard.
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    steps_per_shard, tokens_per_step = 8, 8 * 64  # micro-batch 8 of MICRO_MODEL's 64 tokens
    for r in range(8):
        ids = rng.integers(1 + 500 * r, 65 + 500 * r, size=steps_per_shard * tokens_per_step + 5)
        np.savez(data / f"tokenized_{r}.npz", input_ids=ids.astype(np.int32))
    warmup = 6
    config = write_config(tmp_path, data, max_steps=40, save_steps=100, warmup_steps=warmup, learning_rate=5e-3,
                          per_device_train_batch_size=8, shuffle_window_shards=window)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [line["loss"] for line in read_metrics(tmp_path / "logs")][warmup:]
    # Measured with seeds 1234, 1, 2, 3: 0.07-0.52 shuffled, 2.4-2.6 shard by shard.
    largest_rise = max(b - a for a, b in zip(losses, losses[1:]))
    assert (largest_rise > 1.0) == jumps, losses
