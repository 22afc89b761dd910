"""Helpers shared by test files: processes on free ports as run.sh starts them, weights compared to float rounding,
and a Checkpointer on a stand-in Accelerator (tests/unit/test_checkpointer.py, tests/e2e/test_untrusted_checkpoints.py)."""
import os
import socket
from pathlib import Path
from typing import Any

import torch

from configs.training_config import TrainingConfig
from conftest import MICRO_MODEL
from utils.checkpoint_utils import Checkpointer
from utils.checkpoints.writer import write_rng_state
from utils.data.order import DataPosition, StreamSpec
from utils.train_state import TrainingMetrics, TrainState
from utils.uploads.destination import open_destination


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_sh_env(processes: int) -> dict[str, str]:
    """run.sh starts one process per GPU through `accelerate launch`; here the GPUs are CPU processes."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GPUS_PER_MACHINE": str(processes),
            "MAIN_PORT": str(free_port())}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to float rounding. AdamW moves each weight by up to lr (1e-3) a step; where a gradient is near zero,
    its update's size depends on rounding, hence the absolute tolerance of 1% of one step. The key biases outside
    the rotary dimensions are left out: softmax ignores a shift shared by all keys, so their gradient is zero but
    for rounding, which AdamW's normalised update turns into steps of any size."""
    for name, tensor in a.items():
        other = b[name]
        if name.endswith("attention.query_key_value.bias"):
            keys = key_bias_elements(tensor.numel(), MICRO_MODEL["num_attention_heads"])
            tensor, other = tensor[~keys], other[~keys]
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=name)


def key_bias_elements(size: int, heads: int, rotary_pct: float = 0.25) -> torch.Tensor:
    """A mask of the non-rotary key entries of GPT-NeoX's fused query_key_value bias: per head, [query, key,
    value], rotary dimensions first."""
    head_dim = size // (3 * heads)
    within_head = torch.arange(size) % (3 * head_dim)
    return (within_head // head_dim == 1) & (within_head % head_dim >= int(head_dim * rotary_pct))


SPEC = StreamSpec(("tokenized_a.npz", "tokenized_b.npz"), seq_len=64, seed=1234, vocab_size=4096, eos_token_id=0,
                  pad_token_id=None, shuffle_window_shards=1)
WEIGHTS = "model.safetensors"


class FakeAccelerator:
    """The parts of Accelerator a Checkpointer uses, for one process: save_state writes small files."""

    is_main_process = is_local_main_process = True
    num_processes, process_index, step = 1, 0, 0
    mixed_precision = "no"
    device = torch.device("cpu")
    distributed_type = "NO"

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / WEIGHTS).write_bytes(b"weights of " + Path(folder).name.encode())
        write_rng_state(self, Path(folder))

    def load_state(self, folder: str) -> None:
        if not (Path(folder) / WEIGHTS).read_bytes().startswith(b"weights"):
            raise RuntimeError("corrupt")
        self.loaded.append(Path(folder))

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def make_config(tmp_path: Path, **overrides: Any) -> TrainingConfig:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "tokenizer.json").write_text('{"a tokenizer": true}')
    values: dict[str, Any] = dict(model_preset="tiny", data=str(data), checkpoint_dir=str(tmp_path / "checkpoints"),
                                  log_dir=str(tmp_path / "logs"), max_steps=20, save_steps=4, keep_checkpoints=2)
    values.update(overrides)
    return TrainingConfig(**values)


def make_checkpointer(config: TrainingConfig, accelerator: FakeAccelerator | None = None) -> Checkpointer:
    remote = open_destination(config.upload_destination) if config.upload_destination else None
    checkpointer = Checkpointer(config, config.model_shape(), accelerator or FakeAccelerator(), remote,
                                shared_disk=True)
    checkpointer.start(lambda record: None, (None, None, None), config.tokenizer_path())
    return checkpointer


def state_at(step: int, epoch: int = 0, shard_cursor: int = 0) -> TrainState:
    state = TrainState(SPEC, TrainingMetrics())
    state.step = step
    state.position = DataPosition(epoch, shard_cursor, 3, step * 2, 0)
    state.metrics.tokens_seen = step * 128
    state.metrics.record(step, 5.0 - step / 10, 1e-3)
    return state
