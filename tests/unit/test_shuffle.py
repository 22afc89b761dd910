"""Samples shuffled across a window of shards: batches mix shards, the order stays exact on resume (mid-window,
across windows and epochs), processes stay disjoint, the prefetcher works a window ahead, bad shards inside a
window, and the loss of a run whose shards hold disjoint token ranges no longer jumps at every shard."""
from pathlib import Path

import numpy as np
import pytest

from configs.training_config import ConfigError, config_from_dict
from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec, data_state, epoch_shard_order, position_from_state, window_starts
from utils.data.shards import LocalShardSource
from utils.errors import DataError

VOCAB = 1000
SEQ_LEN = 8


def make_shards(folder: Path, count: int, samples: int) -> None:
    """1-D shards of `samples` samples (plus 3 tokens that fill none); every token of shard i is 1 + i, so
    the first token of a sample names its shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        np.savez(folder / f"tokenized_{i:03d}.npz", input_ids=np.full(samples * SEQ_LEN + 3, 1 + i, dtype=np.int32))


def make_unique_shards(folder: Path, count: int, samples: int) -> None:
    """1-D shards whose samples are all different, so that any two batches can be compared sample by sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        stream = (np.arange(samples * SEQ_LEN) + i * samples * SEQ_LEN) % (VOCAB - 1) + 1
        np.savez(folder / f"tokenized_{i:03d}.npz", input_ids=stream.astype(np.int32))


class RecordingSource(LocalShardSource):
    """A local source that records the loader's calls: ("prefetch", names), ("fetch", name), ("release", name)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "tokenized_*.npz")
        self.calls: list[tuple[str, object]] = []

    def fetch(self, name: str) -> Path:
        self.calls.append(("fetch", name))
        return super().fetch(name)

    def prefetch(self, upcoming: list[str]) -> None:
        self.calls.append(("prefetch", tuple(upcoming)))

    def release(self, name: str) -> None:
        self.calls.append(("release", name))


def spec_for(source: LocalShardSource, window: int, seed: int = 3, mix: bool = False) -> StreamSpec:
    return StreamSpec(tuple(source.list_shards()), SEQ_LEN, seed, VOCAB, None, None, window, mix)


def take(source, spec: StreamSpec, n: int, batch_size: int = 2, rank: int = 0, world_size: int = 1,
         position: DataPosition = DataPosition(), **options) -> list:
    loader = BatchLoader(source, spec, LoaderSettings(batch_size, **options), rank, world_size, position)
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def shards_of(batch) -> set[int]:
    return set(batch.input_ids[:, 0].tolist())


def test_a_batch_draws_from_many_shards(tmp_path: Path) -> None:
    make_shards(tmp_path, count=8, samples=16)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    mixed = take(source, spec_for(source, window=16), n=16, batch_size=8)  # one epoch: all 8 shards, one window
    assert all(len(shards_of(batch)) >= 3 for batch in mixed)
    assert np.mean([len(shards_of(batch)) for batch in mixed]) >= 4.5  # 8 samples drawn from 8 shards
    assert mixed[-1].position == DataPosition(1, 0, 0, 128, 0)
    # Shard by shard (the old order), every batch of 8 comes from one shard.
    assert all(len(shards_of(batch)) == 1 for batch in take(source, spec_for(source, window=1), n=16, batch_size=8))


def test_windows_split_the_shard_order_evenly() -> None:
    assert window_starts(8, 16) == [0, 8]  # fewer shards than a window: one window of all
    assert window_starts(17, 16) == [0, 8, 17]  # not 16 and a lone shard
    assert window_starts(6, 2) == [0, 2, 4, 6]
    assert window_starts(3, 1) == [0, 1, 2, 3]


def test_each_window_holds_its_own_shards_and_every_sample_comes_once_an_epoch(tmp_path: Path) -> None:
    make_shards(tmp_path, count=6, samples=4)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2)
    batches = take(source, spec, n=24)  # two epochs of 24 samples
    for epoch in (0, 1):
        order = [1 + int(i) for i in epoch_shard_order(6, spec.seed, epoch)]
        seen = [sample for batch in batches[12 * epoch: 12 * (epoch + 1)] for sample in batch.input_ids[:, 0].tolist()]
        for window in range(3):  # windows of 2 shards, 8 samples each: the window's shards, 4 samples each
            part = seen[8 * window: 8 * (window + 1)]
            assert sorted(part) == sorted(order[2 * window: 2 * window + 2] * 4)
        assert seen != sorted(seen)  # shuffled, not shard after shard
    assert batches[11].position.files_consumed(6) == 6 and batches[3].position.files_consumed(6) == 2


@pytest.mark.parametrize("batch_size, world_size, mix", [(3, 1, False), (2, 2, False), (3, 1, True), (2, 2, True)])
def test_resume_anywhere_yields_exactly_the_remaining_batches(tmp_path: Path, batch_size: int,
                                                              world_size: int, mix: bool) -> None:
    # 5 shards of 7 samples in windows of 1, 2 and 2 shards (or their worth of every shard): micro-batches of 3 or
    # 4 samples straddle windows and epochs.
    make_unique_shards(tmp_path, count=5, samples=7)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2, mix=mix)
    steps = 26
    reference = [take(source, spec, steps, batch_size, rank, world_size) for rank in range(world_size)]
    positions = [batch.position for batch in reference[0]]
    assert any(p.sample_cursor > 0 and p.shard_cursor > 0 for p in positions)  # mid-window, not the first
    assert len({p.epoch for p in positions}) == 3  # two epoch boundaries
    for cut in range(1, steps):
        state = data_state(spec, positions[cut - 1])
        for rank in range(world_size):
            resumed = take(source, spec, steps - cut, batch_size, rank, world_size,
                           position_from_state(spec, state, "test"))
            assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(resumed, reference[rank][cut:]))
            assert [b.position for b in resumed] == positions[cut:]


def test_a_resume_loads_the_current_window_and_nothing_before_it(tmp_path: Path) -> None:
    make_unique_shards(tmp_path, count=6, samples=4)
    source = RecordingSource(tmp_path)
    spec = spec_for(source, window=2)
    reference = take(source, spec, 10)
    position = reference[5].position  # 12 samples in: the middle of the second window
    assert (position.shard_cursor, position.sample_cursor) == (2, 4)
    source.calls.clear()
    resumed = take(source, spec, 4, position=position, prefetch_batches=1)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(resumed, reference[6:]))
    order = [spec.shards[i] for i in epoch_shard_order(6, spec.seed, 0)]
    fetched = [name for kind, name in source.calls if kind == "fetch"]
    assert fetched[:2] == order[2:4]  # the window being read, loaded again; no batch is replayed
    assert not set(fetched) & set(order[:2])


def test_processes_split_each_global_batch_disjointly(tmp_path: Path) -> None:
    make_unique_shards(tmp_path, count=5, samples=7)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2)
    single = take(source, spec, 16, batch_size=4)
    ranks = [take(source, spec, 16, batch_size=2, rank=rank, world_size=2) for rank in (0, 1)]
    for step in range(16):
        rank0, rank1 = (set(map(tuple, ranks[r][step].input_ids.tolist())) for r in (0, 1))
        assert len(rank0) == len(rank1) == 2 and not rank0 & rank1
        assert rank0 | rank1 == set(map(tuple, single[step].input_ids.tolist()))
        assert ranks[0][step].position == ranks[1][step].position == single[step].position


def test_the_prefetcher_is_told_the_next_window_and_shards_are_released_once_read(tmp_path: Path) -> None:
    make_unique_shards(tmp_path, count=6, samples=4)
    source = RecordingSource(tmp_path)
    spec = spec_for(source, window=3)
    take(source, spec, 1, prefetch_batches=1, prefetch_shards=1)  # window 0 holds 6 batches: the loader stays in it
    order = [spec.shards[i] for i in epoch_shard_order(6, spec.seed, 0)]
    assert source.calls == [
        ("prefetch", tuple(order[1:6])), ("fetch", order[0]), ("release", order[0]),  # the rest, then the next
        ("prefetch", tuple(order[2:6])), ("fetch", order[1]), ("release", order[1]),
        ("prefetch", tuple(order[3:6])), ("fetch", order[2]), ("release", order[2]),  # window 1 while 0 trains
    ]
    source.calls.clear()
    take(source, spec, 1, prefetch_shards=0)
    assert {names for kind, names in source.calls if kind == "prefetch"} == {()}  # 0: download each when needed


def test_a_bad_shard_inside_a_window_stops_the_run_or_is_skipped_once_an_epoch(tmp_path: Path) -> None:
    make_shards(tmp_path, count=4, samples=5)
    (tmp_path / "tokenized_001.npz").write_bytes(b"garbage")
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=4)
    with pytest.raises(DataError, match=r"tokenized_001\.npz: unreadable shard") as error:
        take(source, spec, 1)
    assert "\n" not in str(error.value)
    batches = take(source, spec, 6, batch_size=5, skip_bad_shards=True)  # 15 good samples an epoch
    assert all(2 not in shards_of(batch) for batch in batches)  # nothing of the bad shard
    assert [b.position.shards_skipped for b in batches] == [1, 1, 1, 2, 2, 2]  # counted once an epoch
    # A resume in the middle of the window reads the bad shard again, but does not count it again.
    resumed = take(source, spec, 4, batch_size=5, skip_bad_shards=True, position=batches[1].position)
    assert [b.position for b in resumed] == [b.position for b in batches[2:]]


def test_mixing_the_whole_dataset_gives_every_window_a_share_of_every_shard(tmp_path: Path) -> None:
    make_shards(tmp_path, count=6, samples=8)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2, mix=True)  # 3 windows of 16 samples: a seeded third of each shard's 8
    batches = take(source, spec, n=24, batch_size=4)  # two epochs
    for epoch in (0, 1):
        seen = [s for batch in batches[12 * epoch: 12 * (epoch + 1)] for s in batch.input_ids[:, 0].tolist()]
        assert sorted(seen) == sorted(list(range(1, 7)) * 8)  # every sample once an epoch
        for window in range(3):
            counts = np.bincount(seen[16 * window: 16 * (window + 1)], minlength=7)[1:]
            assert set(counts.tolist()) <= {2, 3} and counts.sum() == 16  # 8 // 3 or 8 // 3 + 1 of every shard
    epoch_windows = [[s for batch in batches[4 * w: 4 * (w + 1)] for s in batch.input_ids[:, 0].tolist()]
                     for w in range(6)]
    assert epoch_windows[:3] != epoch_windows[3:]  # each epoch splits the shards anew
    assert [b.position.files_consumed(6) for b in batches[3:12:4]] == [2, 4, 6]  # shards' worth, as in windows
    again = take(source, spec, n=24, batch_size=4)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(again, batches))  # a function of the seed


def test_mixing_reads_every_shard_each_window_back_and_forth_and_hints_the_prefetcher(tmp_path: Path) -> None:
    make_unique_shards(tmp_path, count=4, samples=4)
    source = RecordingSource(tmp_path)
    spec = spec_for(source, window=2, mix=True)  # 2 windows, 8 samples each
    take(source, spec, n=3, batch_size=4, prefetch_batches=1, prefetch_shards=2)  # into the second window
    order = [spec.shards[i] for i in epoch_shard_order(4, spec.seed, 0)]
    fetched = [name for kind, name in source.calls if kind == "fetch"]
    assert fetched == order + order[::-1]  # backwards in the second: a small cache still holds its first shards
    hints = [names for kind, names in source.calls if kind == "prefetch"]
    # prefetch_shards ahead, not a window (hinted shards stay cached: a window ahead would be every shard), each
    # name once, into the next window but never past the epoch.
    assert hints[:4] == [tuple(order[1:3]), tuple(order[2:4]), (order[3],), tuple(order[::-1][:2])]
    assert hints[4:] == [tuple(order[::-1][1:3]), tuple(order[::-1][2:4]), (order[0],), ()]


def test_a_bad_shard_is_skipped_and_counted_once_an_epoch_when_mixing(tmp_path: Path, caplog) -> None:
    make_shards(tmp_path, count=4, samples=6)
    (tmp_path / "tokenized_001.npz").write_bytes(b"garbage")
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2, mix=True)  # 2 windows of 9 good samples an epoch
    with caplog.at_level("WARNING"):  # into window 1; the loader waits for batch 5 to be taken before batch 6
        take(source, spec, n=4, batch_size=3, skip_bad_shards=True, prefetch_batches=1)
    assert sum("skipping bad shard" in record.message for record in caplog.records) == 1  # not again in window 1
    batches = take(source, spec, n=12, batch_size=3, skip_bad_shards=True)
    assert all(2 not in shards_of(batch) for batch in batches)
    assert [b.position.shards_skipped for b in batches] == [1] * 6 + [2] * 6  # counted in each epoch's window 0
    resumed = take(source, spec, n=8, batch_size=3, skip_bad_shards=True, position=batches[1].position)
    assert [b.position for b in resumed] == [b.position for b in batches[2:10]]


def test_a_resume_with_another_window_size_or_pad_id_is_refused(tmp_path: Path) -> None:
    make_shards(tmp_path, count=4, samples=5)
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2)
    state = data_state(spec, DataPosition(0, 2, 3, 13))
    assert state["shuffle_window_shards"] == 2 and state["pad_token_id"] is None
    assert position_from_state(spec, state, "ckpt") == DataPosition(0, 2, 3, 13)
    for changed, key in ((StreamSpec(spec.shards, SEQ_LEN, spec.seed, VOCAB, None, None, 4), "shuffle_window_shards"),
                         (StreamSpec(spec.shards, SEQ_LEN, spec.seed, VOCAB, None, 5, 2), "pad_token_id")):
        with pytest.raises(DataError, match=f"ckpt: checkpoint was trained with {key}=") as error:
            position_from_state(changed, state, "ckpt")
        assert "\n" not in str(error.value)
    # A checkpoint saved before mix_whole_dataset existed had windows of whole shards.
    del state["mix_whole_dataset"]
    assert position_from_state(spec, state, "ckpt") == DataPosition(0, 2, 3, 13)
    with pytest.raises(DataError, match=r"^ckpt: checkpoint was trained with mix_whole_dataset=False, this run has "
                                        r"True; resuming would not continue the same data \(--set "
                                        r"mix_whole_dataset=false resumes it\)$"):
        position_from_state(spec_for(source, window=2, mix=True), state, "ckpt")
    # A checkpoint from before windows (shard-by-shard order) does not continue the same data either.
    del state["shuffle_window_shards"], state["pad_token_id"]
    with pytest.raises(DataError, match="^ckpt: saved by an earlier version of train.py, whose data order \\(no "
                                        "pad_token_id, shuffle_window_shards\\) this one does not reproduce"):
        position_from_state(spec, state, "ckpt")


def test_config_fields_of_the_stream() -> None:
    config = config_from_dict({}, "test")
    assert (config.shuffle_window_shards, config.pad_token_id, config.mix_whole_dataset) == (16, None, "auto")
    assert config_from_dict({"pad_token_id": 50256}, "test").pad_token_id == 50256
    for bad, message in [({"shuffle_window_shards": 0}, "shuffle_window_shards must be a positive integer"),
                         ({"mix_whole_dataset": "yes"}, 'mix_whole_dataset must be "auto", true or false'),
                         ({"pad_token_id": 50257}, "pad_token_id must be null or a token id below vocab_size 50257"),
                         ({"pad_token_id": -1}, "pad_token_id must be null or a token id")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(bad, "test")


def test_a_new_epoch_is_said_when_training_reaches_it_not_when_it_is_read_ahead(tmp_path: Path, caplog) -> None:
    make_shards(tmp_path, count=2, samples=4)  # 8 samples an epoch: 4 batches of 2
    source = LocalShardSource(tmp_path, "tokenized_*.npz")
    spec = spec_for(source, window=2)
    with caplog.at_level("INFO"):
        batches = take(source, spec, n=3)  # the loader has read epoch 1 ahead meanwhile
    assert batches[-1].position.epoch == 0
    assert not [record for record in caplog.records if "starting epoch" in record.message]
    with caplog.at_level("INFO"):
        batches = take(source, spec, n=9)
    said = [record.message for record in caplog.records if "starting epoch" in record.message]
    assert said == ["data: starting epoch 1", "data: starting epoch 2"]  # once each, as batches 4 and 8 end them
    assert [b.position.epoch for b in batches].index(1) == 3
