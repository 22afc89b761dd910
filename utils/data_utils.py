"""The data of a run, set up from its config and model shape in one call (litgpt's get_dataloaders): the shard
source, the training stream and the loader that continues it from a position, and the validation batches."""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from configs.model_config import ModelShape
from configs.training_config import TrainingConfig
from utils.data.cache import CachedShardSource, open_shard_source
from utils.data.evaluation import Evaluator, ValidationData, read_validation_batches, split_validation
from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec, select_shards, window_starts
from utils.data.shards import ShardSource
from utils.display import fmt_bytes


@dataclass(frozen=True)
class RunData:
    config: TrainingConfig
    source: ShardSource
    spec: StreamSpec
    """The global sample stream: shards, sequence length, seed, vocabulary, end-of-text id."""
    validation: ValidationData | None
    evaluator: Evaluator | None
    """The held-out batches of this process, read once and kept so every validation sees the same ones."""
    order_note: str | None
    """A start-up line on how windows mix the data, where there is more than one window an epoch."""
    tokenizer: Path | None
    """The run's tokenizer.json (the config's, else the one beside the shards, fetched from a bucket), copied into
    every checkpoint; None when there is none."""

    def loader(self, position: DataPosition, accelerator: Accelerator, micro_batch: int) -> BatchLoader:
        """This process's micro-batches of `micro_batch` samples from `position` on, read by a background thread."""
        settings = replace(LoaderSettings.of(self.config, accelerator.device), batch_size=micro_batch)
        return BatchLoader(self.source, self.spec, settings, accelerator.process_index, accelerator.num_processes,
                           position)

    def describe(self, tokens_per_step: int) -> list[str]:
        """The start-up log lines about the data."""
        lines = [f"Data: {len(self.spec.shards)} shards from {self.source.description} | "
                 f"{tokens_per_step:,} tokens per step",
                 f"Tokenizer: {self.tokenizer}, copied into every checkpoint" if self.tokenizer is not None else
                 "Tokenizer: none (no tokenizer field, no tokenizer.json beside the shards): checkpoints hold the "
                 "model only, and export_hf.py and generate.py will need --tokenizer"]
        if self.source.not_shards:
            lines.append(f"⚠️  Data: skipped {len(self.source.not_shards)} folder(s) named like shards in "
                         f"{self.source.description}: {', '.join(self.source.not_shards)}")
        if self.order_note is not None:
            lines.append(self.order_note)
        if self.validation is not None and self.evaluator is not None:
            lines.append(f"Validation: {len(self.validation.shards)} held-out shards from "
                         f"{self.validation.source.description}, {len(self.evaluator.batches)} batches per process "
                         f"every {self.config.eval_steps} steps")
        return lines


def open_data(config: TrainingConfig, shape: ModelShape, accelerator: Accelerator,
              resumed: dict[str, Any] | None) -> RunData:
    """The shards config.data holds (a local folder, or gs:// through a prefetching disk cache), the max_files
    of them picked by the seed, less any held out for validation; `resumed`: the data state of the checkpoint
    the run resumes (None for a fresh start)."""
    source = open_shard_source(config)
    tokenizer = config.tokenizer_path() if config.tokenizer is not None else source.tokenizer()
    shards, validation = split_validation(config, source, select_shards(source.list_shards(), config.max_files,
                                                                        config.seed))
    mix, order_note = choose_mixing(config, source, shards, resumed)
    spec = StreamSpec(tuple(shards), seq_len=shape.seq_len, seed=config.seed, vocab_size=shape.vocab_size,
                      eos_token_id=shape.eos_token_id, pad_token_id=config.pad_token_id,
                      shuffle_window_shards=config.shuffle_window_shards, mix_whole_dataset=mix)
    evaluator = None if validation is None else Evaluator(read_validation_batches(
        validation, spec, config.per_device_train_batch_size, accelerator.process_index, accelerator.num_processes,
        config.eval_batches))
    return RunData(config, source, spec, validation, evaluator, order_note, tokenizer)


def choose_mixing(config: TrainingConfig, source: ShardSource, shards: list[str],
                  resumed: dict[str, Any] | None) -> tuple[bool, str | None]:
    """Whether every window draws from the whole dataset (mix_whole_dataset; "auto": yes unless the shards are
    streamed through a cache that cannot hold them all, since each window reads every shard; a resume keeps what
    its checkpoint did), and a start-up line saying so where an epoch has more than one window."""
    windows = len(window_starts(len(shards), config.shuffle_window_shards)) - 1
    size = source.size_of(shards) if isinstance(source, CachedShardSource) else None
    too_big = (f"{len(shards)} shards ({fmt_bytes(size)}) do not fit cache_max_gb {config.cache_max_gb:g}"
               if size is not None and size > source.max_bytes else None)
    if config.mix_whole_dataset != "auto":
        mix = bool(config.mix_whole_dataset)
    elif resumed is not None:
        mix = bool(resumed.get("mix_whole_dataset", False))  # as it began (earlier versions: whole shards)
    else:
        mix = too_big is None
    if windows == 1:
        return mix, None
    if not mix:
        why = f": the {too_big}, and every window would download them again" if too_big else ""
        return mix, (f"Order: {windows} windows of whole shards an epoch (mix_whole_dataset false{why}); a window "
                     "brings content the ones before lacked if shards differ by source or time")
    warning = (f"; ⚠️  the {too_big}: every window downloads them again" if too_big else "")
    return mix, (f"Order: {windows} windows an epoch, each a seeded 1/{windows} of every one of the {len(shards)} "
                 f"shards (mix_whole_dataset): each shard is read {windows} times an epoch{warning}")
