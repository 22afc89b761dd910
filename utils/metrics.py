"""TrainingMetrics: what a run has learned about itself (logged losses and rates, the best loss, tokens
seen), checkpointed as training_metrics.json so that the history survives a resume. Plain Python, so the
viewer and the monitor read it without importing torch."""
import math
import statistics
from dataclasses import dataclass, field
from typing import Any


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
