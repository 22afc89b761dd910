"""The state of a run between optimizer steps, besides what Accelerate holds (model, optimizer, schedule, RNG): the
step, the position in the data stream and the metrics, as one object with state_dict() and load_state_dict(), like
torchtitan's Trainer state or litgpt's `state` dict; and what a checkpoint records of it (metadata.json,
training_metrics.json). No torch: the viewer and the monitor read checkpoints with it."""
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils.checkpoints.folders import checkpoint_name
from utils.data.order import DataPosition, StreamSpec, data_state, position_from_state
from utils.errors import CheckpointError
from utils.files import read_json


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
    validation_history: list[dict[str, float]] = field(default_factory=list)
    """Every validation: [{"step", "eval_loss", "eval_perplexity"}], the newest history_length of them."""
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
        entry = {"step": step, "eval_loss": loss, "eval_perplexity": results["eval_perplexity"]}
        self.validation_history = (self.validation_history + [entry])[-self.history_length:]
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
        """The saved metrics. record() and record_validation() make new lists rather than change these, so the
        dict stays as it is while a background write serialises it and the loop goes on."""
        return {"loss_history": self.loss_history, "learning_rates": self.learning_rates,
                "best_loss": self.best_loss, "best_step": self.best_step, "tokens_seen": self.tokens_seen,
                "shards_skipped": self.shards_skipped, "validation_metrics": self.validation_metrics,
                "validation_history": self.validation_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


@dataclass
class TrainState:
    spec: StreamSpec
    """The data stream the position belongs to: a saved position is only valid for the same stream."""
    metrics: TrainingMetrics
    step: int = 0
    """Optimizer steps taken."""
    position: DataPosition = field(default_factory=DataPosition)
    """The next unread sample of the stream."""

    def advance(self, position: DataPosition, tokens: int) -> None:
        """One optimizer step done: the data read up to `position`, `tokens` more trained on."""
        self.step += 1
        self.position = position
        self.metrics.tokens_seen += tokens
        self.metrics.shards_skipped = position.shards_skipped

    @property
    def files_consumed(self) -> int:
        return self.position.files_consumed(len(self.spec.shards))

    @property
    def checkpoint_name(self) -> str:
        """The name a checkpoint of this state gets: checkpoint-epoch{E}-step{S}-files{F}."""
        return checkpoint_name(self.position.epoch, self.step, self.files_consumed)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": data_state(self.spec, self.position), "metrics": self.metrics.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restores a saved state; a data position of another stream is a DataError naming `source`."""
        self.position = position_from_state(self.spec, state["data"], source)
        self.step = state["step"]
        self.metrics.load_state_dict(state["metrics"])


def build_metadata(step: int, epoch: int, files_processed: int, tokens_seen: int, metrics: dict[str, Any],
                   summary: dict[str, Any], system: dict[str, Any], history_shown: int = 10) -> dict[str, Any]:
    """metadata.json: the fields of the original README's "Enhanced Metadata", plus tokens seen."""
    return {
        "step": step,
        "epoch": epoch,
        "current_loss": metrics["loss_history"][-1]["loss"] if metrics["loss_history"] else None,
        "best_loss": metrics["best_loss"],
        "loss_history": [entry["loss"] for entry in metrics["loss_history"][-history_shown:]],
        "learning_rates": [entry["lr"] for entry in metrics["learning_rates"][-history_shown:]],
        "validation_metrics": summary,
        "training_progress": {
            "completed_steps": step,
            "total_epochs": epoch,
            "files_processed": files_processed,
            "tokens_seen": tokens_seen,
        },
        "system_info": system,
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }


def read_state_files(checkpoint: Path) -> dict[str, Any]:
    """The TrainState.state_dict() saved in a checkpoint's JSON files."""
    metadata = read_json(checkpoint / "metadata.json")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("step"), int):
        raise CheckpointError(f"{checkpoint / 'metadata.json'}: not a checkpoint's metadata (no integer 'step')")
    return {"step": metadata["step"], "data": read_json(checkpoint / "data_state.json"),
            "metrics": read_json(checkpoint / "training_metrics.json")}
