"""Shared test helpers: the sample shards (built once per session) and running train.py on a tiny config."""
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# A model small enough that a step takes milliseconds on one CPU core.
MICRO_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "seq_len": 64}


@pytest.fixture(autouse=True)
def environment_restored() -> Any:
    """os.environ as it was before each test: an Accelerator made in the test process writes into it
    (ACCELERATE_USE_FSDP when given an FSDP plugin), and the train.py runs of the next tests on the same worker
    would inherit it (a DDP run turned FSDP)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --sample shards and tokenizer.json, built by scripts/prepare_data.py into a temporary folder."""
    folder = tmp_path_factory.mktemp("sample")
    from scripts.prepare_data import build_sample
    build_sample(folder)
    return folder


def write_config(folder: Path, data: Path | str, **overrides: Any) -> Path:
    """A JSON config for the micro model, writing checkpoints and logs inside `folder`."""
    values: dict[str, Any] = {
        "model_preset": "tiny", "model": dict(MICRO_MODEL), "data": str(data), "max_steps": 8,
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 2, "save_steps": 4,
        "logging_steps": 1, "checkpoint_dir": str(folder / "checkpoints"), "log_dir": str(folder / "logs"),
        "mixed_precision": "no",
    }
    values.update(overrides)
    path = folder / "config.json"
    path.write_text(json.dumps(values))
    return path


def run_train(*args: str, timeout: float = 240, env: dict[str, str] | None = None,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Runs train.py as a user would, from the repo root; returns the finished process."""
    command = (launcher or [sys.executable]) + [str(REPO_ROOT / "train.py"), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


class GatedStorage:
    """Wraps a Storage: every upload (of an archive or of a file) waits until `gate` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.url, self.auth = inner, inner.url, inner.auth
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_writer(self, name: str) -> Any:
        assert self.gate.wait(60)
        return self.inner.open_writer(name)

    def begin_file(self, *args: Any) -> Any:
        assert self.gate.wait(60)
        return self.inner.begin_file(*args)


def read_metrics(log_dir: Path) -> list[dict[str, Any]]:
    """The training and validation lines of metrics.jsonl (not the save and upload events)."""
    return [line for line in read_log(log_dir) if "event" not in line]


def read_events(log_dir: Path, event: str) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of one kind of event: "save" or "upload"."""
    return [line for line in read_log(log_dir) if line.get("event") == event]


def read_log(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def disk_peak(folder: Path, action: Callable[[], Any]) -> tuple[int, Any]:
    """The most bytes of files under `folder` seen while `action()` runs (sampled every millisecond or so), and
    what action() returned."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], bytes_under(folder))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], bytes_under(folder)), result


def bytes_under(folder: Path) -> int:
    """The bytes of the files under `folder` now. os.walk skips a folder that vanishes while it is listed (a
    .tmp- folder renamed into place), where Path.rglob raises."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:  # renamed into place meanwhile
                continue
    return total
