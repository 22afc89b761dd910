"""Training data: .npz token shards -> packed samples -> per-process micro-batches, with an exact position.

A shard holds `input_ids` (any integer dtype): a 1-D token stream used as is, or 2-D right-padded rows,
one document each, whose real lengths come from `attention_mask` or `sequence_lengths` when present.
Padding is dropped; rows are joined with the end-of-text id (when configured) and cut into samples of
`seq_len` tokens. The few tokens left at the end of a shard that do not fill a sample are not used.
Labels are the inputs themselves: the model shifts them inside, so nothing is shifted twice and,
since packed samples have no padding, no padding reaches the loss.

Order is a pure function of the seed: which shards (max_files) are used, the shard order of each
epoch and the sample order inside each shard. All processes walk the same global sample stream; each
micro-batch takes `world_size x batch` consecutive samples of it and process `rank` keeps its own
`batch` of them, so processes see disjoint samples. The stream's position is a DataPosition; it is
saved in every checkpoint, and a loader started from it yields exactly the batches the uninterrupted
run would have seen next, without reading anything before it.
"""
import logging
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


class DataError(Exception):
    """Bad training data; the message is one line that names the file."""


class ShardUnavailableError(DataError):
    """A shard that could not be fetched (storage, network, local disk): it says nothing about the data,
    so it is never skipped as a bad shard, and it may strike one process and not the others."""


# ---------------------------------------------------------------------------------------------
# Reading one shard
# ---------------------------------------------------------------------------------------------

def _row_lengths(shard: Any, input_ids: np.ndarray, name: str) -> np.ndarray:
    rows, width = input_ids.shape
    if "sequence_lengths" in shard.files:
        lengths = np.asarray(shard["sequence_lengths"]).reshape(-1)
        if lengths.shape != (rows,) or not np.issubdtype(lengths.dtype, np.integer):
            raise DataError(f"{name}: sequence_lengths must be {rows} integers, one per row of input_ids")
        if lengths.size and (lengths.min() < 0 or lengths.max() > width):
            raise DataError(f"{name}: sequence_lengths outside [0, {width}]")
        return lengths.astype(np.int64)
    if "attention_mask" in shard.files:
        mask = np.asarray(shard["attention_mask"])
        if mask.shape != input_ids.shape:
            raise DataError(f"{name}: attention_mask shape {mask.shape} differs from input_ids {input_ids.shape}")
        # Rows are right-padded, so the real length is the count of ones.
        return (mask != 0).sum(axis=1).astype(np.int64)
    return np.full(rows, width, dtype=np.int64)


def tokens_from_arrays(shard: Any, name: str, vocab_size: int, eos_token_id: int | None) -> np.ndarray:
    """The shard's documents as one validated int32 token stream, padding dropped, EOT between rows."""
    if "input_ids" not in shard.files:
        raise DataError(f"{name}: no 'input_ids' array (found: {', '.join(shard.files) or 'nothing'})")
    input_ids = np.asarray(shard["input_ids"])
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise DataError(f"{name}: input_ids has dtype {input_ids.dtype}; token ids must be integers")
    if input_ids.ndim == 1:
        tokens = input_ids
    elif input_ids.ndim == 2:
        lengths = _row_lengths(shard, input_ids, name)
        if eos_token_id is not None:
            # One extra column per row holds the end-of-text id right after the row's last real token.
            input_ids = np.concatenate([input_ids, np.zeros((input_ids.shape[0], 1), input_ids.dtype)], axis=1)
            input_ids[np.arange(input_ids.shape[0]), lengths] = eos_token_id
            lengths = lengths + 1
        keep = np.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        tokens = input_ids[keep]
    else:
        raise DataError(f"{name}: input_ids must be 1-D or 2-D, got shape {input_ids.shape}")
    if tokens.size == 0:
        raise DataError(f"{name}: shard holds no tokens")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{name}: token id {bad} outside the model's vocabulary [0, {vocab_size})")
    return tokens.astype(np.int32, copy=False)


def read_shard(path: Path, vocab_size: int, eos_token_id: int | None) -> np.ndarray:
    """Loads a shard from disk; any unreadable or invalid content is a DataError naming the file."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                raise DataError(f"{path}: unreadable shard (not an .npz archive)")
        with np.load(path, allow_pickle=False) as shard:
            return tokens_from_arrays(shard, str(path), vocab_size, eos_token_id)
    except DataError:
        raise
    except Exception as error:  # zipfile, zlib, OSError, ValueError: all mean "not a readable shard"
        detail = str(error).splitlines()[0] if str(error) else ""
        raise DataError(f"{path}: unreadable shard ({type(error).__name__}: {detail})") from None


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[n_samples, seq_len] view of the stream; the tail shorter than seq_len is left out."""
    n_samples = len(tokens) // seq_len
    return tokens[: n_samples * seq_len].reshape(n_samples, seq_len)


# ---------------------------------------------------------------------------------------------
# Where shards come from
# ---------------------------------------------------------------------------------------------

class ShardSource(Protocol):
    """Lists shards and hands out complete local copies of them."""

    description: str

    def list_shards(self) -> list[str]: ...

    def fetch(self, name: str) -> Path:
        """A local path to the complete shard (may block until it is downloaded)."""
        ...

    def prefetch(self, upcoming: list[str]) -> None:
        """A hint: these shards come next, in this order."""
        ...

    def release(self, name: str) -> None:
        """The shard has been read; its cached copy may be evicted."""
        ...


class LocalShardSource:
    def __init__(self, folder: str | Path, pattern: str) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.description = f"{self.folder}/{pattern}"

    def list_shards(self) -> list[str]:
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: data folder does not exist")
        names = sorted(p.name for p in self.folder.glob(self.pattern) if p.is_file())
        if not names:
            raise DataError(f"{self.folder}: no shards matching {self.pattern!r}")
        return names

    def fetch(self, name: str) -> Path:
        return self.folder / name

    def prefetch(self, upcoming: list[str]) -> None:
        pass

    def release(self, name: str) -> None:
        pass


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


def shard_sample_order(num_samples: int, seed: int, epoch: int, shard_name: str) -> np.ndarray:
    return np.random.default_rng([seed, epoch, zlib.crc32(shard_name.encode())]).permutation(num_samples)


@dataclass(frozen=True)
class DataPosition:
    """The next unread sample of the global stream, plus counters for reporting."""

    epoch: int = 0
    shard_cursor: int = 0
    """Index, in this epoch's shard order, of the shard being read."""
    sample_cursor: int = 0
    """Index, in that shard's sample order, of the next sample."""
    samples_consumed: int = 0
    """Samples taken from the stream by all processes together since the run began."""
    shards_skipped: int = 0
    """Bad shards skipped under skip_bad_shards."""

    def files_consumed(self, num_shards: int) -> int:
        """Shards fully read since the run began (the F of checkpoint names)."""
        return self.epoch * num_shards + self.shard_cursor


@dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the global sample stream; a resumed run must match it."""

    shards: tuple[str, ...]
    seq_len: int
    seed: int
    vocab_size: int
    eos_token_id: int | None


def data_state(spec: StreamSpec, position: DataPosition) -> dict[str, Any]:
    """What a checkpoint stores (data_state.json)."""
    return {"position": asdict(position), "shards": list(spec.shards), "seq_len": spec.seq_len, "seed": spec.seed,
            "vocab_size": spec.vocab_size, "eos_token_id": spec.eos_token_id}


def position_from_state(spec: StreamSpec, state: dict[str, Any], source: str) -> DataPosition:
    """The saved position, after checking that it belongs to the same stream."""
    for key in ("seq_len", "seed", "vocab_size", "eos_token_id"):
        if state.get(key) != getattr(spec, key):
            raise DataError(f"{source}: checkpoint was trained with {key}={state.get(key)!r}, "
                            f"this run has {getattr(spec, key)!r}; resuming would not continue the same data")
    if tuple(state.get("shards", ())) != spec.shards:
        saved, now = set(state.get("shards", ())), set(spec.shards)
        raise DataError(f"{source}: the shard list changed since the checkpoint "
                        f"({len(saved - now)} shards gone, {len(now - saved)} new); resuming would not continue "
                        f"the same data")
    return DataPosition(**state["position"])


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    """[batch, seq_len] int64 token ids; also the labels."""
    position: DataPosition
    """The stream position after this micro-batch (what a checkpoint taken now records)."""


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
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    # -- producer thread ---------------------------------------------------------------------

    def _produce(self, position: DataPosition) -> None:
        try:
            group = self.batch_size * self.world_size
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            rows: list[np.ndarray] = []
            for sample, after in self._samples(position):
                rows.append(sample)
                if len(rows) < group:
                    continue
                batch = torch.from_numpy(np.stack(rows[mine]).astype(np.int64))
                rows = []
                if self.pin_memory:
                    batch = batch.pin_memory()
                if not self._put(Batch(batch, after)):
                    return
        except BaseException as error:  # handed to the training loop, which reports it
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _samples(self, position: DataPosition) -> Iterator[tuple[np.ndarray, DataPosition]]:
        """The global stream from `position` on: each sample with the position after it."""
        shards = self.spec.shards
        epoch, cursor, sample_cursor = position.epoch, position.shard_cursor, position.sample_cursor
        consumed, skipped = position.samples_consumed, position.shards_skipped
        while not self._stop.is_set():
            order = epoch_shard_order(len(shards), self.spec.seed, epoch)
            yielded_this_epoch = cursor > 0 or sample_cursor > 0
            for k in range(cursor, len(shards)):
                name = shards[order[k]]
                upcoming = [shards[i] for i in order[k + 1: k + 1 + self.prefetch_shards]]
                self.source.prefetch(upcoming)
                samples = self._load(name)
                if samples is None:
                    skipped += 1
                    sample_cursor = 0
                    continue
                sample_order = shard_sample_order(len(samples), self.spec.seed, epoch, name)
                for j in range(sample_cursor, len(samples)):
                    consumed += 1
                    if j + 1 < len(samples):
                        after = DataPosition(epoch, k, j + 1, consumed, skipped)
                    elif k + 1 < len(shards):
                        after = DataPosition(epoch, k + 1, 0, consumed, skipped)
                    else:  # the epoch's last sample: the next one is the first of the next epoch
                        after = DataPosition(epoch + 1, 0, 0, consumed, skipped)
                    yielded_this_epoch = True
                    yield samples[sample_order[j]], after
                self.source.release(name)
                sample_cursor = 0
            if not yielded_this_epoch:
                raise DataError(f"{self.source.description}: no shard holds a full sample of "
                                f"{self.spec.seq_len} tokens")
            epoch, cursor = epoch + 1, 0
            log.info("data: starting epoch %d", epoch)

    def _load(self, name: str) -> np.ndarray | None:
        """The shard's packed samples, or None when it is bad and skipping is on."""
        path = self.source.fetch(name)  # ShardUnavailableError is not the shard's fault: never skipped
        try:
            tokens = read_shard(path, self.spec.vocab_size, self.spec.eos_token_id)
        except DataError as error:
            if not self.skip_bad_shards:
                raise
            log.warning("skipping bad shard: %s", error)
            self.source.release(name)
            return None
        return pack(tokens, self.spec.seq_len)
