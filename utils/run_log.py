"""What a run reports as it goes: the progress bar, one JSON line per logging step and per validation in
<log_dir>/metrics.jsonl (and one per start, save and upload, with an "event"), and the same values in TensorBoard.
Only the main process writes.

MetricsWindow keeps the steps since the last logging step: their summed loss stays on the device, so the loop
waits for the GPU only at a logging step, and their training time leaves out validation and saving.
"""
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from configs.model_config import ModelShape, shape_as_dict
from configs.training_config import TrainingConfig
from utils.errors import CheckpointError
from utils.performance import MfuMeter, describe_fast_path, window_peak_memory_gib
from utils.train_state import TrainState

log = logging.getLogger(__name__)


class MetricsWindow:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.first_non_finite = torch.full((), -1, device=device, dtype=torch.int64)
        """The first step of the window whose gradient norm was NaN or infinite (-1: none), kept on the device."""
        self.steps = 0
        """Steps since the window began: 0 right after a logging step (nothing left to check before a save)."""
        self.lr = 0.0
        self.grad_norm = torch.zeros((), device=device)
        """The newest step's rate and gradient norm (on the device)."""
        self.run_start = self.start = time.perf_counter()

    def step_done(self, losses: list[torch.Tensor], lr: float, grad_norm: torch.Tensor, step: int,
                  updated: bool) -> None:
        """A completed step: its micro-batches' losses (detached) summed on the device, no sync; whether its
        gradient norm was NaN or infinite, when it updated the weights (an fp16 overflow skips the update)."""
        for loss in losses:
            self.loss += loss
        if updated:
            bad = (self.first_non_finite < 0) & ~torch.isfinite(grad_norm)
            self.first_non_finite = torch.where(bad, torch.full((), step, device=self.device), self.first_non_finite)
        self.lr, self.grad_norm = lr, grad_norm
        self.steps += 1

    def pause(self, seconds: float) -> None:
        """Time spent validating or saving: not training time."""
        self.start += seconds

    def close(self, accelerator: Accelerator, accumulation: int) -> tuple[float, float, int, int | None]:
        """The window's mean loss over its micro-batches and all processes (the only wait for the device), its
        training seconds, its steps, and its first step with a non-finite gradient norm on any process (None
        when all were finite); the next window starts now."""
        totals = accelerator.reduce(torch.stack([self.loss, (self.first_non_finite >= 0).to(self.loss.dtype)]),
                                    reduction="mean")
        loss, any_non_finite = (totals / torch.tensor([self.steps * accumulation, 1], device=self.device)).tolist()
        first_non_finite = int(self.first_non_finite.item()) if any_non_finite > 0 else None
        summary = loss, time.perf_counter() - self.start, self.steps, first_non_finite
        self.loss.zero_()
        self.first_non_finite.fill_(-1)
        self.steps, self.start = 0, time.perf_counter()
        return summary


class RunLog:
    """Writes the run's logs; a write that fails (a full log disk) is remembered in `failure` rather than raised,
    so that the loop can still save a checkpoint before it stops."""

    def __init__(self, accelerator: Accelerator, config: TrainingConfig, mfu_meter: MfuMeter, accumulation: int,
                 tokens_per_step: int) -> None:
        self.accelerator = accelerator
        self.config = config
        self.mfu_meter = mfu_meter
        self.accumulation = accumulation
        self.tokens_per_step = tokens_per_step
        self.main_process = accelerator.is_main_process
        self.log_dir = Path(config.log_dir)
        self.metrics_file = self.log_dir / "metrics.jsonl"
        self.progress: tqdm | None = None
        self.failure: str | None = None
        """Why the logs could not be written (one line naming the folder); nothing more is written after it."""
        self._lock = threading.Lock()  # background saves and uploads report from their own threads

    def describe_start(self, shape: ModelShape, n_params: int, data_lines: list[str]) -> None:
        """The start-up lines of the main process: the model and the devices, what the run does for speed, its data."""
        if not self.main_process:
            return
        accelerator, config = self.accelerator, self.config
        log.info(f"Model: GPT-NeoX {config.model_preset}, {n_params:,} parameters, seq {shape.seq_len} | "
                 f"device {accelerator.device} x {accelerator.num_processes} processes, "
                 f"mixed precision {accelerator.mixed_precision}")
        processes = accelerator.num_processes
        log.info(f"Batch: {config.global_batch(processes):,} samples a step = micro-batch "
                 f"{config.per_device_train_batch_size} x {self.accumulation} accumulated x {processes} process(es), "
                 f"{self.tokens_per_step:,} tokens")
        log.info(f"Speed: {describe_fast_path(config, accelerator, self.mfu_meter)}")
        for line in data_lines:
            log.info(line)

    def start_trackers(self, step: int, shape: ModelShape, run_id: str | None) -> None:
        """The trackers, given the run's hyperparameters (the resolved config, the model shape, the run id and the
        number of processes), and the logs cut back to `step`, where training starts:
        the steps after it are trained again (after a kill, the log can be ahead of the newest checkpoint; a fresh
        start may find the log of an attempt that saved nothing), so each step appears once. On the main process;
        logs that cannot be written are a CheckpointError (nothing is trained yet, nothing needs saving)."""
        if not self.main_process:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_file.exists():
            self._write_guarded("metrics.jsonl", lambda: rewind(self.metrics_file, step))
        if self.config.trackers:
            hyperparameters = {**self.config.to_dict(), "model_shape": shape_as_dict(shape), "run_id": run_id,
                               "num_processes": self.accelerator.num_processes}
            # TensorBoard hides the events of the steps after purge_step that earlier writers left.
            options = {"tensorboard": {"purge_step": step + 1}}
            self._write_guarded("the trackers' logs", lambda: self.accelerator.init_trackers(
                self.config.project_name, config=flat_hyperparameters(hyperparameters), init_kwargs=options))
        if self.failure is not None:  # nothing trained yet, nothing to save: stop now, in one line
            raise CheckpointError(self.failure)

    def start_progress(self, max_steps: int, step: int) -> None:
        self.progress = tqdm(total=max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                             disable=not self.main_process)
        self.started(step, max_steps)

    def started(self, step: int, max_steps: int) -> None:
        """Training starts, or resumes, at `step` towards `max_steps`: one metrics.jsonl line, so that the monitor
        knows a resumed run's own max_steps (and that it resumed) before its first logging step, which may come
        hundreds of steps later. On the main process, like every line."""
        self.event({"event": "start", "step": step, "max_steps": max_steps})

    def step_done(self) -> None:
        assert self.progress is not None
        self.progress.update(1)

    def close_window(self, window: MetricsWindow, state: TrainState) -> tuple[dict[str, Any], int | None]:
        """The metrics line of a logging step, its loss recorded in the metrics, and the window's first step with
        a non-finite gradient norm (None: all finite); the next window starts."""
        lr, grad_norm = window.lr, float(window.grad_norm)
        loss, seconds, steps, first_non_finite = window.close(self.accelerator, self.accumulation)
        state.metrics.record(state.step, loss, lr)
        tokens_per_sec = steps * self.tokens_per_step / seconds
        return {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_seen": state.metrics.tokens_seen, "tokens_per_sec": tokens_per_sec,
                "elapsed_s": time.perf_counter() - window.run_start, "epoch": state.position.epoch,
                "shards_skipped": state.position.shards_skipped,
                "mfu": self.mfu_meter.mfu(tokens_per_sec),  # None (null) when the peak is unknown
                "gpu_memory_gib": window_peak_memory_gib(self.accelerator.device),  # this process's; null on CPU
                "max_steps": self.config.max_steps}, first_non_finite

    def training(self, record: dict[str, Any]) -> None:
        """A logging step's metrics line (all processes pass it; the main process writes it)."""
        if not self.main_process:
            return
        self._append(record)
        scalars = {k: v for k, v in record.items() if k not in ("step", "max_steps") and v is not None}
        self._write_guarded("the trackers' logs", lambda: self.accelerator.log(scalars, step=record["step"]))
        assert self.progress is not None
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_sec']:,.0f}",
                                  **({"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}),
                                  **({"mem": f"{record['gpu_memory_gib']:.1f}G"}
                                     if record["gpu_memory_gib"] is not None else {}))

    def validation(self, step: int, results: dict[str, Any]) -> None:
        if not self.main_process:
            return
        self._append({"step": step, **results})
        self._write_guarded("the trackers' logs", lambda: self.accelerator.log(results, step=step))
        log.info(f"📏 Validation at step {step}: loss {results['eval_loss']:.4f}, "
                   f"perplexity {results['eval_perplexity']:.2f}")

    def event(self, record: dict[str, Any]) -> None:
        """Something that happened ({"event": "start" | "save" | "upload", ...}: a start, a save's or an upload's
        figures): one metrics.jsonl line. Any thread."""
        if self.main_process:
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        def append() -> None:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self._write_guarded("metrics.jsonl", append)

    def _write_guarded(self, what: str, write: Callable[[], Any]) -> None:
        with self._lock:
            if self.failure is not None:
                return
            try:
                write()
            except OSError as error:
                self.failure = f"log_dir {self.log_dir}: cannot write {what} ({error.strerror or error})"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def end(self) -> None:
        """Accelerate's end of training on every process: the trackers close (TensorBoard writes what it still
        holds), the process group goes."""
        try:
            self.accelerator.end_training()
        except OSError as error:
            self.failure = self.failure or f"log_dir {self.log_dir}: cannot write the trackers' logs ({error.strerror})"


def flat_hyperparameters(values: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The resolved config as trackers take hyperparameters (TensorBoard: scalars and strings only): nested
    fields as "model_shape.hidden_size", lists and nulls as their JSON text."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def rewind(metrics_file: Path, step: int) -> None:
    """Drops the lines of the steps after `step` (written by a run killed after its last checkpoint)."""
    kept = []
    for line in metrics_file.read_text().splitlines(keepends=True):
        try:
            line_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut short by the kill
        if not isinstance(line_step, int) or line_step <= step:
            kept.append(line)
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics_file)
