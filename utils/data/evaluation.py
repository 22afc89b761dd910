"""Validation: mean loss and perplexity of the model on held-out shards, on the same batches every time.

The held-out shards come from a separate folder (`eval_data`) or are taken out of the run's selected
shards by a seeded pick (`eval_holdout_files`). Their batches are read once, before training starts, and
kept in memory, so every validation sees exactly the same samples, and validating touches neither the
training data order nor any random number generator: a run with validation on trains bit-identically
to one with it off. Each process evaluates its own share of the batches (the world-size sharding of
utils/data_utils) and the mean is reduced across processes.
"""
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from configs.training_config import TrainingConfig
from utils.data.cache import open_shard_source
from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec
from utils.data.shards import ShardSource
from utils.errors import DataError
from utils.storage import is_gcs_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationData:
    """Where the held-out shards are read from."""

    source: ShardSource
    shards: tuple[str, ...]


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    """Mean next-token cross-entropy over the validation batches of all processes."""
    tokens: int
    """Tokens evaluated, all processes together."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows a float past ~709

    def as_record(self) -> dict[str, float | int]:
        """The keys written to metrics.jsonl, TensorBoard and metadata.json's validation_metrics."""
        return {"eval_loss": self.loss, "eval_perplexity": self.perplexity, "eval_tokens": self.tokens}


def holdout_split(shards: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): `holdout` shards picked by a seeded shuffle, both lists sorted."""
    if holdout >= len(shards):
        raise DataError(f"eval_holdout_files {holdout} leaves no training shard out of the {len(shards)} selected")
    picked = set(np.random.default_rng([seed, 0xE7A1]).permutation(len(shards))[:holdout].tolist())
    held_out = sorted(name for i, name in enumerate(shards) if i in picked)
    return sorted(name for i, name in enumerate(shards) if i not in picked), held_out


def same_location(a: str, b: str) -> bool:
    if is_gcs_url(a) or is_gcs_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def split_validation(config: TrainingConfig, source: ShardSource,
                     shards: list[str]) -> tuple[list[str], ValidationData | None]:
    """The training shards and the validation data the config asks for (None when validation is off)."""
    if config.eval_holdout_files:
        training, held_out = holdout_split(shards, config.eval_holdout_files, config.seed)
        return training, ValidationData(source, tuple(held_out))
    if config.eval_data is not None:
        if same_location(config.eval_data, config.data):
            raise DataError(f"eval_data {config.eval_data} is the training data folder; use eval_holdout_files "
                            "to hold shards out of it instead")
        # A local folder, or gs:// through the same kind of cache as the training shards.
        eval_source = open_shard_source(replace(config, data=config.eval_data))
        return shards, ValidationData(eval_source, tuple(eval_source.list_shards()))
    return shards, None


def read_validation_batches(data: ValidationData, spec: StreamSpec, batch_size: int, rank: int, world_size: int,
                            max_batches: int) -> list[torch.Tensor]:
    """This process's first `max_batches` micro-batches of one pass over the held-out shards.

    Only one epoch is used, so no sample is counted twice; a smaller held-out set gives fewer batches
    (with a warning), and one that does not fill a single batch is an error.
    """
    # The training stream's packing and shuffle window over the held-out shards: the first batches mix them.
    validation_spec = replace(spec, shards=data.shards)
    loader = BatchLoader(data.source, validation_spec,
                         LoaderSettings(batch_size, prefetch_batches=2, announce_epochs=False), rank, world_size,
                         DataPosition())
    batches: list[torch.Tensor] = []
    try:
        for batch in loader:
            after = batch.position
            if after.epoch > 1 or (after.epoch == 1 and (after.shard_cursor, after.sample_cursor) != (0, 0)):
                break  # the batch holds samples of a second pass
            batches.append(batch.input_ids)
            if after.epoch > 0 or len(batches) == max_batches:
                break
    finally:
        loader.close()
    if not batches:
        raise DataError(f"validation data ({len(data.shards)} shards) holds fewer than one batch of "
                        f"{batch_size * world_size} samples of {spec.seq_len} tokens: hold out more shards "
                        "(eval_holdout_files) or point eval_data at a larger set, give its shards more tokens, use a "
                        "smaller per_device_train_batch_size, or turn validation off (eval_holdout_files 0)")
    if len(batches) < max_batches:
        log.warning("validation data holds only %d batches (eval_batches is %d); validating on those",
                    len(batches), max_batches)
    return batches


class Evaluator:
    """Computes the validation loss of a model on a fixed list of micro-batches."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, accelerator: Accelerator,
                 stop_agreed: Callable[[], bool] = lambda: False) -> ValidationResult | None:
        """The validation loss, or None when stop_agreed() says (before a batch) that every process stops: a
        stop request is honoured between batches, not after all of them. stop_agreed must give every process
        the same answer at the same batch, so that the collectives inside a wrapped (DDP) model stay matched."""
        model.eval()
        try:
            total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            for input_ids in self.batches:
                if stop_agreed():
                    return None
                input_ids = input_ids.to(accelerator.device, non_blocking=True)
                # Packed samples have no padding: every batch holds the same number of predicted tokens,
                # so the mean of the batch means is the mean over all tokens.
                total += model(input_ids=input_ids, labels=input_ids).loss.double()
            mean = accelerator.reduce(total / len(self.batches), reduction="mean").item()
        finally:
            model.train()
        batch, seq_len = self.batches[0].shape
        tokens = len(self.batches) * batch * (seq_len - 1) * accelerator.num_processes
        return ValidationResult(loss=mean, tokens=tokens)
