"""Training data: shards -> packed samples -> shuffled windows -> per-process micro-batches, with an exact position.

Order is a pure function of (seed, epoch): which shards (max_files) are used; each epoch's seeded shard order,
cut into consecutive windows of at most `shuffle_window_shards` shards; and a permutation seeded by (seed,
epoch, window) of the samples of all the window's shards together (utils/shards.py reads and packs each), so
that every batch mixes many shards; a shard shorter than one sample is skipped (and counted).
All processes walk the same global sample stream; each micro-batch takes `world_size x batch` consecutive
samples of it and process `rank` keeps its own `batch` of them, so processes see disjoint samples. The
stream's position (a DataPosition: a window and an index in its sample order) is saved in every checkpoint,
and a loader started from it yields exactly the batches the uninterrupted run would have seen next: it loads
that window's shards again, and reads nothing before them.
"""
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from utils.shards import DataError, ShardSource, pack, read_shard

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Deterministic order and position
# ---------------------------------------------------------------------------------------------

def select_shards(names: list[str], max_files: int, seed: int) -> list[str]:
    """The shards a run trains on: all, or max_files of them picked by a seeded shuffle."""
    names = sorted(names)
    if max_files == -1 or max_files >= len(names):
        return names
    picked = np.random.default_rng([seed, 0x5EED]).permutation(len(names))[:max_files]
    return sorted(names[i] for i in picked)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def window_starts(num_shards: int, window_shards: int) -> list[int]:
    """Where each window of an epoch's shard order begins, then num_shards: ceil(num_shards / window_shards)
    windows whose sizes differ by at most one, so that no epoch ends with a window of a shard or two."""
    count = -(-num_shards // window_shards)
    return [k * num_shards // count for k in range(count + 1)]


def window_sample_order(num_samples: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """The order in which the pooled samples of a window's shards are read."""
    return np.random.default_rng([seed, epoch, window]).permutation(num_samples)


@dataclass(frozen=True)
class DataPosition:
    """The next unread sample of the global stream, plus counters for reporting."""

    epoch: int = 0
    shard_cursor: int = 0
    """Index, in this epoch's shard order, of the first shard of the window being read; the shards before it
    belong to completed windows."""
    sample_cursor: int = 0
    """Index, in that window's sample order, of the next sample (0: the window is not loaded yet)."""
    samples_consumed: int = 0
    """Samples taken from the stream by all processes together since the run began."""
    shards_skipped: int = 0
    """Shards skipped: bad ones under skip_bad_shards, and ones shorter than one sample. Those of a window
    count from its first sample on."""

    def files_consumed(self, num_shards: int) -> int:
        """Shards fully read since the run began (the F of checkpoint names): those of completed windows,
        whose samples have all been taken."""
        return self.epoch * num_shards + self.shard_cursor


@dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the global sample stream; a resumed run must match it."""

    shards: tuple[str, ...]
    seq_len: int
    seed: int
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int | None
    """Stripped from the end of 2-D rows that have neither attention_mask nor sequence_lengths."""
    shuffle_window_shards: int
    """Shards whose samples are shuffled together."""


_STREAM_KEYS = ("seq_len", "seed", "vocab_size", "eos_token_id", "pad_token_id", "shuffle_window_shards")
"""StreamSpec fields besides the shard list that a checkpoint records and a resume must match."""


def data_state(spec: StreamSpec, position: DataPosition) -> dict[str, Any]:
    """What a checkpoint stores (data_state.json)."""
    return {"position": asdict(position), "shards": list(spec.shards),
            **{key: getattr(spec, key) for key in _STREAM_KEYS}}


def position_from_state(spec: StreamSpec, state: dict[str, Any], source: str) -> DataPosition:
    """The saved position, after checking that it belongs to the same stream."""
    missing = [key for key in _STREAM_KEYS if key not in state]
    if missing:
        raise DataError(f"{source}: saved by an earlier version of train.py, whose data order (no "
                        f"{', '.join(missing)}) this one does not reproduce: it cannot be resumed exactly; start a "
                        "fresh run in another checkpoint_dir (export_hf.py still exports its weights)")
    for key in _STREAM_KEYS:
        if state.get(key) != getattr(spec, key):
            raise DataError(f"{source}: checkpoint was trained with {key}={state.get(key)!r}, "
                            f"this run has {getattr(spec, key)!r}; resuming would not continue the same data")
    if tuple(state.get("shards", ())) != spec.shards:
        saved, now = set(state.get("shards", ())), set(spec.shards)
        raise DataError(f"{source}: the shard list changed since the checkpoint "
                        f"({len(saved - now)} shards gone, {len(now - saved)} new); resuming would not continue "
                        f"the same data")
    position = DataPosition(**state["position"])
    if position.shard_cursor not in window_starts(len(spec.shards), spec.shuffle_window_shards)[:-1]:
        raise DataError(f"{source}: data position shard_cursor {position.shard_cursor} is not the start of a window")
    return position


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

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


class BatchLoader:
    """Yields this process's micro-batches from a background thread, so shard reading overlaps compute."""

    def __init__(self, source: ShardSource, spec: StreamSpec, batch_size: int, rank: int, world_size: int,
                 position: DataPosition, skip_bad_shards: bool = False, prefetch_batches: int = 8,
                 pin_memory: bool = False, prefetch_shards: int = 2) -> None:
        self.source = source
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.skip_bad_shards = skip_bad_shards
        self.pin_memory = pin_memory
        self.prefetch_shards = prefetch_shards
        self._starts = window_starts(len(spec.shards), spec.shuffle_window_shards)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_batches)
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
            # A window resumed in the middle was loaded before: its skipped shards are already counted.
            loaded = self._load_window(epoch, window, first_sample, skipped, count_skips=start == 0)
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
                self._say(logging.INFO, "data: starting epoch %d", epoch)

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
        """Reads the window's shards one after another into memory and draws its sample order."""
        shards, starts = self.spec.shards, self._starts
        order = [shards[i] for i in epoch_shard_order(len(shards), self.spec.seed, epoch)]
        first, end = starts[window], starts[window + 1]
        # The prefetcher works ahead: the rest of this window, the whole next one and at least prefetch_shards
        # shards. Only within the epoch: a shard hinted again after it was read would be kept from eviction.
        ahead = starts[min(window + 2, len(starts) - 1)]
        parts = []
        for k in range(first, end):
            upcoming = order[k + 1: max(ahead, k + 1 + self.prefetch_shards)] if self.prefetch_shards else []
            self.source.prefetch(upcoming)
            samples = self._load(order[k])
            if samples is not None:
                parts.append(samples)
            elif count_skips:
                skipped += 1
        offsets = np.cumsum([0, *(len(part) for part in parts)])
        after = (epoch, end) if end < len(shards) else (epoch + 1, 0)
        return _Window(epoch, first, after, parts, offsets,
                       window_sample_order(int(offsets[-1]), self.spec.seed, epoch, window), first_sample, skipped)

    def _say(self, level: int, message: str, *args: Any) -> None:
        """Every process walks the same stream and meets the same epochs and bad shards: the first one says so."""
        if self.rank == 0:
            log.log(level, message, *args)

    def _load(self, name: str) -> np.ndarray | None:
        """The shard's packed samples, or None when it is skipped (bad under skip_bad_shards, or too short)."""
        path = self.source.fetch(name)  # ShardUnavailableError is not the shard's fault: never skipped
        try:
            tokens = read_shard(path, self.spec.vocab_size, self.spec.eos_token_id, self.spec.pad_token_id)
        except DataError as error:
            if not self.skip_bad_shards:
                raise
            self._say(logging.WARNING, "skipping bad shard: %s", error)
            return None
        finally:
            self.source.release(name)  # its tokens are in memory now: the cache may evict it
        samples = pack(tokens, self.spec.seq_len)
        if len(samples) == 0:
            self._say(logging.WARNING, "skipping %s: %d tokens, fewer than one sample of %d", path, len(tokens),
                      self.spec.seq_len)
            return None
        return samples
