"""FLOPs and MFU arithmetic, the memory preflight, and the fast-path switches (utils/performance.py)."""
from collections.abc import Iterator

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import GPTNeoXForCausalLM

from configs.model_config import build_model_config, resolve_shape
from configs.training_config import ConfigError, TrainingConfig, config_from_dict
from conftest import MICRO_MODEL
from utils import accelerator as accelerator_setup
from utils import performance
from utils.accelerator import use_compile
from utils.performance import (
    GIB,
    MemoryPlan,
    check_memory,
    choose_micro_batch,
    count_parameters,
    estimate_memory,
    flops_per_token,
    make_mfu_meter,
    peak_tflops_for,
    window_peak_memory_gib,
)
from utils.stopping import StopVote

SHAPE_12B = resolve_shape("1.2b")


@pytest.mark.parametrize("preset, overrides", [("1.2b", {}), ("tiny", {}), ("tiny", MICRO_MODEL),
                                               ("tiny", {"tie_word_embeddings": True})])
def test_parameter_count_matches_the_built_model(preset: str, overrides: dict) -> None:
    shape = resolve_shape(preset, overrides)
    with torch.device("meta"):  # the 1.2b model without allocating its weights
        model = GPTNeoXForCausalLM(build_model_config(shape))
    counted = count_parameters(shape)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.input_embedding == model.gpt_neox.embed_in.weight.numel()


def test_flops_per_token_of_the_12b_preset() -> None:
    counted = count_parameters(SHAPE_12B)
    assert counted.total == 1_414_647_808  # Pythia-1.4B with the vocabulary padded to 50,304
    # N without the input embedding (50,304 x 2,048), lm_head included.
    assert counted.in_matmuls == 1_414_647_808 - 50_304 * 2_048 == 1_311_625_216
    assert flops_per_token(SHAPE_12B) == 6 * 1_311_625_216 + 12 * 24 * 2048 * 2048 == 9_077_710_848
    assert flops_per_token(SHAPE_12B) == pytest.approx(9.08e9, rel=1e-3)  # the anchor benchmark's figure


def test_tied_embeddings_do_not_change_the_flops() -> None:
    # The shared matrix is still the output projection, a matmul per token; only the lookup is free.
    tied, untied = (resolve_shape("tiny", {"tie_word_embeddings": tie}) for tie in (True, False))
    assert count_parameters(tied).total == count_parameters(untied).total - count_parameters(untied).input_embedding
    assert flops_per_token(tied) == flops_per_token(untied)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
                                          ("NVIDIA GeForce RTX 4090", None)])
def test_peak_table(name: str, tflops: float | None) -> None:
    assert peak_tflops_for(name) == tflops


def test_mfu_of_known_throughputs() -> None:
    h100 = performance.MfuMeter(flops_per_token(SHAPE_12B), 989e12, num_processes=8)
    # 45k tokens/s per GPU on 8 GPUs: the published run of this shape, about 41% MFU.
    assert h100.mfu(8 * 45_000) == pytest.approx(45_000 * 9_077_710_848 / 989e12)
    assert h100.mfu(8 * 45_000) == pytest.approx(0.413, abs=1e-3)
    assert performance.MfuMeter(1000, None, 1).mfu(1e6) is None


def test_mfu_meter_needs_a_peak_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert make_mfu_meter(SHAPE_12B, cpu, 1, None).mfu(1000.0) is None
    meter = make_mfu_meter(SHAPE_12B, cpu, 2, peak_tflops=2.0)
    assert meter.mfu(100.0) == pytest.approx(100.0 * 9_077_710_848 / (2 * 2e12))


def test_memory_estimate_matches_the_anchor_measurement() -> None:
    # gpu_anchor_bench.py on an H200: eager bf16, micro-batch 8, peak 58 GiB allocated.
    eager_mb8 = estimate_memory(SHAPE_12B, MemoryPlan(8, True, False, 1))
    assert eager_mb8.total / GIB == pytest.approx(58, rel=0.05)
    assert eager_mb8.weights + eager_mb8.gradients + eager_mb8.optimizer > 16 * 1_414_647_808  # fp32 + AdamW
    checkpointed = estimate_memory(SHAPE_12B, MemoryPlan(8, True, True, 1))
    assert checkpointed.activations < eager_mb8.activations / 2
    sharded = estimate_memory(SHAPE_12B, MemoryPlan(8, True, False, 8))
    assert sharded.optimizer == eager_mb8.optimizer // 8 and sharded.activations == eager_mb8.activations


def config_for(**values: object) -> TrainingConfig:
    return config_from_dict({"model_preset": "1.2b", **values}, "test")


def with_usable(monkeypatch: pytest.MonkeyPatch, gib: float) -> None:
    monkeypatch.setattr(performance, "usable_memory", lambda device, local: (int(gib * GIB), f"a {gib} GiB device"))


def test_preflight_refuses_the_12b_model_on_a_24gb_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    with_usable(monkeypatch, 24 * performance.CPU_USABLE_FRACTION)
    with pytest.raises(ConfigError) as error:
        check_memory(config_for(per_device_train_batch_size=1), torch.device("cpu"), 1)
    message = str(error.value)
    assert "\n" not in message and message.startswith("memory preflight: the 1.2b model at micro-batch 1")
    assert "would fit: the tiny config (--config tiny)" in message  # nothing else fits 21.6 GiB on a CPU
    assert "fsdp" not in message and "--skip-preflight" in message


def test_preflight_on_an_8gb_gpu_points_to_fsdp_and_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    with_usable(monkeypatch, 8 * 0.95 - 1)
    with pytest.raises(ConfigError, match=r'would fit: "fsdp": true with "activation_checkpointing": true and '
                                          r'"per_device_train_batch_size": 1 on at least \d+ GPUs, or the tiny config'):
        check_memory(config_for(per_device_train_batch_size=4), torch.device("cuda"), 1)


@pytest.mark.parametrize("card_gib, gpus", [(24, 2), (40, 2)])
def test_preflight_on_24_and_40_gb_cards_offers_fsdp_with_activation_checkpointing(
        monkeypatch: pytest.MonkeyPatch, card_gib: int, gpus: int) -> None:
    # production.json's micro-batch 4 without checkpointing on one GPU: FSDP alone would need 6 GPUs of 24 GB,
    # with activation checkpointing 2; on 40 GB, checkpointing alone fits one GPU.
    with_usable(monkeypatch, card_gib * 0.95 - 1)
    with pytest.raises(ConfigError) as error:
        check_memory(config_for(per_device_train_batch_size=4), torch.device("cuda"), 1)
    message = str(error.value)
    if card_gib == 24:
        assert f'would fit: "fsdp": true with "activation_checkpointing": true on at least {gpus} GPUs' in message
    else:
        assert 'would fit: "activation_checkpointing": true' in message
    check_memory(config_for(per_device_train_batch_size=4, activation_checkpointing=True, fsdp=card_gib == 24),
                 torch.device("cuda"), gpus)


def test_auto_micro_batch_is_the_largest_that_shares_the_global_batch_and_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_usable(monkeypatch, 79.1 * 0.95 - 1)  # an H100: micro-batch 8 fits (58 GiB), 16 does not
    auto = {"per_device_train_batch_size": "auto", "global_batch_size": 256}
    size, line = choose_micro_batch(config_for(**auto), torch.device("cuda"), 1)
    assert size == 8 and line.startswith('Micro-batch: 8 (per_device_train_batch_size "auto": the largest that shares '
                                         "global_batch_size 256 over 1 process(es) and fits, about 58.")
    assert choose_micro_batch(config_for(**auto, activation_checkpointing=True), torch.device("cuda"), 8)[0] == 16
    assert choose_micro_batch(config_for(**{**auto, "global_batch_size": 24}), torch.device("cuda"), 2)[0] == 6
    with_usable(monkeypatch, 8 * 0.95 - 1)  # nothing fits: 1, and the preflight then refuses with its advice
    assert choose_micro_batch(config_for(**auto), torch.device("cuda"), 1)[0] == 1
    with pytest.raises(ConfigError, match="global_batch_size 6 cannot be shared by 8 processes: use a multiple of 8"):
        choose_micro_batch(config_for(**{**auto, "global_batch_size": 6}), torch.device("cuda"), 8)
    with pytest.raises(ConfigError, match='per_device_train_batch_size "auto" needs global_batch_size'):
        config_for(per_device_train_batch_size="auto")
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be a positive integer"):
        config_for(per_device_train_batch_size="big", global_batch_size=8)


def test_preflight_on_an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    with_usable(monkeypatch, 79.1 * 0.95 - 1)
    assert check_memory(config_for(per_device_train_batch_size=8), torch.device("cuda"), 1).total < 60 * GIB
    with pytest.raises(ConfigError) as error:
        check_memory(config_for(per_device_train_batch_size=16), torch.device("cuda"), 1)
    message = str(error.value)
    assert '"activation_checkpointing": true' in message
    assert '"per_device_train_batch_size": 1' in message  # the largest that fits: 10, 11 ...
    largest = int(message.split('"per_device_train_batch_size": ')[1].split(" ")[0])
    assert 8 <= largest < 16
    assert check_memory(config_for(per_device_train_batch_size=largest), torch.device("cuda"), 1)
    check_memory(config_for(per_device_train_batch_size=16, activation_checkpointing=True), torch.device("cuda"), 1)


def test_preflight_suggests_fsdp_when_the_optimizer_state_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    with_usable(monkeypatch, 24 * 0.95 - 1)  # eight 24 GiB GPUs: 22.6 GB of weights and AdamW state per GPU
    with pytest.raises(ConfigError, match='would fit: "fsdp": true, or the tiny config'):
        check_memory(config_for(per_device_train_batch_size=4), torch.device("cuda"), 8)
    check_memory(config_for(per_device_train_batch_size=4, fsdp=True), torch.device("cuda"), 8)


def test_fast_path_switches() -> None:
    assert use_compile("auto", cuda=True) and not use_compile("auto", cuda=False)
    assert use_compile(True, cuda=False) and not use_compile(False, cuda=True)
    assert accelerator_setup.dynamo_plugin(True, fsdp=False, backend="inductor").backend.value == "INDUCTOR"
    assert accelerator_setup.dynamo_plugin(True, fsdp=False, backend="aot_eager").backend.value == "AOT_EAGER"
    assert accelerator_setup.dynamo_plugin(True, fsdp=True, backend="inductor").use_regional_compilation
    assert accelerator_setup.dynamo_plugin(False, fsdp=False, backend="inductor").backend.value == "NO"
    with pytest.raises(ConfigError, match="compile must be"):
        config_for(compile="always")
    with pytest.raises(ConfigError, match="compile_backend must be one of inductor, aot_eager"):
        config_for(compile_backend="eager")
    with pytest.raises(ConfigError, match="fused_adamw must be"):
        config_for(fused_adamw="yes")
    with pytest.raises(ConfigError, match="fused_adamw cannot be true with fp16"):
        config_for(fused_adamw=True, mixed_precision="fp16")
    with pytest.raises(ConfigError, match="peak_tflops must be"):
        config_for(peak_tflops=0)


class PretendAccelerator:
    def __init__(self, device: str, mixed_precision: str) -> None:
        self.device, self.mixed_precision = torch.device(device), mixed_precision


def test_fused_adamw_is_on_on_cuda_unless_fp16_and_can_be_forced() -> None:
    use = accelerator_setup.use_fused_adamw
    assert use("auto", PretendAccelerator("cuda", "bf16")) and not use("auto", PretendAccelerator("cuda", "fp16"))
    assert not use("auto", PretendAccelerator("cpu", "no")) and use(True, PretendAccelerator("cpu", "bf16"))
    assert not use(False, PretendAccelerator("cuda", "bf16"))
    # "auto" precision chose fp16 on a GPU without bf16 tensor cores: a forced fused AdamW is refused there too.
    with pytest.raises(ConfigError, match="fused_adamw cannot be true with fp16"):
        use(True, PretendAccelerator("cuda", "fp16"))


def test_activation_checkpointing_keeps_the_gradients() -> None:
    shape = resolve_shape("tiny", MICRO_MODEL)
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(build_model_config(shape)).train()
        if checkpointing:
            accelerator_setup.enable_activation_checkpointing(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.gpt_neox.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group, as a launcher's processes have: an all-reduce is then the identity."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_stop_vote_counts_one_step_late_with_several_processes(process_group: None) -> None:
    vote = StopVote(torch.distributed.new_group(backend="gloo"))
    votes = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
             (False, False, False)]
    assert [vote.decide(*flags) for flags in votes] == [(False, False, False), (False, False, False),
                                                       (True, False, False), (False, True, False), (False, False, True)]
    single = StopVote.between(1, timeout_s=60)
    assert single.group is None
    assert single.decide(True, False, False) == (True, False, False)  # one process decides at once
    assert single.decide(False, True, True) == (False, True, True)


def test_gpu_memory_is_the_peak_of_each_logging_window(monkeypatch: pytest.MonkeyPatch) -> None:
    allocator = {"peak": 40 * GIB}  # the caching allocator's counters, as torch.cuda keeps them

    def reset(device: torch.device) -> None:
        allocator["peak"] = 12 * GIB  # what the tensors alive at the reset hold

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    gpu = torch.device("cuda", 0)
    assert window_peak_memory_gib(gpu) == 40.0
    assert window_peak_memory_gib(gpu) == 12.0  # the next window does not inherit the earlier peak
    assert window_peak_memory_gib(torch.device("cpu")) is None


def test_fsdp_computes_in_bf16_and_reduces_gradients_in_fp32() -> None:
    plugin = accelerator_setup.fsdp_plugin(activation_checkpointing=True, mixed_precision="bf16")
    plugin.set_mixed_precision("bf16")  # what Accelerate does with the plugin: it must keep our policy
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy.output_dtype is None  # the loss stays fp32
    assert plugin.activation_checkpointing and plugin.fsdp_version == 2
    assert accelerator_setup.fsdp_plugin(False, "no").mixed_precision_policy is None  # fp32 throughout


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps one state per process; a test that needs other settings than earlier tests starts anew."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_keeps_autocast_without_an_fp32_copy_of_the_logits(fresh_accelerate_state: None) -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")  # autocast on the CPU, as on a GPU
    model = accelerator.prepare(GPTNeoXForCausalLM(build_model_config(resolve_shape("tiny", MICRO_MODEL))))
    tokens = torch.randint(0, 4096, (2, 64))
    wrapped = model(input_ids=tokens, labels=tokens)
    assert wrapped.logits.dtype == torch.float32  # Accelerate's copy
    accelerator_setup.keep_logits_in_low_precision(model, accelerator)
    kept = model(input_ids=tokens, labels=tokens)
    assert kept.logits.dtype == torch.bfloat16  # still computed under autocast, and not copied
    assert kept.loss.dtype == torch.float32 and kept.loss.item() == wrapped.loss.item()


def test_fsdp_is_refused_without_gpus() -> None:
    from utils.accelerator import make_accelerator
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        make_accelerator(config_for(fsdp=True))
