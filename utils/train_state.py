"""The state of a run between optimizer steps, besides what Accelerate holds (model, optimizer, schedule, RNG):
the step, the position in the data stream and the metrics, as one object with state_dict() and
load_state_dict(), like torchtitan's Trainer state or litgpt's `state` dict."""
from dataclasses import dataclass, field
from typing import Any

from utils.checkpoint_utils import checkpoint_name
from utils.data_utils import DataPosition, StreamSpec, data_state, position_from_state
from utils.metrics import TrainingMetrics


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
