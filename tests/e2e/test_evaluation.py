"""Validation: held-out shards, a deterministic loss on fixed batches, no effect on training, best_loss."""
import json
import math
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gcs_emulator import gcs_server  # noqa: F401  (the fixture)
from safetensors.torch import load_file

from configs.model_config import build_model_config, resolve_shape
from configs.training_config import ConfigError, TrainingConfig
from conftest import MICRO_MODEL, read_metrics, run_train, write_config
from utils.data.evaluation import Evaluator, ValidationData, holdout_split, read_validation_batches, split_validation
from utils.data.order import StreamSpec
from utils.data.shards import LocalShardSource
from utils.errors import DataError
from utils.train_state import TrainingMetrics


def final_checkpoint(folder: Path) -> Path:
    return sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("step")[1].split("-")[0]))[-1]


def train_losses(log_dir: Path) -> list[tuple[int, float]]:
    return [(line["step"], line["loss"]) for line in read_metrics(log_dir) if "loss" in line]


def eval_lines(log_dir: Path) -> list[dict]:
    return [line for line in read_metrics(log_dir) if "eval_loss" in line]


# --- pure pieces -------------------------------------------------------------------------------

def test_holdout_split_is_seeded_disjoint_and_complete() -> None:
    shards = [f"tokenized_{i:05d}.npz" for i in range(10)]
    training, held_out = holdout_split(shards, 3, seed=7)
    assert len(held_out) == 3 and set(training) | set(held_out) == set(shards) and not set(training) & set(held_out)
    assert holdout_split(shards, 3, seed=7) == (training, held_out)
    assert holdout_split(shards, 3, seed=8)[1] != held_out  # the pick follows the seed
    with pytest.raises(DataError, match="leaves no training shard"):
        holdout_split(shards, 10, seed=7)


def test_config_validates_validation_fields() -> None:
    with pytest.raises(ConfigError, match="either eval_data or eval_holdout_files"):
        TrainingConfig(eval_data="x", eval_holdout_files=1)
    with pytest.raises(ConfigError, match="eval_batches"):
        TrainingConfig(eval_batches=0)
    with pytest.raises(ConfigError, match="export_dtype"):
        TrainingConfig(export_dtype="fp16")
    assert not TrainingConfig().validation_enabled
    assert TrainingConfig(eval_holdout_files=2).validation_enabled


def test_best_loss_follows_validation_loss_when_validating() -> None:
    metrics = TrainingMetrics(best_from_validation=True)
    metrics.record(1, 5.0, 1e-3)
    assert metrics.best_loss is None  # training losses no longer set it
    metrics.record_validation(2, {"eval_loss": 6.0, "eval_perplexity": math.exp(6.0)})
    metrics.record_validation(4, {"eval_loss": 7.0, "eval_perplexity": math.exp(7.0)})
    assert (metrics.best_loss, metrics.best_step) == (6.0, 2)
    summary = metrics.summary(4)
    assert summary["eval_loss"] == 7.0 and summary["best_eval_loss"] == 6.0 and summary["steps_since_best"] == 2
    assert metrics.state_dict()["validation_history"] == [  # the curve the viewer plots
        {"step": 2, "eval_loss": 6.0, "eval_perplexity": math.exp(6.0)},
        {"step": 4, "eval_loss": 7.0, "eval_perplexity": math.exp(7.0)}]
    plain = TrainingMetrics()
    plain.record(1, 5.0, 1e-3)
    plain.record_validation(2, {"eval_loss": 6.0, "eval_perplexity": math.exp(6.0)})
    assert plain.best_loss == 5.0  # without validation on, best_loss stays the training loss


def test_validation_batches_and_loss_are_deterministic(sample_data: Path) -> None:
    shape = resolve_shape("tiny", MICRO_MODEL)
    source = LocalShardSource(sample_data, "tokenized_*.npz")
    data = ValidationData(source, ("tokenized_00006.npz", "tokenized_00007.npz"))
    spec = StreamSpec(("unused",), shape.seq_len, 1234, shape.vocab_size, shape.eos_token_id, None, 16)
    first = read_validation_batches(data, spec, batch_size=2, rank=0, world_size=1, max_batches=5)
    again = read_validation_batches(data, spec, batch_size=2, rank=0, world_size=1, max_batches=5)
    assert len(first) == 5 and all(torch.equal(a, b) for a, b in zip(first, again))
    # Two processes split each global batch between them: rank 1 holds what follows rank 0's samples.
    rank1 = read_validation_batches(data, spec, batch_size=1, rank=1, world_size=2, max_batches=5)
    assert torch.equal(rank1[0][0], first[0][1])

    from accelerate import Accelerator
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(build_model_config(shape))
    evaluator = Evaluator(first)
    result = evaluator.evaluate(model, Accelerator(cpu=True))
    assert result == evaluator.evaluate(model, Accelerator(cpu=True))
    assert model.training  # put back into training mode
    with torch.no_grad():
        expected = sum(model(input_ids=b, labels=b).loss.item() for b in first) / len(first)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.tokens == 5 * 2 * (shape.seq_len - 1)


def test_small_validation_set_uses_one_pass_only(sample_data: Path) -> None:
    shape = resolve_shape("tiny", MICRO_MODEL)
    data = ValidationData(LocalShardSource(sample_data, "tokenized_*.npz"), ("tokenized_00007.npz",))
    spec = StreamSpec(("unused",), shape.seq_len, 1234, shape.vocab_size, shape.eos_token_id, None, 16)
    batches = read_validation_batches(data, spec, batch_size=4, rank=0, world_size=1, max_batches=100_000)
    samples = torch.cat(batches)
    assert len(batches) < 100_000
    assert len({tuple(row.tolist()) for row in samples}) == len(samples)  # no sample counted twice
    with pytest.raises(DataError, match="fewer than one batch .*: hold out more shards \\(eval_holdout_files\\) or "
                                        "point eval_data at a larger set, .* or turn validation off"):
        read_validation_batches(data, spec, batch_size=len(samples) + 4, rank=0, world_size=1, max_batches=3)


def test_validation_set_of_half_a_batch_is_refused_not_read_twice(tmp_path: Path) -> None:
    np.savez(tmp_path / "tokenized_a.npz", input_ids=np.arange(1, 2 * 8 + 1))  # exactly 2 samples of 8 tokens
    data = ValidationData(LocalShardSource(tmp_path, "tokenized_*.npz"), ("tokenized_a.npz",))
    spec = StreamSpec(("unused",), 8, 1, 100, None, None, 16)
    assert len(read_validation_batches(data, spec, batch_size=2, rank=0, world_size=1, max_batches=5)) == 1
    # A batch of 4 would be both samples twice, ending exactly where a third pass would begin.
    for batch_size, world_size in ((4, 1), (2, 2)):
        with pytest.raises(DataError, match="fewer than one batch"):
            read_validation_batches(data, spec, batch_size, rank=0, world_size=world_size, max_batches=5)


def test_one_pass_over_held_out_shards_in_several_windows(tmp_path: Path) -> None:
    for i in range(3):  # 5 distinct samples of 8 tokens each
        np.savez(tmp_path / f"tokenized_{i}.npz", input_ids=np.arange(1, 41) + 40 * i)
    data = ValidationData(LocalShardSource(tmp_path, "tokenized_*.npz"), ("tokenized_0.npz", "tokenized_1.npz",
                                                                           "tokenized_2.npz"))
    spec = StreamSpec(("unused",), 8, 1, 200, None, None, 2)  # windows of 1 and 2 shards
    batches = read_validation_batches(data, spec, batch_size=2, rank=0, world_size=1, max_batches=100)
    samples = {tuple(row.tolist()) for batch in batches for row in batch}
    assert len(batches) == 7 and len(samples) == 14  # 15 samples in one pass: the 8th batch would repeat one
    assert {sample[0] // 40 for sample in samples} == {0, 1, 2}


# --- train.py end to end -----------------------------------------------------------------------

def test_validation_leaves_training_bit_identical_and_resumes_exactly(tmp_path: Path, sample_data: Path) -> None:
    eval_data = tmp_path / "held_out"
    eval_data.mkdir()
    shutil.copy(sample_data / "tokenized_00007.npz", eval_data)
    train_data = tmp_path / "train_data"
    train_data.mkdir()
    for shard in sorted(sample_data.glob("tokenized_*.npz"))[:7]:
        shutil.copy(shard, train_data)

    off, on, resumed = tmp_path / "off", tmp_path / "on", tmp_path / "resumed"
    for folder in (off, on, resumed):
        folder.mkdir()
    validation = {"eval_data": str(eval_data), "eval_steps": 3, "eval_batches": 4}
    result = run_train("--config", str(write_config(off, train_data)))
    assert result.returncode == 0, result.stderr
    result = run_train("--config", str(write_config(on, train_data, **validation)))
    assert result.returncode == 0, result.stderr
    assert "Validation: 1 held-out shards" in result.stderr

    # Training is untouched by validation: same losses, same final weights.
    assert train_losses(on / "logs") == train_losses(off / "logs")
    weights_off = load_file(final_checkpoint(off) / "model.safetensors")
    weights_on = load_file(final_checkpoint(on) / "model.safetensors")
    assert weights_off.keys() == weights_on.keys()
    assert all(torch.equal(weights_off[k], weights_on[k]) for k in weights_off)
    assert not eval_lines(off / "logs")

    # Validation every 3 steps and at the end (max_steps 8), with finite losses.
    evals = eval_lines(on / "logs")
    assert [line["step"] for line in evals] == [3, 6, 8]
    for line in evals:
        assert math.isfinite(line["eval_loss"]) and line["eval_perplexity"] == pytest.approx(math.exp(line["eval_loss"]))

    # The checkpoint records the latest validation, and best_loss is the best validation loss.
    metadata = json.loads((final_checkpoint(on) / "metadata.json").read_text())
    assert metadata["validation_metrics"]["eval_loss"] == evals[-1]["eval_loss"]
    assert metadata["validation_metrics"]["current_avg_loss"] is not None  # training statistics kept beside it
    assert metadata["best_loss"] == min(line["eval_loss"] for line in evals)

    # TensorBoard has the validation scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = [EventAccumulator(str(path.parent)).Reload() for path in (on / "logs").rglob("events.out.tfevents.*")]
    assert any("eval_loss" in accumulator.Tags()["scalars"] for accumulator in events)

    # Resuming from step 4 validates on the same batches: the same validation losses, bit for bit.
    (resumed / "checkpoints").mkdir()
    step4 = on / "checkpoints" / "checkpoint-epoch0-step4-files0"
    shutil.copytree(step4, resumed / "checkpoints" / step4.name)
    result = run_train("--config", str(write_config(resumed, train_data, **validation)), "--resume", "latest")
    assert result.returncode == 0, result.stderr
    assert [(line["step"], line["eval_loss"]) for line in eval_lines(resumed / "logs")] == \
        [(line["step"], line["eval_loss"]) for line in evals if line["step"] > 4]


def test_holdout_files_are_taken_out_of_training(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, eval_holdout_files=2, eval_steps=100, eval_batches=2, max_steps=2,
                          save_steps=2)
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr
    state = json.loads((final_checkpoint(tmp_path) / "data_state.json").read_text())
    assert len(state["shards"]) == 6  # 8 sample shards, 2 held out
    assert "Validation: 2 held-out shards" in result.stderr
    assert [line["step"] for line in eval_lines(tmp_path / "logs")] == [2]  # at the end only


def test_two_processes_validate_the_same_samples_as_one(tmp_path: Path, sample_data: Path) -> None:
    """With the same global batch, 2 processes see the same validation samples as 1 (each half of every
    batch) and reduce their means to the same validation loss."""
    eval_data = tmp_path / "held_out"
    eval_data.mkdir()
    shutil.copy(sample_data / "tokenized_00007.npz", eval_data)
    losses = {}
    for processes, micro_batch in ((1, 4), (2, 2)):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        config = write_config(folder, sample_data, max_steps=2, save_steps=2, per_device_train_batch_size=micro_batch,
                              eval_data=str(eval_data), eval_steps=1, eval_batches=3)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port)] if processes == 2 else None
        result = run_train("--config", str(config), launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[processes] = [(line["step"], line["eval_loss"], line["eval_tokens"]) for line in eval_lines(folder / "logs")]
    assert [entry[0] for entry in losses[1]] == [entry[0] for entry in losses[2]] == [1, 2]
    for (_, one, tokens_one), (_, two, tokens_two) in zip(losses[1], losses[2]):
        assert two == pytest.approx(one, rel=1e-5) and tokens_one == tokens_two


def test_eval_data_from_gcs_gives_the_same_batches(tmp_path: Path, sample_data: Path, gcs_server) -> None:  # noqa: F811
    gcs_server.create_bucket("bucket")
    gcs_server.put("bucket", "held_out/tokenized_00007.npz", (sample_data / "tokenized_00007.npz").read_bytes())
    local = tmp_path / "held_out"
    local.mkdir()
    shutil.copy(sample_data / "tokenized_00007.npz", local)
    shape = resolve_shape("tiny", MICRO_MODEL)
    spec = StreamSpec(("unused",), shape.seq_len, 1234, shape.vocab_size, shape.eos_token_id, None, 16)
    batches = []
    for eval_data in ("gs://bucket/held_out", str(local)):
        config = TrainingConfig(model_preset="tiny", model=dict(MICRO_MODEL), data=str(sample_data),
                                eval_data=eval_data, cache_dir=str(tmp_path / "cache"))
        shards, validation = split_validation(config, LocalShardSource(sample_data, "tokenized_*.npz"), ["a", "b"])
        assert shards == ["a", "b"] and validation is not None and validation.shards == ("tokenized_00007.npz",)
        batches.append(read_validation_batches(validation, spec, 2, 0, 1, max_batches=3))
    assert all(torch.equal(a, b) for a, b in zip(*batches)) and len(batches[0]) == 3
    with pytest.raises(DataError, match="is the training data folder"):
        split_validation(TrainingConfig(data=str(sample_data), eval_data=str(sample_data) + "/"), None, [])
