"""TrainingConfig: every knob of a run, loaded from configs/NAME.json (or a JSON path) plus CLI flags.

The JSON files use the original README's key names (max_files, max_steps, per_device_train_batch_size,
save_steps, logging_steps) beside the others. An unknown key or a bad value is a ConfigError whose
message names it in one line.
"""
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from configs.model_config import ModelConfigError, ModelShape, resolve_shape

CONFIG_DIR = Path(__file__).resolve().parent
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")


class ConfigError(ValueError):
    """A config that cannot describe a run; the message is one line naming the key."""


@dataclass
class TrainingConfig:
    # --- what to train -------------------------------------------------------------------------
    model_preset: str = "1.2b"
    """A preset of configs/model_config.py: "1.2b" or "tiny"."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's fields, e.g. {"vocab_size": 32000, "seq_len": 1024}."""

    # --- data ----------------------------------------------------------------------------------
    data: str = "data/sample"
    """Folder holding the training shards (relative paths are taken from the repo root)."""
    shard_pattern: str = "tokenized_*.npz"
    """Glob that picks the shard files inside `data`."""
    max_files: int = -1
    """How many shards to train on, picked by the seeded shuffle; -1 for all."""
    skip_bad_shards: bool = False
    """Log, count and skip an unreadable or invalid shard instead of stopping with an error."""
    seed: int = 1234
    """Seeds model init, shard order and sample order."""
    prefetch_batches: int = 8
    """Micro-batches the background loader prepares ahead of the training loop."""

    # --- optimisation (Pythia-1.4B defaults) ---------------------------------------------------
    max_steps: int = 10000
    """Optimizer steps to train for (one step = accumulation x processes x batch samples)."""
    per_device_train_batch_size: int = 4
    """Samples per micro-batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed into one optimizer step."""
    learning_rate: float = 2e-4
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate x min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear warmup before the cosine decay."""
    lr_decay_steps: int | None = None
    """Length of the schedule in optimizer steps; None uses max_steps. Set it to extend a run with
    --max-steps without changing the learning rates of the steps already taken."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.1
    """Applied to weight matrices only; not to biases, LayerNorms or the input embedding."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    mixed_precision: str = "auto"
    """"auto" = bf16 on a CUDA GPU that supports it (fp16 otherwise), none on CPU; or no/bf16/fp16."""

    # --- checkpoints and logs ------------------------------------------------------------------
    save_steps: int = 500
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on local disk."""
    checkpoint_dir: str = "checkpoints"
    logging_steps: int = 100
    """Write a metrics line (and sync with the GPU) every this many optimizer steps."""
    log_dir: str = "logs"
    loss_history_length: int = 1000
    """Logged losses and learning rates kept in metadata.json."""

    # --- checkpoint uploads --------------------------------------------------------------------
    background_upload: bool = True
    """Upload checkpoints in a background thread; False blocks training during each upload."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                     "keep_checkpoints", "logging_steps", "prefetch_batches", "loss_history_length"):
            positive(name)
        if not isinstance(self.max_files, int) or self.max_files == 0 or self.max_files < -1:
            raise ConfigError(f"max_files must be -1 (all) or a positive integer, got {self.max_files!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.lr_decay_steps is not None:
            positive("lr_decay_steps")
        if self.warmup_steps > self.schedule_steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} exceeds the schedule length {self.schedule_steps}")
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("adam_epsilon", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                              f"got {self.mixed_precision!r}")
        if not self.data:
            raise ConfigError("data must name a folder of shards")
        try:
            self.model_shape()
        except ModelConfigError as error:
            raise ConfigError(str(error)) from None

    @property
    def schedule_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def model_shape(self) -> ModelShape:
        return resolve_shape(self.model_preset, self.model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_path(name_or_path: str) -> Path:
    """configs/NAME.json for a bare name, else the path as given."""
    if name_or_path.endswith(".json") or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"config {name_or_path!r} not found (no file {path}); known configs: {', '.join(known)}")
    return path


def config_from_dict(values: dict[str, Any], source: str) -> TrainingConfig:
    known = {f.name: f for f in fields(TrainingConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    for name, value in values.items():
        if not _type_matches(value, known[name].type):
            raise ConfigError(f"{source}: {name} has the wrong type ({type(value).__name__}: {value!r})")
    try:
        return TrainingConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """The JSON config with CLI overrides (None values are ignored) applied on top."""
    path = config_path(name_or_path)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(values, str(path))


def _type_matches(value: Any, annotation: Any) -> bool:
    """Checks JSON values against the simple annotations TrainingConfig uses."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if value is None:
        return "None" in text
    if isinstance(value, bool):
        return text.startswith("bool")
    if isinstance(value, int):
        return text.startswith(("int", "float"))
    if isinstance(value, float):
        return text.startswith("float")
    if isinstance(value, str):
        return text.startswith("str")
    if isinstance(value, dict):
        return text.startswith("dict")
    return False
