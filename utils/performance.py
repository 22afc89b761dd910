"""Speed and scale: FLOPs and MFU, the memory preflight, and the one line that says what a run does for speed.

MFU (model FLOPs utilisation) follows PaLM appendix B: a trained token costs 6*N + 12*L*H*Q*T FLOPs,
N the parameters without the input embedding (a lookup, not a matmul), L layers, H*Q = hidden size,
T the sequence length. Recomputation by activation checkpointing is not counted: MFU measures the
model's work, not the hardware's.

The preflight estimates, before the model is built, the bytes one process needs: fp32 weights,
gradients and AdamW state (16 bytes per parameter, divided across processes by FSDP), the bf16 weight
copies autocast keeps, and activations. The activation model is Korthikanti et al. 2022 ("Reducing
activation recomputation", section 4) without dropout and with flash attention (no s x s scores
stored), plus the fp32 logits and their gradient. For the 1.2b preset at micro-batch 8 it gives
58.2 GiB; the anchor benchmark measured 58 GiB on an H200 (eager; compiled runs need a little less).
"""
import os
from dataclasses import dataclass, replace

import psutil
import torch
from accelerate import Accelerator

from configs.model_config import ModelShape, padded_vocab_size
from configs.training_config import ConfigError, TrainingConfig
from utils.accelerator import use_compile, use_fused_adamw

GIB = 2**30

# Dense bf16 tensor-core peaks per GPU, TFLOP/s, from the vendors' data sheets. More specific names first:
# "NVIDIA H100 PCIe" must not match the SXM entry "H100".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)

# Activations a layer keeps per token, in elements of hidden size: Korthikanti et al.'s 34 bytes per
# token x hidden in bf16. Without dropout their count is ~16, but Hugging Face's GPT-NeoX keeps a few
# more copies (rotary, fp32 LayerNorm outputs); 17 matches the measured peak.
ACTIVATION_ELEMENTS_PER_LAYER = 17
# Bytes per logit held at the peak of backward: bf16 logits, their fp32 copy, log-softmax, gradient.
LOGIT_BYTES = 12
# CUDA context, cuBLAS workspaces and NCCL buffers, and the share the caching allocator loses to
# fragmentation: the usable part of a GPU is CUDA_USABLE_FRACTION of it less CUDA_RESERVED_BYTES.
CUDA_USABLE_FRACTION = 0.95
CUDA_RESERVED_BYTES = 1 * GIB
# On CPU the estimate is held against available RAM, of which the OS and data loader need some.
CPU_USABLE_FRACTION = 0.9
# FSDP suggestions consider sharding over up to this many GPUs.
MAX_FSDP_GPUS = 64


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParameterCount:
    total: int
    input_embedding: int
    per_layer: int
    in_matmuls: int
    """The N of 6*N: all but the input embedding, which is a lookup. Tied embeddings are counted once, as
    the output projection they also are."""


def count_parameters(shape: ModelShape) -> ParameterCount:
    """GPT-NeoX parameter count from the shape alone (the preflight runs before the model exists)."""
    h, f = shape.hidden_size, shape.intermediate_size
    embedding = padded_vocab_size(shape.vocab_size) * h
    per_layer = (2 * 2 * h            # two LayerNorms, weight and bias
                 + 3 * h * h + 3 * h  # query_key_value
                 + h * h + h          # attention output
                 + h * f + f          # dense_h_to_4h
                 + f * h + h)         # dense_4h_to_h
    final_norm = 2 * h
    lm_head = 0 if shape.tie_word_embeddings else embedding
    total = embedding + shape.num_hidden_layers * per_layer + final_norm + lm_head
    return ParameterCount(total, embedding, per_layer, in_matmuls=total - embedding + (embedding - lm_head))


def flops_per_token(shape: ModelShape) -> int:
    """Training FLOPs per token: 6*N + 12*L*hidden*seq_len (PaLM appendix B)."""
    n = count_parameters(shape).in_matmuls
    return 6 * n + 12 * shape.num_hidden_layers * shape.hidden_size * shape.seq_len


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name, or None when the table does not know it."""
    folded = device_name.lower()
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in folded:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class MfuMeter:
    """Turns the run's tokens/s (all processes together) into MFU."""

    flops_per_token: int
    peak_flops_per_process: float | None
    """None when the device's peak is unknown: MFU is then not reported."""
    num_processes: int

    def mfu(self, tokens_per_sec: float) -> float | None:
        if self.peak_flops_per_process is None:
            return None
        return tokens_per_sec * self.flops_per_token / (self.peak_flops_per_process * self.num_processes)


def window_peak_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory PyTorch's tensors held since the previous call (one logging window), in GiB;
    None on the CPU. It reads and resets the caching allocator's counters on the host: no wait for the GPU.
    Tensors only: the allocator's cache and the CUDA context come on top (nvidia-smi shows those too)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def make_mfu_meter(shape: ModelShape, device: torch.device, num_processes: int,
                   peak_tflops: float | None) -> MfuMeter:
    """peak_tflops (the --peak-tflops flag) wins over the table; the CPU has no table entry."""
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = peak_tflops_for(device_name(device))
    return MfuMeter(flops_per_token(shape), peak_tflops * 1e12 if peak_tflops else None, num_processes)


# ---------------------------------------------------------------------------------------------
# Memory preflight
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    """What one process holds: the knobs of a run that change its memory."""

    micro_batch: int
    mixed_precision: bool
    """bf16/fp16 autocast over fp32 master weights (Accelerate's mixed precision)."""
    activation_checkpointing: bool
    shards: int
    """Processes the weights, gradients and optimizer state are sharded over (FSDP); 1 without FSDP."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations)))
        return f"{self.total / GIB:.1f} GiB ({parts})"


def estimate_memory(shape: ModelShape, plan: MemoryPlan) -> MemoryEstimate:
    """Bytes one training process needs at its peak (the start of backward)."""
    params = count_parameters(shape)
    h, layers = shape.hidden_size, shape.num_hidden_layers
    tokens = plan.micro_batch * shape.seq_len
    element = 2 if plan.mixed_precision else 4
    weights = 4 * params.total // plan.shards
    if plan.mixed_precision:
        # Autocast caches a bf16 copy of every matmul weight for the backward pass (under FSDP only
        # the gathered layers hold one, which the per-layer term below covers).
        weights += 2 * params.in_matmuls // plan.shards
    if plan.shards > 1:
        # FSDP gathers the current and the prefetched layer in full, forward and backward.
        weights += 2 * 2 * params.per_layer * element
    layer_activations = ACTIVATION_ELEMENTS_PER_LAYER * tokens * h * element
    if plan.activation_checkpointing:
        # Each layer keeps only its fp32 input; one layer at a time is recomputed in full.
        activations = layers * tokens * h * 4 + layer_activations
    else:
        activations = layers * layer_activations
    activations += tokens * padded_vocab_size(shape.vocab_size) * LOGIT_BYTES
    return MemoryEstimate(weights, 4 * params.total // plan.shards, 8 * params.total // plan.shards, activations)


def usable_memory(device: torch.device, local_processes: int) -> tuple[int, str]:
    """Bytes one process may plan to use, and the device in words for the message."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * CUDA_USABLE_FRACTION) - CUDA_RESERVED_BYTES, f"{device_name(device)} ({total / GIB:.0f} GiB)"
    available = psutil.virtual_memory().available
    usable = int(available * CPU_USABLE_FRACTION) // local_processes
    share = f", shared by {local_processes} processes" if local_processes > 1 else ""
    return usable, f"this machine's {available / GIB:.0f} GiB of available RAM{share}"


def suggestions(shape: ModelShape, plan: MemoryPlan, preset: str, usable: int, cuda: bool,
                num_processes: int) -> list[str]:
    """Changes to the run that would fit in `usable` bytes, most useful first."""
    def fits(candidate: MemoryPlan) -> bool:
        return estimate_memory(shape, candidate).total <= usable

    found = []
    if not plan.activation_checkpointing and fits(replace(plan, activation_checkpointing=True)):
        found.append('"activation_checkpointing": true')
    smaller = next((mb for mb in range(plan.micro_batch - 1, 0, -1) if fits(replace(plan, micro_batch=mb))), None)
    if smaller is not None:
        found.append(f'"per_device_train_batch_size": {smaller} (global_batch_size keeps the batch: accumulation '
                     'makes up the difference)')
    if cuda and plan.shards == 1 and not found:
        # Sharding is for when the weights and optimizer state themselves do not fit one GPU. The way that fits
        # the GPUs of this run and recomputes least; where none does, the one that needs the fewest GPUs (on 24 GB
        # cards, FSDP with activation checkpointing fits on far fewer than FSDP alone).
        checkpointed = replace(plan, activation_checkpointing=True)
        ways = []
        for candidate, extra in ((plan, ""), (checkpointed, ' with "activation_checkpointing": true'),
                                 (replace(checkpointed, micro_batch=1),
                                  ' with "activation_checkpointing": true and "per_device_train_batch_size": 1')):
            gpus = next((n for n in range(2, MAX_FSDP_GPUS + 1) if fits(replace(candidate, shards=n))), None)
            if gpus is not None:
                ways.append((gpus, extra))
        if ways:
            gpus, extra = next(((n, e) for n, e in ways if n <= num_processes), min(ways, key=lambda way: way[0]))
            found.append(f'"fsdp": true{extra}' + (f" on at least {gpus} GPUs" if gpus > num_processes else ""))
    if preset != "tiny":
        found.append("the tiny config (--config tiny)")
    return found


def memory_plan(config: TrainingConfig, micro_batch: int, device: torch.device, num_processes: int) -> MemoryPlan:
    return MemoryPlan(micro_batch, device.type == "cuda" and config.mixed_precision != "no",
                      config.activation_checkpointing, num_processes if config.fsdp else 1)


def choose_micro_batch(config: TrainingConfig, device: torch.device, num_processes: int) -> tuple[int, str]:
    """per_device_train_batch_size "auto": the largest micro-batch that shares global_batch_size evenly over the
    processes and fits the preflight's estimate (1 when none does: the preflight then refuses, with advice), and
    the start-up line that says so."""
    sizes = config.micro_batches_sharing(num_processes)  # the config refuses "auto" without a global batch
    if not sizes:
        raise ConfigError(f"global_batch_size {config.global_batch_size} cannot be shared by {num_processes} "
                          f"processes: use a multiple of {num_processes}")
    usable, where = usable_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    shape = config.model_shape()
    for size in sizes:
        needed = estimate_memory(shape, memory_plan(config, size, device, num_processes)).total
        if needed <= usable:
            return size, (f'Micro-batch: {size} (per_device_train_batch_size "auto": the largest that shares '
                          f"global_batch_size {config.global_batch_size} over {num_processes} process(es) and fits, "
                          f"about {needed / GIB:.1f} of the {usable / GIB:.1f} GiB usable on {where})")
    return 1, (f'Micro-batch: 1 (per_device_train_batch_size "auto": none fits the {usable / GIB:.1f} GiB usable on '
               f"{where})")


def smaller_micro_batch(config: TrainingConfig, num_processes: int) -> int | None:
    """The next micro-batch below config's that shares its global_batch_size evenly; None where there is none."""
    if config.global_batch_size is None:
        return None
    return next((size for size in config.micro_batches_sharing(num_processes)
                 if size < int(config.per_device_train_batch_size)), None)


def check_memory(config: TrainingConfig, device: torch.device, num_processes: int) -> MemoryEstimate:
    """Raises a one-line ConfigError when the run cannot fit on the device, naming what would fit."""
    shape = config.model_shape()
    cuda = device.type == "cuda"
    plan = memory_plan(config, int(config.per_device_train_batch_size), device, num_processes)
    estimate = estimate_memory(shape, plan)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    usable, where = usable_memory(device, local_processes)
    if estimate.total > usable:
        options = suggestions(shape, plan, config.model_preset, usable, cuda, num_processes)
        would_fit = "; would fit: " + ", or ".join(options) if options else ""
        raise ConfigError(f"memory preflight: the {config.model_preset} model at micro-batch {plan.micro_batch} "
                          f"needs about {estimate.describe()} per process, more than the {usable / GIB:.1f} GiB "
                          f"usable on {where}{would_fit}; --skip-preflight to try anyway")
    return estimate


# ---------------------------------------------------------------------------------------------
# What the run does for speed, in one line
# ---------------------------------------------------------------------------------------------

def describe_fast_path(config: TrainingConfig, accelerator: Accelerator, meter: MfuMeter) -> str:
    """One log line: what the run does for speed, and how MFU is measured."""
    cuda = accelerator.device.type == "cuda"
    if meter.peak_flops_per_process is None:
        peak = (f"MFU not reported: peak of {device_name(accelerator.device)} unknown (pass --peak-tflops)")
    else:
        peak = f"MFU against {meter.peak_flops_per_process / 1e12:g} TFLOP/s per process"
    fused = use_fused_adamw(config.fused_adamw, accelerator)
    return (f"compile {'on' if use_compile(config.compile, cuda) else 'off'}, "
            f"activation checkpointing {'on' if config.activation_checkpointing else 'off'}, "
            f"FSDP {'on' if config.fsdp else 'off'}, fused AdamW {'on' if fused else 'off'}, "
            f"TF32 {'on' if cuda else 'n/a'} | "
            f"{meter.flops_per_token / 1e9:.3g} GFLOP per token, {peak}")
