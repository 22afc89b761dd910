"""The background loader: this process's micro-batches of the global sample stream (utils/data/order.py), read by a
thread so that shard reading overlaps compute, each with the stream position after it.

All processes walk the same global sample stream; each micro-batch takes `world_size x batch` consecutive samples of
it and process `rank` keeps its own `batch` of them, so processes see disjoint samples. A loader started from a
saved position yields exactly the batches the uninterrupted run would have seen next: it loads that window's shards
again, and reads nothing before them.
"""
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from configs.training_config import TrainingConfig
from utils.data.order import (
    DataPosition,
    StreamSpec,
    epoch_shard_order,
    stripe,
    window_reads,
    window_sample_order,
    window_starts,
)
from utils.data.shards import DataError, ShardSource, pack, read_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    """[batch, seq_len] int64 token ids; also the labels."""
    position: DataPosition
    """The stream position after this micro-batch (what a checkpoint taken now records)."""


@dataclass(frozen=True, eq=False)
class _Window:
    """One window in memory: the packed samples of its shards and the order they are read in."""

    epoch: int
    shard_cursor: int
    """Index of its first shard in the epoch's shard order."""
    after: tuple[int, int]
    """(epoch, shard_cursor) of the window that follows."""
    parts: list[np.ndarray]
    """[n_i, seq_len] samples of each of its shards that was not skipped, in the epoch's shard order."""
    offsets: np.ndarray
    """Index of each part's first sample among the pooled samples; the pooled count last."""
    order: np.ndarray
    """order[j]: the pooled index of the window's j-th sample."""
    first_sample: int
    """Samples of the stream before the window's first one."""
    shards_skipped: int
    """The count once this window's shards have been read."""

    def samples(self, start: int, stop: int) -> np.ndarray:
        """A copy of samples start..stop-1 in the window's order (a copy, so that no view keeps the window)."""
        pooled = self.order[start:stop]
        part = np.searchsorted(self.offsets, pooled, side="right") - 1
        return np.stack([self.parts[p][i - self.offsets[p]] for p, i in zip(part.tolist(), pooled.tolist())])

    def position_after(self, taken: int) -> DataPosition:
        """The stream position once the window's first `taken` samples have been read."""
        consumed = self.first_sample + taken
        if taken < len(self.order):
            return DataPosition(self.epoch, self.shard_cursor, taken, consumed, self.shards_skipped)
        return DataPosition(*self.after, 0, consumed, self.shards_skipped)


_END = object()


@dataclass(frozen=True)
class LoaderSettings:
    """How a BatchLoader reads: the config's data fields (LoaderSettings.of(config, device)), or a test's choice."""

    batch_size: int
    """Samples per micro-batch of this process."""
    skip_bad_shards: bool = False
    prefetch_batches: int = 8
    """Micro-batches prepared ahead of the training loop."""
    prefetch_shards: int = 2
    """Shards downloaded ahead of the one being read (gs:// data)."""
    pin_memory: bool = False
    """Batches in pinned memory, for non-blocking copies to a GPU."""
    announce_epochs: bool = True
    """Say "data: starting epoch N" when the batches taken reach it (not the validation set's one pass)."""

    @classmethod
    def of(cls, config: TrainingConfig, device: torch.device) -> "LoaderSettings":
        return cls(config.per_device_train_batch_size, config.skip_bad_shards, config.prefetch_batches,
                   config.prefetch_shards, pin_memory=device.type == "cuda")


class BatchLoader:
    """Yields this process's micro-batches from a background thread, so shard reading overlaps compute."""

    def __init__(self, source: ShardSource, spec: StreamSpec, settings: LoaderSettings, rank: int, world_size: int,
                 position: DataPosition) -> None:
        self.source = source
        self.spec = spec
        self.batch_size = settings.batch_size
        self.rank = rank
        self.world_size = world_size
        self.skip_bad_shards = settings.skip_bad_shards
        self.pin_memory = settings.pin_memory
        self.prefetch_shards = settings.prefetch_shards
        self.announced_epoch = position.epoch if settings.announce_epochs else None
        """The epoch said last; said when a batch taken (not one read ahead) reaches the next, so that the line
        and the names of the checkpoints saved after it (checkpoint-epoch{E}-...) agree."""
        self._starts = window_starts(len(spec.shards), spec.shuffle_window_shards)
        self._queue: queue.Queue = queue.Queue(maxsize=settings.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(position,), name="batch-loader", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise StopIteration
        if self.announced_epoch is not None and item.position.epoch > self.announced_epoch:
            self.announced_epoch = item.position.epoch
            self._say(logging.INFO, "data: starting epoch %d", self.announced_epoch)
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # drain, so that a producer blocked on a full queue sees the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.01)

    # -- producer thread ---------------------------------------------------------------------

    def _produce(self, position: DataPosition) -> None:
        try:
            self._walk(position)
        except BaseException as error:  # handed to the training loop, which reports it
            self._put(error)

    def _walk(self, position: DataPosition) -> None:
        """Loads window after window from `position` on and hands out this process's micro-batches."""
        epoch, window = position.epoch, self._starts.index(position.shard_cursor)
        start = position.sample_cursor
        first_sample, skipped = position.samples_consumed - start, position.shards_skipped
        epoch_has_samples = window > 0 or start > 0
        mine: list[np.ndarray] = []  # this process's part of the micro-batch being gathered (may span windows)
        while not self._stop.is_set():
            # A window resumed in the middle was loaded before: its skipped shards are already counted. Mixing the
            # whole dataset, every window reads every shard: a skipped one counts once an epoch, in window 0.
            count_skips = start == 0 and (window == 0 or not self.spec.mix_whole_dataset)
            loaded = self._load_window(epoch, window, first_sample, skipped, count_skips)
            if not self._hand_out(loaded, start, mine):
                return
            epoch_has_samples |= len(loaded.order) > 0
            first_sample, skipped = first_sample + len(loaded.order), loaded.shards_skipped
            del loaded  # its tokens go before the next window's are read: one window in memory, not two
            window, start = window + 1, 0
            if window == len(self._starts) - 1:
                if not epoch_has_samples:
                    raise DataError(f"{self.source.description}: no shard holds a full sample of "
                                    f"{self.spec.seq_len} tokens")
                epoch, window, epoch_has_samples = epoch + 1, 0, False

    def _hand_out(self, window: _Window, start: int, mine: list[np.ndarray]) -> bool:
        """Walks the window from sample `start`, a micro-batch (world_size x batch samples) at a time, keeping
        this process's part; False when the loader was closed."""
        group = self.batch_size * self.world_size
        first_mine = self.rank * self.batch_size
        j = start
        while j < len(window.order):
            offset = (window.first_sample + j) % group  # where sample j falls in its micro-batch
            take = min(group - offset, len(window.order) - j)
            low, high = max(offset, first_mine), min(offset + take, first_mine + self.batch_size)
            if low < high:
                mine.append(window.samples(j + low - offset, j + high - offset))
            j += take
            if offset + take == group:
                batch = torch.from_numpy(np.concatenate(mine).astype(np.int64))
                mine.clear()
                if self.pin_memory:
                    batch = batch.pin_memory()
                if not self._put(Batch(batch, window.position_after(j))):
                    return False
        return True

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _load_window(self, epoch: int, window: int, first_sample: int, skipped: int, count_skips: bool) -> _Window:
        """Reads the window's shards one after another into memory (mixing the whole dataset: its stripe of each)
        and draws its sample order."""
        spec, starts = self.spec, self._starts
        order = epoch_shard_order(len(spec.shards), spec.seed, epoch)
        mix, windows = spec.mix_whole_dataset, len(starts) - 1
        # The prefetcher works ahead: the rest of this window, the whole next one and at least prefetch_shards
        # shards; mixing the whole dataset, where a window reads every shard, prefetch_shards shards (hinted shards
        # are kept from eviction: more would hold the whole dataset in the cache). Only within the epoch: a shard
        # hinted again after it was read would be kept from eviction.
        reads, following, *later = [window_reads(len(order), starts, w, mix) for w in range(window, windows)] + [[]]
        remaining = reads + following + [p for positions in later for p in positions]
        parts = []
        for n, position in enumerate(reads):
            ahead = n + 1 + self.prefetch_shards if mix else max(len(reads) + len(following),
                                                                 n + 1 + self.prefetch_shards)
            ahead = ahead if self.prefetch_shards else 0
            upcoming = remaining[n + 1: ahead]
            self.source.prefetch(list(dict.fromkeys(spec.shards[order[p]] for p in upcoming)))
            shard = int(order[position])
            samples = self._load(spec.shards[shard], announce=count_skips or not mix)
            if samples is not None and mix:
                samples = samples[stripe(len(samples), spec.seed, epoch, shard, window, windows)]
            if samples is not None:
                parts.append(samples)
            elif count_skips:
                skipped += 1
        offsets = np.cumsum([0, *(len(part) for part in parts)])
        end = starts[window + 1]
        after = (epoch, end) if end < len(spec.shards) else (epoch + 1, 0)
        return _Window(epoch, starts[window], after, parts, offsets,
                       window_sample_order(int(offsets[-1]), spec.seed, epoch, window), first_sample, skipped)

    def _say(self, level: int, message: str, *args: Any) -> None:
        """Every process walks the same stream and meets the same epochs and bad shards: the first one says so."""
        if self.rank == 0:
            log.log(level, message, *args)

    def _load(self, name: str, announce: bool) -> np.ndarray | None:
        """The shard's packed samples, or None when it is skipped (bad under skip_bad_shards, or too short; said
        when `announce`: mixing the whole dataset, every window reads it again)."""
        path = self.source.fetch(name)  # ShardUnavailableError is not the shard's fault: never skipped
        try:
            tokens = read_shard(path, self.spec.vocab_size, self.spec.eos_token_id, self.spec.pad_token_id)
        except DataError as error:
            if not self.skip_bad_shards:
                raise
            if announce:
                self._say(logging.WARNING, "skipping bad shard: %s", error)
            return None
        finally:
            self.source.release(name)  # its tokens are in memory now: the cache may evict it
        samples = pack(tokens, self.spec.seq_len)
        if len(samples) == 0:
            if announce:
                self._say(logging.WARNING, "skipping %s: %d tokens, fewer than one sample of %d", path,
                          len(tokens), self.spec.seq_len)
            return None
        return samples
