"""One shard of training data: where shards come from (a local folder here; gs:// in utils/data/cache.py), and
its tokens read, checked and packed into samples.

A shard holds `input_ids` (any integer dtype), in one of two layouts:
- a 1-D token stream, used as is. scripts/prepare_data.py writes these, with the end-of-text id after each
  document and that id stored beside it as an `eos_token_id` scalar, which must equal the model's;
- 2-D right-padded rows, one document each (the original tokenizer's layout). A row's real length comes from
  `attention_mask` (ones, then zeros) or `sequence_lengths`, or, with neither, from stripping the trailing
  `pad_token_id`s; without a pad id such a shard is refused, as its padding would be trained on. Padding is
  dropped and the end-of-text id (when configured) is appended to each row, unless the shard records an
  `eos_token_id`, which says that its rows already hold their end-of-text ids.
Each shard's tokens are cut into samples of `seq_len` tokens; the few left at its end are not used. Labels are
the inputs themselves: the model shifts them inside, so nothing is shifted twice and, since packed samples
have no padding, no padding reaches the loss.
"""
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from utils.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
"""The run's tokenizer, beside the shards (scripts/prepare_data.py writes it there)."""


# ---------------------------------------------------------------------------------------------
# Reading one shard
# ---------------------------------------------------------------------------------------------

def _row_lengths(shard: Any, input_ids: np.ndarray, name: str, pad_token_id: int | None) -> np.ndarray:
    """The real length of each right-padded row."""
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
        real = mask != 0
        # Only the count of ones is kept, so a zero before a one (left padding, a gap) would silently train
        # on padding and drop real tokens.
        gaps = (real[:, 1:] & ~real[:, :-1]).any(axis=1)
        if gaps.any():
            raise DataError(f"{name}: attention_mask row {int(np.argmax(gaps))} is not a run of ones followed by "
                            f"zeros (left padding or a gap); rows must be right-padded")
        return real.sum(axis=1)
    if pad_token_id is None:
        raise DataError(f"{name}: 2-D input_ids without attention_mask or sequence_lengths; set pad_token_id in "
                        f"the config to strip each row's trailing padding")
    real = input_ids != pad_token_id
    # Up to the last token that is not padding: a pad id inside a row is a token of the document.
    return np.where(real.any(axis=1), width - np.argmax(real[:, ::-1], axis=1), 0)


def _records_eos(shard: Any, name: str, eos_token_id: int | None) -> bool:
    """Whether the shard stores the end-of-text id it was written with; refuses one that is not the model's."""
    if "eos_token_id" not in shard.files:
        return False
    stored = np.asarray(shard["eos_token_id"])
    if stored.size != 1 or not np.issubdtype(stored.dtype, np.integer):
        raise DataError(f"{name}: eos_token_id must be one integer, got {stored.dtype} of shape {stored.shape}")
    if int(stored.reshape(())) != eos_token_id:
        raise DataError(f"{name}: written with end-of-text id {int(stored.reshape(()))}, but model.eos_token_id is "
                        f"{eos_token_id}; set model.eos_token_id to the data's")
    return True


def tokens_from_arrays(shard: Any, name: str, vocab_size: int, eos_token_id: int | None,
                       pad_token_id: int | None) -> np.ndarray:
    """The shard's documents as one validated int32 token stream, padding dropped, EOT after each document."""
    if "input_ids" not in shard.files:
        raise DataError(f"{name}: no 'input_ids' array (found: {', '.join(shard.files) or 'nothing'})")
    input_ids = np.asarray(shard["input_ids"])
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise DataError(f"{name}: input_ids has dtype {input_ids.dtype}; token ids must be integers")
    holds_eos = _records_eos(shard, name, eos_token_id)
    if input_ids.ndim == 1:
        tokens = input_ids
    elif input_ids.ndim == 2:
        lengths = _row_lengths(shard, input_ids, name, pad_token_id)
        if eos_token_id is not None and not holds_eos:
            # One document per row: one extra column holds the end-of-text id right after the row's last
            # real token (a row of padding only is no document and gets none).
            input_ids = np.concatenate([input_ids, np.zeros((input_ids.shape[0], 1), input_ids.dtype)], axis=1)
            input_ids[np.arange(input_ids.shape[0]), lengths] = eos_token_id
            lengths = np.where(lengths > 0, lengths + 1, 0)
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


def read_shard(path: Path, vocab_size: int, eos_token_id: int | None, pad_token_id: int | None) -> np.ndarray:
    """Loads a shard from disk; any unreadable or invalid content is a DataError naming the file."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                raise DataError(f"{path}: unreadable shard (not an .npz archive)")
        with np.load(path, allow_pickle=False) as shard:
            return tokens_from_arrays(shard, str(path), vocab_size, eos_token_id, pad_token_id)
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
    not_shards: list[str]
    """Entries that match the shard pattern but are not files (folders), left out by list_shards()."""

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

    def tokenizer(self) -> Path | None:
        """A local copy of the tokenizer.json beside the shards, or None where there is none."""
        ...


class LocalShardSource:
    def __init__(self, folder: str | Path, pattern: str) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.description = f"{self.folder}/{pattern}"
        self.not_shards: list[str] = []

    def list_shards(self) -> list[str]:
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: data folder does not exist")
        matches = sorted(self.folder.glob(self.pattern))
        names = [path.name for path in matches if path.is_file()]
        self.not_shards = [path.name for path in matches if not path.is_file()]
        if not names:
            raise DataError(f"{self.folder}: no shards matching {self.pattern!r}")
        return names

    def fetch(self, name: str) -> Path:
        return self.folder / name

    def prefetch(self, upcoming: list[str]) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def tokenizer(self) -> Path | None:
        path = self.folder / TOKENIZER_FILE
        return path if path.is_file() else None


