"""train.py over shards of disjoint token ranges: with samples shuffled across a window of shards the loss never
jumps at a shard boundary; read shard by shard, it does. Beyond one window, windows of whole shards make the
loss jump where a window begins; windows that each draw from every shard (mix_whole_dataset) do not."""
from pathlib import Path

import numpy as np
import pytest

from conftest import read_metrics, run_train, write_config


def disjoint_shards(data: Path, count: int, samples: int, ids_per_shard: int, spacing: int) -> None:
    """`count` shards of `samples` samples of MICRO_MODEL's 64 tokens; shard r draws its ids from its own range
    1 + spacing * r ... + ids_per_shard, which no other shard uses."""
    data.mkdir()
    rng = np.random.default_rng(0)
    for r in range(count):
        ids = rng.integers(1 + spacing * r, 1 + spacing * r + ids_per_shard, size=samples * 64 + 5)
        np.savez(data / f"tokenized_{r}.npz", input_ids=ids.astype(np.int32))


def largest_rise(log_dir: Path, after: int) -> float:
    losses = [line["loss"] for line in read_metrics(log_dir)][after:]
    return max(b - a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("window, jumps", [(16, False), (1, True)])
def test_the_loss_does_not_jump_at_shard_boundaries(tmp_path: Path, window: int, jumps: bool) -> None:
    # 8 shards whose token ids come from 8 disjoint ranges of 64 ids. Read shard by shard, the model learns one
    # range, and the next shard's ids, never seen, cost far more: the loss jumps at every shard.
    steps_per_shard = 8  # of micro-batch 8
    disjoint_shards(tmp_path / "data", count=8, samples=8 * steps_per_shard, ids_per_shard=64, spacing=500)
    warmup = 6
    config = write_config(tmp_path, tmp_path / "data", max_steps=40, save_steps=100, warmup_steps=warmup,
                          learning_rate=5e-3, per_device_train_batch_size=8, shuffle_window_shards=window,
                          mix_whole_dataset=False)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    # Measured with seeds 1234, 1, 2, 3: 0.07-0.52 shuffled, 2.4-2.6 shard by shard.
    assert (largest_rise(tmp_path / "logs", warmup) > 1.0) == jumps


def test_every_window_draws_from_the_whole_dataset(tmp_path: Path) -> None:
    # 64 shards of 24 samples, each of its own 60 ids: 4 windows of 16 shards' worth (48 steps of 8) an epoch.
    # In windows of whole shards, the second window's 16 shards hold ids the model has never seen, and the loss
    # rises by nats at step 49; when each window holds a quarter of every shard, it does not.
    disjoint_shards(tmp_path / "data", count=64, samples=24, ids_per_shard=60, spacing=64)
    warmup = 10
    config = write_config(tmp_path, tmp_path / "data", max_steps=56, save_steps=100, warmup_steps=warmup,
                          learning_rate=5e-3, per_device_train_batch_size=8)  # mix_whole_dataset "auto": local
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Order: 4 windows an epoch, each a seeded 1/4 of every one of the 64 shards (mix_whole_dataset): each "
            "shard is read 4 times an epoch") in result.stderr
    assert largest_rise(tmp_path / "logs", warmup) < 1.0
