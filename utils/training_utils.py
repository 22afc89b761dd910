"""Small pieces of the training loop: learning-rate schedule, optimizer groups, agreeing across processes,
metrics, stop signals."""
import math
import os
import signal
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from configs.training_config import ConfigError
from utils.checkpoint_utils import CheckpointError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------

def lr_multiplier(step: int, warmup_steps: int, schedule_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak learning rate for optimizer step `step` (0-based): linear warmup, then
    cosine decay to min_lr_ratio at schedule_steps, flat after. It depends on the optimizer step
    only, so a run on N processes follows the same schedule as a run on one."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= schedule_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on biases, LayerNorms or the input embedding."""
    input_embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim >= 2 and parameter is not input_embedding:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [{"params": params, "weight_decay": decay_of_group}
            for params, decay_of_group in zip((decay, no_decay), group_weight_decays(weight_decay))]


def group_weight_decays(weight_decay: float) -> tuple[float, float]:
    """The weight decay of parameter_groups' two groups: [weight matrices, everything else]."""
    return weight_decay, 0.0


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                             learning_rate: float, betas: tuple[float, float], eps: float,
                             weight_decay: float) -> list[str]:
    """After a checkpoint is loaded: the config's peak learning rate, betas, eps and weight decay replace
    those of the run that saved it (loading restores them with the optimizer and schedule state), so a
    resume with a changed config trains with what it says. Returns the changes, one "name: old -> new" each.

    The groups are parameter_groups' [decay, no decay]; the schedule's shape comes from the config anyway.
    """
    changes: dict[str, str] = {}
    for group, decay_of_group in zip(optimizer.param_groups, group_weight_decays(weight_decay)):
        wanted = {"learning_rate": ("initial_lr", learning_rate), "adam_betas": ("betas", tuple(betas)),
                  "adam_epsilon": ("eps", eps), "weight_decay": ("weight_decay", decay_of_group)}
        for name, (key, value) in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.setdefault(name, f"{name}: {old} -> {value}")
                group[key] = value
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # The rate of the next step, as LambdaLR would have set it had it run with these settings throughout.
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    return list(changes.values())


# ---------------------------------------------------------------------------------------------
# Agreeing
# ---------------------------------------------------------------------------------------------

def first_process_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """decide() runs on the first process only; every process returns its result, or raises: the first process
    its own error, the others a CheckpointError or ConfigError (as it is) or a CheckpointError saying what
    failed. No process is left waiting for a decision that never comes."""
    outcome: list[Any] = [None]
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except Exception as error:  # noqa: BLE001  (passed on, then raised again below)
            failure = error
            outcome[0] = error if isinstance(error, (CheckpointError, ConfigError)) else CheckpointError(
                f"the first process failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})")
    broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingMetrics:
    """What the run has learned about itself; checkpointed so that history survives a resume."""

    history_length: int = 1000
    loss_history: list[dict[str, float]] = field(default_factory=list)
    """Logged losses: [{"step", "loss"}], the newest history_length of them."""
    learning_rates: list[dict[str, float]] = field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    tokens_seen: int = 0
    shards_skipped: int = 0
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    """The latest validation (eval_loss, eval_perplexity, eval_tokens, eval_step) and the best one so far."""
    best_from_validation: bool = False
    """Set when the run validates: best_loss/best_step then follow the validation loss, not the training loss."""

    def record(self, step: int, loss: float, lr: float) -> None:
        self.loss_history = (self.loss_history + [{"step": step, "loss": loss}])[-self.history_length:]
        self.learning_rates = (self.learning_rates + [{"step": step, "lr": lr}])[-self.history_length:]
        if (not self.best_from_validation and math.isfinite(loss)
                and (self.best_loss is None or loss < self.best_loss)):
            self.best_loss, self.best_step = loss, step

    def record_validation(self, step: int, results: dict[str, Any]) -> None:
        """Stores a validation's results (keys eval_loss, ...); best_loss becomes the best eval_loss."""
        loss = results["eval_loss"]
        best = self.validation_metrics.get("best_eval_loss")
        best_step = self.validation_metrics.get("best_eval_step")
        if math.isfinite(loss) and (best is None or loss < best):
            best, best_step = loss, step
        self.validation_metrics = {**results, "eval_step": step, "best_eval_loss": best, "best_eval_step": best_step}
        if self.best_from_validation and best is not None:
            self.best_loss, self.best_step = best, best_step

    @property
    def current_loss(self) -> float | None:
        return self.loss_history[-1]["loss"] if self.loss_history else None

    def loss_trend(self, window: int = 5) -> str:
        """improving / worsening / flat, from the mean of the last `window` losses against the window before."""
        losses = [entry["loss"] for entry in self.loss_history]
        if len(losses) < 2 * window:
            return "insufficient data"
        recent, before = statistics.fmean(losses[-window:]), statistics.fmean(losses[-2 * window:-window])
        if recent < before * 0.995:
            return "improving"
        if recent > before * 1.005:
            return "worsening"
        return "flat"

    def summary(self, step: int) -> dict[str, Any]:
        """The validation_metrics block of metadata.json: training-loss statistics."""
        losses = [entry["loss"] for entry in self.loss_history]
        return {
            "current_avg_loss": statistics.fmean(losses[-10:]) if losses else None,
            "steps_since_best": (step - self.best_step) if self.best_step is not None else None,
            "loss_trend": self.loss_trend(),
            **self.validation_metrics,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": self.loss_history, "learning_rates": self.learning_rates,
                "best_loss": self.best_loss, "best_step": self.best_step, "tokens_seen": self.tokens_seen,
                "shards_skipped": self.shards_skipped, "validation_metrics": self.validation_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


# ---------------------------------------------------------------------------------------------
# Stop signals
# ---------------------------------------------------------------------------------------------

class StopRequest:
    """First Ctrl+C or SIGTERM: ask the loop to finish its step, save and exit. Second Ctrl+C: exit now.

    Under a launcher (torchrun, accelerate launch: `launcher_pid`), the launcher's death asks the same: the
    workers it leaves behind would otherwise train on unseen, racing the user's next run in the same folder.
    """

    def __init__(self, launcher_pid: int | None = None) -> None:
        self.signal_number: int | None = None
        self.launcher_pid = launcher_pid
        self.launcher_gone = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if self.signal_number is not None and signal_number == signal.SIGINT:
            print("\nSecond interrupt: exiting now without saving.", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.signal_number = signal_number
        print(f"\n{signal.Signals(signal_number).name} received: finishing this step, then saving a checkpoint "
              "(Ctrl+C again to exit at once).", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        if self.launcher_pid is not None and not self.launcher_gone and os.getppid() != self.launcher_pid:
            self.launcher_gone = True  # this process was handed to another parent: the launcher died
            print(f"\nThe launcher (pid {self.launcher_pid}) is gone: finishing this step, then saving a checkpoint.",
                  file=sys.stderr, flush=True)
        return self.signal_number is not None or self.launcher_gone

    @property
    def exit_code(self) -> int:
        """The shell's convention (130 for Ctrl+C, 143 for SIGTERM); 1 when another process was signalled."""
        return 128 + self.signal_number if self.signal_number is not None else 1
