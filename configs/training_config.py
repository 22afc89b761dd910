"""TrainingConfig: every knob of a run, loaded from configs/NAME.json (or a JSON path) plus CLI flags.

The JSON files use the original README's key names (max_files, max_steps, per_device_train_batch_size,
save_steps, logging_steps) beside the others. An unknown key or a bad value is a ConfigError whose
message names it in one line.
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from configs.model_config import INIT_METHODS, ModelConfigError, ModelShape, resolve_shape

CONFIG_DIR = Path(__file__).resolve().parent
REPO_ROOT = CONFIG_DIR.parent
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
EXPORT_DTYPES = ("bf16", "fp32")
COMPILE_BACKENDS = ("inductor", "aot_eager")
FILES_FORMAT = "files"
ARCHIVE_FORMATS = (FILES_FORMAT, "tar.zst", "tar", "tar.gz")
"""How checkpoints go to the upload destination: files (one object per file, uploaded by several streams), tar (no
compression, fastest), tar.zst (zstd), tar.gz (the original; gzip is slow on one core)."""
FILES_STREAMS = 16
"""Default concurrent transfers for one checkpoint of the files layout: sized for a GPU VM's network (one stream
to GCS reaches about 100-200 MB/s; a 17 GB checkpoint every 80 s needs over 200 MB/s)."""
MAX_PROCESS_GROUP_TIMEOUT_S = 7 * 24 * 3600
"""torch.distributed keeps timeouts in milliseconds in a C int (24 days); no collective should wait a week."""
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
"""Accelerate's trackers, by name, and the package each needs."""
PATH_FIELDS = ("data", "checkpoint_dir", "log_dir", "cache_dir", "eval_data", "tokenizer", "export_hf_dir",
               "upload_destination")
"""Fields that may name a local path (or a gs:// URL)."""


class ConfigError(ValueError):
    """A config that cannot describe a run; the message is one line naming the key."""


@dataclass
class TrainingConfig:
    # --- what to train -------------------------------------------------------------------------
    model_preset: str = "1.2b"
    """A preset of configs/model_config.py: "1.2b" or "tiny"."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's fields, e.g. {"vocab_size": 32000, "seq_len": 1024}."""
    init: str = "pythia"
    """How a fresh model's weights are drawn (a resumed run loads them): "pythia" = gpt-neox's small_init,
    N(0, sqrt(2/(5 d))), for every weight and wang_init, N(0, 2/(L sqrt(d))), for attention.dense and
    mlp.dense_4h_to_h, as Pythia was trained; "hf" = Hugging Face's N(0, 0.02) for every weight."""

    # --- data ----------------------------------------------------------------------------------
    data: str = "data/sample"
    """Folder holding the training shards (relative paths are taken from the repo root), or gs://BUCKET[/PREFIX]
    to stream them from Google Cloud Storage through cache_dir."""
    shard_pattern: str = "tokenized_*.npz"
    """Glob that picks the shard files inside `data`."""
    max_files: int = -1
    """How many shards to train on, picked by the seeded shuffle; -1 for all."""
    skip_bad_shards: bool = False
    """Log, count and skip an unreadable or invalid shard instead of stopping with an error."""
    seed: int = 1234
    """Seeds model init, shard order and sample order."""
    shuffle_window_shards: int = 16
    """Shards whose samples are shuffled together, so that each batch mixes many shards: every epoch's seeded
    shard order is cut into windows of at most this many shards (one window of all of them when there are
    fewer), and a window's samples are read in a seeded random order. Memory: each process holds the tokens of
    one window in RAM (4 bytes per token, e.g. 16 shards of 10M tokens: 640 MB per process), and with gs:// data
    the next window's shards are downloaded into cache_dir meanwhile (as far as cache_max_gb allows). 1 reads
    the shards one after another, each shuffled alone. A run must keep its value to resume."""
    mix_whole_dataset: bool | str = "auto"
    """Every window draws from the whole dataset: each of the S windows of an epoch takes a seeded 1/S of every
    shard's samples (shuffle_window_shards shards' worth, the same memory), so that no window brings content the
    model has not seen, and each shard is read S times an epoch. false: windows of whole shards. "auto": true for
    a local folder, and for gs:// data when the selected shards fit cache_max_gb (else every window would
    download them again); a resumed run keeps the order it began with. A run must keep its value to resume."""
    pad_token_id: int | None = None
    """Padding id of shards whose 2-D input_ids rows come with neither attention_mask nor sequence_lengths: its
    trailing run is dropped from each row. None refuses such shards (their padding would be trained on)."""
    prefetch_batches: int = 8
    """Micro-batches the background loader prepares ahead of the training loop."""
    prefetch_shards: int = 4
    """Shards downloaded ahead of the one being read when data is gs:// (0: download each when needed)."""
    cache_dir: str = "cache"
    """Local folder for shards downloaded from gs:// (one subfolder per bucket/prefix; relative paths are
    taken from the repo root). Shared by all processes of a machine: each shard is downloaded once."""
    cache_max_gb: float = 20.0
    """Size limit of the shard cache in GB; consumed shards are evicted, oldest first, to stay under it."""
    gcs_credentials: str | None = None
    """Service-account key JSON for gs:// access; None uses Application Default Credentials when there are
    some, else anonymous access (public buckets only)."""

    # --- optimisation (Pythia-1.4B defaults) ---------------------------------------------------
    max_steps: int = 10000
    """Optimizer steps to train for (one step = global_batch_size samples)."""
    global_batch_size: int | None = None
    """Samples per optimizer step, all processes together: the recipe's batch, the same on 1 GPU or 8 (gradient
    accumulation makes up the difference: global_batch_size / (per_device_train_batch_size x processes)
    micro-batches a step, which must divide). null: per_device_train_batch_size x gradient_accumulation_steps x
    processes, a batch that changes with the number of GPUs."""
    per_device_train_batch_size: int | str = 4
    """Samples per micro-batch on each process. "auto" (with global_batch_size): the largest that shares the
    global batch evenly over the processes and that the memory preflight says fits, said at start."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches summed into one optimizer step on each process, when global_batch_size is null (null: 1);
    set one of the two."""
    accept_new_global_batch: bool = False
    """Resume a checkpoint trained with another global batch (refused otherwise: the same steps would then see
    another number of samples)."""
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

    # --- speed and memory (utils/performance.py) -----------------------------------------------
    compile: bool | str = "auto"
    """torch.compile the model: "auto" = on CUDA only (on CPU compiling costs more than it saves), or true/false."""
    compile_backend: str = "inductor"
    """torch.compile's backend when compile is on: "inductor" generates fused kernels (the fast path);
    "aot_eager" traces and differentiates the model as inductor does but runs the graph with eager kernels, in
    seconds instead of minutes on a CPU (the tests of the compiled path use it; no speed gain)."""
    fused_adamw: bool | str = "auto"
    """AdamW's fused kernel (one kernel over all parameters instead of a loop of small ones): "auto" = on CUDA
    unless mixed_precision is fp16 (whose loss scaler must see a skipped step to hold the schedule back), or
    true/false (true works on CPU too, not with fp16)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them: about a third more compute for
    much less activation memory (a larger micro-batch, or a model that does not fit otherwise)."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state across the GPUs (FSDP2 through Accelerate), for runs whose
    optimizer state does not fit one GPU. CUDA only; checkpoints are then saved sharded."""
    process_group_timeout_s: float = 3600.0
    """How long a process waits at a collective for the others (NCCL's watchdog otherwise stops a run after 10
    minutes): long enough for the first process's long work while the others wait, such as the resume download
    of a 17 GB checkpoint or a synchronous upload."""
    memory_preflight: bool = True
    """Before building the model, estimate the memory it needs and stop with advice if it cannot fit
    (--skip-preflight turns this off)."""
    peak_tflops: float | None = None
    """The device's dense bf16 peak in TFLOP/s, for MFU; None looks it up by GPU name (H100, H200, A100). MFU is
    logged as null on devices the table does not know (and on CPU) unless this is set."""

    # --- checkpoints and logs ------------------------------------------------------------------
    save_steps: int = 500
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    save_every_minutes: float | None = None
    """Save a checkpoint every this many minutes instead of every save_steps steps (and always at the end): on
    a preemptible machine, at most this much work is at risk. The main process's clock decides, and every
    process saves at the same step (agreed one step later)."""
    async_save: bool | str = "auto"
    """Write checkpoints in the background: the loop waits only while the state is copied into host memory
    (pinned buffers of the state's size, ~17 GB for the 1.2b preset, on the main process; with fsdp each process
    holds its shards' share, written by torch.distributed.checkpoint's async_save), then trains on while a thread
    writes the same files. "auto" = on CUDA; false writes synchronously."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on local disk."""
    allow_unverified_checkpoints: bool = False
    """Resume a checkpoint without checksums.json (saved by an earlier version, or one that lost the file): its files
    are then not verified, so a damaged one is trained on (they are still read only as data: safetensors, JSON,
    torch.load(weights_only=True)). False refuses such a checkpoint in one line."""
    checkpoint_dir: str = "checkpoints"
    logging_steps: int = 100
    """Write a metrics line (and sync with the GPU) every this many optimizer steps."""
    log_dir: str = "logs"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the metrics of every logging step go besides metrics.jsonl: any of Accelerate's trackers
    (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio) whose package is installed;
    [] for metrics.jsonl only. Each gets the resolved config as its hyperparameters."""
    project_name: str = "refocused-ai"
    """The trackers' project (wandb's and mlflow's project, TensorBoard's subfolder of log_dir)."""
    loss_history_length: int = 1000
    """Logged losses and learning rates kept in metadata.json."""

    # --- validation ----------------------------------------------------------------------------
    eval_data: str | None = None
    """Folder (or gs://BUCKET/PREFIX, read through cache_dir) of held-out shards matching shard_pattern to
    validate on; None for none."""
    eval_holdout_files: int = 0
    """Validate on this many shards taken out of the selected training shards by a seeded pick; 0 for none.
    This changes the training shard list, so a run cannot resume with a different value."""
    eval_steps: int = 500
    """Validate every this many optimizer steps, and at the end (when eval_data or eval_holdout_files is set)."""
    eval_batches: int = 50
    """Micro-batches per process in each validation: the first ones of the held-out data, the same every time."""

    # --- tokenizer and export ------------------------------------------------------------------
    tokenizer: str | None = None
    """The run's tokenizer.json, copied into each checkpoint; None uses tokenizer.json beside the shards (in the
    data folder, or fetched from the gs:// prefix) if there is one."""
    export_hf_dir: str | None = None
    """At the end of training, export the final checkpoint as a Hugging Face model folder here (replacing an
    earlier export there); None for no export."""
    export_dtype: str = "bf16"
    """Weight dtype of the automatic export: bf16 or fp32."""

    # --- checkpoint uploads --------------------------------------------------------------------
    background_upload: bool = True
    """Upload checkpoints in a background thread; False blocks training during each upload."""
    upload_destination: str | None = None
    """Where each checkpoint is uploaded (files layout: <name>/<file> objects and <name>.files.json; archives:
    <name>.<archive_format>): gs://BUCKET/PREFIX or a local folder (relative paths are taken from the repo
    root); None uploads nothing. While uploads are on, a checkpoint is deleted locally only once its upload is
    verified and still there. --resume also finds checkpoints here."""
    archive_format: str = FILES_FORMAT
    """files (each file its own object, large ones in parts, upload_streams at once; <name>.files.json written
    last marks it complete), tar.zst (one archive, one stream; zstd level 1, ~7% smaller for float32 weights),
    tar (one archive, no compression) or tar.gz (the original format; gzip runs at ~30 MB/s on one core).
    Checkpoints in any of these formats at the destination are read back (resume, export, listings)."""
    upload_streams: int = FILES_STREAMS
    """Concurrent transfers (file parts) for the upload of one checkpoint in the files layout; one stream to GCS
    carries roughly 100-200 MB/s, and each holds a 16 MB chunk in memory while it is sent."""
    upload_workers: int = 1
    """Background upload threads; each archives and uploads one checkpoint at a time."""
    upload_attempts: int = 5
    """Tries per upload (exponential backoff between them) before it is recorded as failed."""
    upload_timeout_s: float = 3600.0
    """At the end of a run (also after Ctrl+C or SIGTERM), how long to wait for queued uploads; what is left
    stays recorded in checkpoint_dir/uploads.json for the next run or scripts/upload_manager.py."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A ConfigError naming the first field that cannot describe a run, checked in the order of the fields."""
        for item in fields(self):  # NaN passes every comparison below, and infinity most of them
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{item.name} must be a finite number, got {value!r}")
        self._check_steps()
        self._check_optimizer()
        self._check_speed()
        self._check_data()
        self._check_outputs()
        self._check_model()

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def _check_steps(self) -> None:
        for name in ("max_steps", "save_steps", "keep_checkpoints", "logging_steps", "prefetch_batches",
                     "loss_history_length"):
            self._positive(name)
        if self.per_device_train_batch_size == "auto":
            if self.global_batch_size is None:
                raise ConfigError('per_device_train_batch_size "auto" needs global_batch_size: the batch a step '
                                  "keeps while the micro-batch follows the GPU's memory")
        else:
            self._positive("per_device_train_batch_size")
        for name in ("global_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) is not None:
                self._positive(name)
        if self.global_batch_size is not None and self.gradient_accumulation_steps is not None:
            raise ConfigError("set global_batch_size (samples per step, all processes together) or "
                              "gradient_accumulation_steps (micro-batches per process), not both")
        if not isinstance(self.max_files, int) or self.max_files == 0 or self.max_files < -1:
            raise ConfigError(f"max_files must be -1 (all) or a positive integer, got {self.max_files!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.lr_decay_steps is not None:
            self._positive("lr_decay_steps")
            if self.warmup_steps > self.lr_decay_steps:
                raise ConfigError(f"warmup_steps {self.warmup_steps} exceeds lr_decay_steps {self.lr_decay_steps}")
        # Without lr_decay_steps, a run shorter than its warmup (a smoke test with --max-steps 10) just
        # stops while the learning rate is still rising.

    def _check_optimizer(self) -> None:
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate <= 1:
            raise ConfigError(f"learning_rate must be in (0, 1] (AdamW moves each weight by about learning_rate a "
                              f"step), got {self.learning_rate!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("adam_epsilon", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.adam_epsilon < 1:  # 0: a parameter whose gradient is 0 (an unused token) turns NaN
            raise ConfigError(f"adam_epsilon must be in (0, 1) (it guards AdamW's division by the gradient's scale), "
                              f"got {self.adam_epsilon!r}")
        if self.learning_rate * self.weight_decay >= 1:  # each step multiplies every weight by 1 - lr * wd
            raise ConfigError(f"weight_decay {self.weight_decay!r} times learning_rate {self.learning_rate!r} must be "
                              "below 1, or every step would flip or zero the weights")

    def _check_speed(self) -> None:
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                              f"got {self.mixed_precision!r}")
        if self.async_save not in ("auto", True, False):
            raise ConfigError(f'async_save must be "auto", true or false, got {self.async_save!r}')
        if self.save_every_minutes is not None and (isinstance(self.save_every_minutes, bool)
                                                    or not 0 < self.save_every_minutes < math.inf):
            raise ConfigError(f"save_every_minutes must be a positive number of minutes or null, "
                              f"got {self.save_every_minutes!r}")
        if self.compile not in ("auto", True, False):
            raise ConfigError(f'compile must be "auto", true or false, got {self.compile!r}')
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                              f"got {self.compile_backend!r}")
        if self.fused_adamw not in ("auto", True, False):
            raise ConfigError(f'fused_adamw must be "auto", true or false, got {self.fused_adamw!r}')
        if self.fused_adamw is True and self.mixed_precision == "fp16":
            raise ConfigError("fused_adamw cannot be true with fp16: the fused kernel steps even on an overflow, so "
                              "the learning-rate schedule could not wait for a skipped step; use \"auto\"")
        if self.peak_tflops is not None and (isinstance(self.peak_tflops, bool) or not self.peak_tflops > 0):
            raise ConfigError(f"peak_tflops must be a positive number of TFLOP/s, got {self.peak_tflops!r}")

    def _check_data(self) -> None:
        if not self.data:
            raise ConfigError("data must name a folder of shards or a gs:// URL")
        if self.data.startswith("gs://") and not self.data[len("gs://"):].strip("/"):
            raise ConfigError(f"data {self.data!r} names no bucket (expected gs://BUCKET or gs://BUCKET/PREFIX)")
        self._positive("shuffle_window_shards")
        if self.mix_whole_dataset not in ("auto", True, False):
            raise ConfigError(f'mix_whole_dataset must be "auto", true or false, got {self.mix_whole_dataset!r}')
        if not isinstance(self.prefetch_shards, int) or isinstance(self.prefetch_shards, bool) \
                or self.prefetch_shards < 0:
            raise ConfigError(f"prefetch_shards must be a non-negative integer, got {self.prefetch_shards!r}")
        if not isinstance(self.cache_max_gb, (int, float)) or self.cache_max_gb <= 0:
            raise ConfigError(f"cache_max_gb must be positive, got {self.cache_max_gb!r}")
        if not self.cache_dir:
            raise ConfigError("cache_dir must name a folder")
        for name in ("eval_steps", "eval_batches"):
            self._positive(name)
        if not isinstance(self.eval_holdout_files, int) or self.eval_holdout_files < 0:
            raise ConfigError(f"eval_holdout_files must be a non-negative integer, got {self.eval_holdout_files!r}")
        if self.eval_holdout_files and self.eval_data is not None:
            raise ConfigError("set either eval_data or eval_holdout_files, not both")

    def _check_outputs(self) -> None:
        if not isinstance(self.trackers, list) or not all(isinstance(name, str) for name in self.trackers):
            raise ConfigError(f"trackers must be a list of tracker names, got {self.trackers!r}")
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"trackers: unknown {', '.join(unknown)}; known: {', '.join(TRACKERS)}")
        if not self.project_name or "/" in self.project_name:
            raise ConfigError(f"project_name must be a name without '/', got {self.project_name!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.archive_format not in ARCHIVE_FORMATS:
            raise ConfigError(f"archive_format must be one of {', '.join(ARCHIVE_FORMATS)}, got {self.archive_format!r}")
        for name in ("upload_workers", "upload_attempts", "upload_streams"):
            self._positive(name)
        if not 0 < self.process_group_timeout_s <= MAX_PROCESS_GROUP_TIMEOUT_S:
            raise ConfigError(f"process_group_timeout_s must be in (0, {MAX_PROCESS_GROUP_TIMEOUT_S}] (a week), "
                              f"got {self.process_group_timeout_s!r}")
        if not isinstance(self.upload_timeout_s, (int, float)) or self.upload_timeout_s < 0:
            raise ConfigError(f"upload_timeout_s must be >= 0, got {self.upload_timeout_s!r}")
        if self.upload_destination is not None and not self.upload_destination.strip("/"):
            raise ConfigError("upload_destination must name a gs:// URL or a folder (or be null for no uploads)")
        if self.upload_destination is not None and self.upload_destination.startswith("gs://") \
                and not self.upload_destination[len("gs://"):].strip("/"):
            raise ConfigError(f"upload_destination {self.upload_destination!r} names no bucket")

    def _check_model(self) -> None:
        try:
            vocab_size = self.model_shape().vocab_size
        except ModelConfigError as error:
            raise ConfigError(str(error)) from None
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < vocab_size):
            raise ConfigError(f"pad_token_id must be null or a token id below vocab_size {vocab_size}, "
                              f"got {self.pad_token_id!r}")

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per optimizer step on each of `num_processes` processes: the global batch's share, or
        gradient_accumulation_steps. A global batch they cannot share evenly is a ConfigError naming what would."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_pass = self.per_device_train_batch_size * num_processes
        steps, rest = divmod(self.global_batch_size, per_pass)
        if rest == 0:
            return steps
        nearest = [value for value in (steps * per_pass, (steps + 1) * per_pass) if value > 0]
        divisors = [size for size in self.micro_batches_sharing(num_processes)
                    if size <= self.per_device_train_batch_size][:1]
        micro = (f", or per_device_train_batch_size {divisors[0]}" if divisors else "")
        raise ConfigError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                          f"per_device_train_batch_size {self.per_device_train_batch_size} x {num_processes} "
                          f"process(es) = {per_pass}: use global_batch_size {' or '.join(map(str, nearest))}{micro}")

    def micro_batches_sharing(self, num_processes: int) -> list[int]:
        """The micro-batches, largest first, that share global_batch_size evenly over `num_processes`."""
        assert self.global_batch_size is not None
        return [size for size in range(self.global_batch_size // num_processes, 0, -1)
                if self.global_batch_size % (size * num_processes) == 0]

    def global_batch(self, num_processes: int) -> int:
        """Samples per optimizer step on `num_processes` processes."""
        return self.per_device_train_batch_size * self.accumulation(num_processes) * num_processes

    @property
    def schedule_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def model_shape(self) -> ModelShape:
        return resolve_shape(self.model_preset, self.model)

    @property
    def validation_enabled(self) -> bool:
        return self.eval_data is not None or self.eval_holdout_files > 0

    def tokenizer_path(self) -> Path | None:
        """The run's tokenizer.json: the `tokenizer` field (which must exist), else the data folder's, else None."""
        if self.tokenizer is not None:
            if not Path(self.tokenizer).is_file():
                raise ConfigError(f"tokenizer {self.tokenizer} is not a file")
            return Path(self.tokenizer)
        beside_shards = Path(self.data) / "tokenizer.json"
        return beside_shards if beside_shards.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_repo_paths(self) -> "TrainingConfig":
        """This config with its relative local paths taken from the repository root (absolute paths and gs://
        URLs as they are): a config file names the same folders wherever a command runs."""
        return replace(self, **{name: str(REPO_ROOT / value) for name in PATH_FIELDS
                                if (value := getattr(self, name)) is not None and not value.startswith("gs://")})


def path_from_here(path: str | None) -> str | None:
    """A path typed on the command line is relative to where the command runs, as in any shell tool: made
    absolute before it joins a config, whose own relative paths are taken from the repository root."""
    return path if path is None or path.startswith("gs://") else str(Path(path).absolute())


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


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None,
                settings: dict[str, Any] | None = None) -> TrainingConfig:
    """The JSON config with CLI overrides applied on top: `overrides` from flags (None values are flags not
    given), then `settings` from --set KEY=VALUE (None is a value there; "model.FIELD" keys change one field
    of the model shape)."""
    path = config_path(name_or_path)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    given = {key: value for key, value in (overrides or {}).items() if value is not None} | (settings or {})
    for key, value in given.items():
        if key.startswith("model."):
            if not isinstance(values.get("model", {}), dict):
                raise ConfigError(f"{path}: model must be a JSON object, got {values['model']!r}")
            values["model"] = {**values.get("model", {}), key[len("model."):]: value}
        else:
            values[key] = value
    # An error may come from a command-line value, so the message names those too.
    source = str(path) + (f" with {', '.join(f'{k}={v}' for k, v in given.items())} from the command line"
                          if given else "")
    return config_from_dict(values, source)


def _type_matches(value: Any, annotation: Any) -> bool:
    """Checks JSON values against the simple annotations TrainingConfig uses."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if " | " in text:  # a union such as "bool | str": any member may match
        return any(_type_matches(value, member) for member in text.split(" | "))
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
    if isinstance(value, list):
        return text.startswith("list")
    return False
