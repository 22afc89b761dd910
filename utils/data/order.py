"""The order of the training data and its exact position: shards -> packed samples -> shuffled windows -> the
global sample stream, a pure function of (seed, epoch).

Which shards (max_files) are used; each epoch's seeded shard order, cut into consecutive windows of at most
`shuffle_window_shards` shards; what each window holds; and a permutation seeded by (seed, epoch, window) of the
window's samples (utils/data/shards.py reads and packs each shard), so that every batch mixes many shards. A
window holds the samples of its own shards, or, mixing the whole dataset, a seeded 1/S of the samples of every
shard (S windows an epoch): the same memory, but no window holds content that the others lack, so the loss does
not jump where a window begins on data sharded by source or time. A shard shorter than one sample is skipped
(and counted). The stream's position (a DataPosition: a window and an index in its sample order) is saved in
every checkpoint (utils/data/loader.py continues from it).
"""
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from utils.errors import DataError


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


def window_reads(num_shards: int, starts: list[int], window: int, mix_whole_dataset: bool) -> list[int]:
    """The positions, in the epoch's shard order, of the shards that window `window` reads, in reading order: its
    own shards; or, mixing the whole dataset, every shard, forwards in even windows and backwards in odd ones, so
    that a cache too small for all of them still holds the first ones a window reads (the last of the window
    before)."""
    if not mix_whole_dataset:
        return list(range(starts[window], starts[window + 1]))
    forwards = list(range(num_shards))
    return forwards if window % 2 == 0 else forwards[::-1]


def stripe(num_samples: int, seed: int, epoch: int, shard: int, window: int, windows: int) -> np.ndarray:
    """Which of a shard's packed samples (ascending indices) window `window` of the epoch's `windows` takes when
    every window mixes the whole dataset: one of `windows` near-equal parts of a split seeded by (seed, epoch,
    shard). Shard i gives window w part (w + i) mod windows, so that the larger parts spread over the windows.
    `shard`: its index in the run's shard list."""
    shuffled = np.random.default_rng([seed, epoch, shard, _STRIPE_STREAM]).permutation(num_samples)
    part = (window + shard) % windows
    return np.sort(shuffled[part * num_samples // windows: (part + 1) * num_samples // windows])


_STRIPE_STREAM = 0x57121FE
"""Keeps the stripes' random stream apart from the windows' ([seed, epoch, window])."""


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
    """Shards whose samples are shuffled together (with mix_whole_dataset: shards' worth of samples)."""
    mix_whole_dataset: bool = False
    """Every window takes its part of every shard (stripe()), rather than whole shards of its own."""


_STREAM_KEYS = ("seq_len", "seed", "vocab_size", "eos_token_id", "pad_token_id", "shuffle_window_shards",
                "mix_whole_dataset")
"""StreamSpec fields besides the shard list that a checkpoint records and a resume must match."""
_EARLIER_VERSIONS = {"mix_whole_dataset": False}
"""What a checkpoint saved before a key existed did: windows of whole shards."""
_CONFIG_FIELDS = ("seed", "pad_token_id", "shuffle_window_shards", "mix_whole_dataset")
"""Stream keys that are config fields of the same name: a refusal tells how to resume."""


def data_state(spec: StreamSpec, position: DataPosition) -> dict[str, Any]:
    """What a checkpoint stores (data_state.json)."""
    return {"position": asdict(position), "shards": list(spec.shards),
            **{key: getattr(spec, key) for key in _STREAM_KEYS}}


def position_from_state(spec: StreamSpec, state: dict[str, Any], source: str) -> DataPosition:
    """The saved position, after checking that it belongs to the same stream."""
    state = {**_EARLIER_VERSIONS, **state}
    missing = [key for key in _STREAM_KEYS if key not in state]
    if missing:
        raise DataError(f"{source}: saved by an earlier version of train.py, whose data order (no "
                        f"{', '.join(missing)}) this one does not reproduce: it cannot be resumed exactly; start a "
                        "fresh run in another checkpoint_dir (export_hf.py still exports its weights)")
    for key in _STREAM_KEYS:
        if state.get(key) != getattr(spec, key):
            way_out = f" (--set {key}={json.dumps(state[key])} resumes it)" if key in _CONFIG_FIELDS else ""
            raise DataError(f"{source}: checkpoint was trained with {key}={state.get(key)!r}, "
                            f"this run has {getattr(spec, key)!r}; resuming would not continue the same data{way_out}")
    if tuple(state.get("shards", ())) != spec.shards:
        saved, now = set(state.get("shards", ())), set(spec.shards)
        raise DataError(f"{source}: the shard list changed since the checkpoint "
                        f"({len(saved - now)} shards gone, {len(now - saved)} new); resuming would not continue "
                        f"the same data")
    position = DataPosition(**state["position"])
    if position.shard_cursor not in window_starts(len(spec.shards), spec.shuffle_window_shards)[:-1]:
        raise DataError(f"{source}: data position shard_cursor {position.shard_cursor} is not the start of a window")
    return position
