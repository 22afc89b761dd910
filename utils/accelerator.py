"""The Accelerator of a run, set up for speed: precision, torch.compile, FSDP or DDP, TF32, activation
checkpointing, and the logits kept in low precision; and what its processes decide together.

On a GPU a run gets bf16 autocast over fp32 master weights (fp16 on GPUs without bf16 tensor cores), TF32
for the remaining fp32 matmuls, torch.compile after wrapping (so checkpoints keep plain parameter names),
DDP gradients as views into the all-reduce buckets, or FSDP2 when configured.
"""
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
    broadcast_object_list,
)
from torch.distributed.fsdp import MixedPrecisionPolicy

from configs.training_config import TRACKERS, ConfigError, TrainingConfig
from utils.errors import CheckpointError

T = TypeVar("T")


DDP_SETTINGS = DistributedDataParallelKwargs(
    gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets, not beside them: 4 bytes/param less
    bucket_cap_mb=100,  # torchtitan's: fewer, larger all-reduces than the default 25 MB for 1.4B parameters
    broadcast_buffers=False,  # the only buffers are the rotary tables, constants: no broadcast every forward
)
"""How every multi-process run that is not FSDP wraps the model in DistributedDataParallel."""


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's Accelerator; a launch whose processes did not join one group, or FSDP without it, is refused."""
    cuda = torch.cuda.is_available()
    precision = config.mixed_precision
    if precision == "auto":
        # Emulated bf16 (V100, T4: no bf16 tensor cores) would run many times slower than fp16 there.
        precision = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "no"
    if cuda:
        enable_tf32()
    accelerator = Accelerator(
        cpu=not cuda,  # CPU processes under a launcher then join one gloo group instead of each being rank 0
        mixed_precision=precision,
        # Our schedule is a function of the optimizer step; Accelerate would otherwise step it once
        # per process per step, running the schedule N times too fast on N processes.
        step_scheduler_with_optimizer=False,
        log_with=installed_trackers(config.trackers) or None,
        project_dir=config.log_dir,
        # prepare() compiles the model after wrapping it, so checkpoints keep the plain parameter names.
        dynamo_plugin=dynamo_plugin(use_compile(config.compile, cuda), config.fsdp, config.compile_backend),
        fsdp_plugin=fsdp_plugin(config.activation_checkpointing, precision) if config.fsdp else None,
        kwargs_handlers=[
            DDP_SETTINGS,
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout_s)),
        ],
    )
    check_process_group(accelerator.num_processes)
    if config.fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError("fsdp needs CUDA GPUs, and none is visible" if not cuda else
                          "fsdp is set but Accelerate did not enable FSDP; launch on several GPUs with "
                          "`bash run.sh CONFIG` or `accelerate launch`")
    return accelerator


def installed_trackers(names: list[str]) -> list[str]:
    """The configured trackers, each of whose package must be installed: never silently dropped."""
    available = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"trackers: {name} needs its package, which is not installed "
                              f"(pip install {TRACKERS[name]}), or leave it out of trackers")
    return names


def check_process_group(seen_processes: int) -> None:
    """Refuses a launch whose processes did not join one group: each would train alone as rank 0 and
    write the same checkpoints."""
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_processes != seen_processes:
        raise ConfigError(f"launched as {launched_processes} processes but Accelerate sees {seen_processes}; "
                          "each would train alone and overwrite the others' checkpoints")


def use_compile(setting: bool | str, cuda: bool) -> bool:
    """config.compile: "auto" compiles on CUDA only (on CPU the compile time outweighs the gain)."""
    return cuda if setting == "auto" else bool(setting)


def use_fused_adamw(setting: bool | str, accelerator: Accelerator) -> bool:
    """config.fused_adamw: "auto" is on on CUDA, except under fp16: the fused kernel is called even on an overflow
    (it skips inside), so Accelerate could not report a skipped step to hold the schedule back."""
    fp16 = accelerator.mixed_precision == "fp16"
    if setting is True and fp16:  # "auto" precision chose fp16 on this GPU (no bf16 tensor cores)
        raise ConfigError("fused_adamw cannot be true with fp16 (this GPU has no bf16 tensor cores): the fused "
                          'kernel steps even on an overflow; use "auto"')
    return accelerator.device.type == "cuda" and not fp16 if setting == "auto" else bool(setting)


LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # by Accelerate's mixed_precision


def keep_logits_in_low_precision(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Accelerate's mixed precision runs forward under autocast, then copies every bf16/fp16 output to fp32:
    for a causal LM, all the logits (micro-batch x seq x vocab: 4.5 GB at micro-batch 11 of the 1.2b preset),
    made at the memory peak, for a loss that is fp32 already. This keeps the autocast and drops the copy."""
    inner = accelerator.unwrap_model(model, keep_torch_compile=False)
    original = inner.__dict__.get("_original_forward")  # the forward Accelerate wrapped (accelerate 1.15)
    if original is None:  # fp32 training, or FSDP (which casts through its mixed-precision policy)
        return
    dtype = LOW_PRECISION_DTYPES[accelerator.mixed_precision]
    inner.forward = torch.autocast(device_type=accelerator.device.type, dtype=dtype)(original)


def enable_tf32() -> None:
    """fp32 matmuls outside autocast (the optimizer's, the fp32 loss) may use TF32 tensor cores."""
    torch.set_float32_matmul_precision("high")


def dynamo_plugin(compile_model: bool, fsdp: bool, backend: str) -> TorchDynamoPlugin:
    """How Accelerate compiles the model in prepare(), after wrapping it, so checkpoints keep plain names.

    Under FSDP each transformer layer is compiled in place (Accelerate's regional compilation), so that
    FSDP's per-layer hooks keep firing. The backend is always given so that a launcher's
    ACCELERATE_DYNAMO_BACKEND cannot silently change the run.
    """
    if not compile_model:
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=backend, mode="default", use_regional_compilation=fsdp)


def fsdp_plugin(activation_checkpointing: bool, mixed_precision: str) -> FullyShardedDataParallelPlugin:
    """FSDP2 full sharding of weights, gradients and optimizer state, one unit per transformer layer.

    Checkpoints are saved sharded (each process writes its part; no gather of the full model on one
    GPU) and Accelerate reshards them on load. Activation checkpointing is applied here per layer rather
    than through Hugging Face, as FSDP needs it inside its wrapping. Mixed precision: layers compute in
    bf16/fp16 from fp32 sharded weights, and gradients are reduced in fp32 (Accelerate's default policy
    would reduce them in bf16, less exact than DDP's fp32 all-reduce).
    """
    low_precision = LOW_PRECISION_DTYPES.get(mixed_precision)
    # output_dtype stays unset: the model's loss is fp32, and casting it would round every logged loss.
    policy = None if low_precision is None else MixedPrecisionPolicy(param_dtype=low_precision,
                                                                     reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["GPTNeoXLayer"],
        state_dict_type="SHARDED_STATE_DICT",
        activation_checkpointing=activation_checkpointing,
        mixed_precision_policy=policy,
    )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each layer's input in forward and recompute the layer in backward (non-reentrant,
    which works with torch.compile and DDP)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
