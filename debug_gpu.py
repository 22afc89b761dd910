#!/usr/bin/env python3
"""Is this machine's GPU setup ready to train? Checks it end to end and ends with one verdict line.

    python debug_gpu.py                    # driver, torch CUDA build, devices, features, matmul speed, NCCL
    python debug_gpu.py --matmul-size 4096

Exit code 0: ready, or no GPU at all (training then runs on the CPU). Exit code 1: a CUDA setup is
present but broken (the verdict names the first problem; the lines above say more). Exit code 2: it cannot
run (bad arguments, or a package it imports is missing or broken: one line names it).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.check_imports import require  # standard library only

if __name__ == "__main__":  # before the imports below: a missing or broken package is one line, not a traceback
    require(("torch", "utils.performance"), "debug_gpu.py")

import torch  # noqa: E402

from utils.performance import peak_tflops_for

NVIDIA_PROC = Path("/proc/driver/nvidia/version")
SMI_QUERY = "index,name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu"


@dataclass
class Findings:
    """What the checks saw: printed as they go, summed up by verdict()."""

    problems: list[str] = field(default_factory=list)
    """Things broken in a CUDA setup that is present; any of them makes the exit code 1."""
    smi_gpus: list[str] = field(default_factory=list)
    driver_present: bool = False
    devices: list[str] = field(default_factory=list)
    matmul_tflops: float | None = None
    matmul_dtype: str = ""

    def ok(self, text: str) -> None:
        print(f"  ✅ {text}")

    def info(self, text: str) -> None:
        print(f"  ℹ️  {text}")

    def warn(self, text: str) -> None:
        print(f"  ⚠️  {text}")

    def fail(self, text: str) -> None:
        print(f"  ❌ {text}")
        self.problems.append(text)


def section(title: str) -> None:
    print(f"\n== {title} ==")


# ---------------------------------------------------------------------------------------------
# Checks, in the order a setup is built: driver -> torch build -> devices -> kernels -> NCCL
# ---------------------------------------------------------------------------------------------

def check_driver(found: Findings) -> None:
    section("NVIDIA driver")
    if NVIDIA_PROC.exists():
        found.driver_present = True
        found.info(NVIDIA_PROC.read_text().splitlines()[0].strip())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        (found.warn if found.driver_present else found.info)("nvidia-smi not found on PATH")
        return
    found.driver_present = True
    try:
        result = subprocess.run([smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        found.fail("nvidia-smi did not answer within 30 s (a hung driver or GPU)")
        return
    except OSError as error:
        found.fail(f"nvidia-smi could not run: {error}")
        return
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        first_line = output.splitlines()[0] if output else "no output"
        found.fail(f"nvidia-smi failed (exit {result.returncode}): {first_line}")
        return
    found.smi_gpus = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    found.ok(f"nvidia-smi sees {len(found.smi_gpus)} GPU(s)")
    for line in found.smi_gpus:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 7:
            index, name, driver, total, used, utilization, temperature = parts
            found.info(f"GPU {index}: {name}, driver {driver}, memory {used}/{total} MiB used, "
                       f"{utilization}% busy, {temperature}°C")
        else:
            found.info(line)


def check_torch_build(found: Findings) -> bool:
    """Prints the build; returns whether torch can use CUDA here."""
    section("PyTorch")
    found.info(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none (CPU-only build)'}, "
               f"cuDNN: {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}")
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_HOME", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"):
        if name in os.environ:
            found.info(f"{name}={os.environ[name]}")
    if torch.version.cuda is None:
        if found.driver_present:
            found.fail(f"torch {torch.__version__} is a CPU-only build on a machine with an NVIDIA driver: reinstall "
                       f"the CUDA build (venv/bin/pip install --force-reinstall torch=={torch.__version__.split('+')[0]})")
        return False
    # torch reports why CUDA cannot start (old driver, no device) as a warning: keep its words.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reason = "; ".join(str(warning.message).splitlines()[0] for warning in caught)
    if available:
        found.ok(f"CUDA available: {torch.cuda.device_count()} device(s)")
    elif found.driver_present or found.smi_gpus:
        found.fail(f"torch cannot use CUDA although an NVIDIA driver is present{': ' + reason if reason else ''}")
    else:
        found.info("CUDA build, but no GPU on this machine" + (f" ({reason})" if reason else ""))
    return available


def check_devices(found: Findings) -> None:
    section("Devices")
    count = torch.cuda.device_count()
    if found.smi_gpus and len(found.smi_gpus) != count and "CUDA_VISIBLE_DEVICES" not in os.environ:
        found.warn(f"nvidia-smi lists {len(found.smi_gpus)} GPU(s) but torch sees {count}")
    for index in range(count):
        try:
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError as error:
            found.fail(f"device {index} cannot be queried: {str(error).splitlines()[0]}")
            continue
        found.devices.append(props.name)
        capability = f"{props.major}.{props.minor}"
        found.info(f"cuda:{index} {props.name}, compute capability {capability}, {props.multi_processor_count} SMs, "
                   f"memory {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    if count == 0:
        return
    major = torch.cuda.get_device_properties(0).major
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slow: train.py uses fp16
    (found.ok if bf16 else found.warn)(
        f"bf16 {'supported' if bf16 else 'not supported: training uses fp16 with loss scaling'}")
    tf32_setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    (found.ok if major >= 8 else found.info)(
        f"TF32 {'supported' if major >= 8 else 'not supported (needs compute capability 8.0)'}"
        + (f"; fp32 matmul precision setting: {tf32_setting}" if tf32_setting is not None else ""))
    if count > 1:
        peers = all(torch.cuda.can_device_access_peer(0, other) for other in range(1, count))
        (found.ok if peers else found.warn)(f"peer-to-peer access from cuda:0 to the other GPUs: {peers}")


def check_attention(found: Findings) -> None:
    """Runs scaled_dot_product_attention on each fast backend; a missing one costs speed, not correctness."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    section("Attention kernels")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    query = torch.randn(2, 16, 512, 128, device="cuda", dtype=dtype)
    reference = torch.nn.functional.scaled_dot_product_attention(query.float(), query.float(), query.float(),
                                                                  is_causal=True)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        # When a backend cannot run, torch says why in warnings and raises a bare "No available kernel".
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    output = torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)
                error = (output.float() - reference).abs().max().item()
            except RuntimeError as problem:
                reasons = [str(warning.message).splitlines()[0] for warning in caught] or [str(problem)]
                found.warn(f"{backend.name}: not usable ({reasons[0].splitlines()[0]})")
                continue
        if error > 0.05:
            found.fail(f"{backend.name}: wrong results (max error {error:.3g} against fp32)")
        else:
            found.ok(f"{backend.name}: works ({dtype}, max error {error:.1e} against fp32)")


def check_matmul(found: Findings, size: int, iterations: int) -> None:
    section("Matmul")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    small_a, small_b = torch.randn(256, 256), torch.randn(256, 256)
    try:
        error = ((small_a.cuda() @ small_b.cuda()).cpu() - small_a @ small_b).abs().max().item()
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        for _ in range(3):  # warm-up: cuBLAS picks its kernel on the first calls
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            a @ b
        end.record()
        torch.cuda.synchronize()
    except RuntimeError as problem:
        found.fail(f"matmul on cuda:0 failed: {str(problem).splitlines()[0]}")
        return
    # fp32 on the GPU may use TF32, which rounds inputs to 10 mantissa bits: allow for that.
    if error > 0.5:
        found.fail(f"cuda:0 computes a 256x256 fp32 matmul wrongly (max error {error:.3g} against the CPU)")
    else:
        found.ok(f"fp32 256x256 matmul matches the CPU (max error {error:.1e})")
    seconds = start.elapsed_time(end) / 1000
    found.matmul_tflops = 2 * size**3 * iterations / seconds / 1e12
    found.matmul_dtype = str(dtype).removeprefix("torch.")
    peak = peak_tflops_for(torch.cuda.get_device_name(0)) if dtype == torch.bfloat16 else None
    found.ok(f"{found.matmul_dtype} {size}x{size} matmul: {seconds / iterations * 1000:.2f} ms, "
             f"{found.matmul_tflops:.0f} TFLOP/s" + (f" ({found.matmul_tflops / peak:.0%} of the {peak:.0f} "
                                                    f"TFLOP/s dense peak; ~80% is good)" if peak else ""))


def check_nccl(found: Findings) -> None:
    """NCCL is what multi-GPU training all-reduces with: a one-process group proves the library loads and runs."""
    import torch.distributed as dist
    section("NCCL")
    if not dist.is_available() or not dist.is_nccl_available():
        found.warn("torch was built without NCCL: multi-GPU training is not possible on this machine")
        return
    try:
        raw_version = torch.cuda.nccl.version()
        version = ".".join(map(str, raw_version)) if isinstance(raw_version, tuple) else str(raw_version)
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        tensor = torch.ones(1024, device="cuda")
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        dist.destroy_process_group()
    except (RuntimeError, dist.DistBackendError) as problem:
        found.fail(f"NCCL all-reduce failed: {str(problem).splitlines()[0]}")
        return
    if tensor.sum().item() != 1024:
        found.fail("NCCL all-reduce on one process changed the data")
    else:
        found.ok(f"NCCL {version}: one-process all-reduce works")


def guarded(found: Findings, check: Callable[[Findings], None]) -> None:
    """A check that crashes is itself a finding about a broken setup, reported in one line."""
    try:
        check(found)
    except Exception as error:  # noqa: BLE001 - any failure here is a diagnosis, not a bug to propagate
        first_line = str(error).splitlines()[0] if str(error) else ""
        found.fail(f"{getattr(check, 'func', check).__name__} crashed: {type(error).__name__}: {first_line}")


# ---------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------

def verdict(found: Findings, cuda_available: bool) -> tuple[str, int]:
    """The last line and the exit code: broken (1), ready (0), or no GPU here (0)."""
    if found.problems:
        more = f" (+{len(found.problems) - 1} more above)" if len(found.problems) > 1 else ""
        return f"❌ VERDICT: CUDA setup broken: {found.problems[0]}{more}", 1
    if not cuda_available:
        return ("ℹ️  VERDICT: no NVIDIA GPU on this machine; training will run on the CPU "
                "(fine for the tiny config, far too slow for 1.2b)"), 0
    speed = f", {found.matmul_dtype} matmul {found.matmul_tflops:.0f} TFLOP/s" if found.matmul_tflops else ""
    names = sorted(set(found.devices))
    return f"✅ VERDICT: ready to train on {len(found.devices)}x {' + '.join(names)}{speed}", 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the NVIDIA driver, torch's CUDA build, the GPUs, bf16/TF32/"
                                                 "flash attention, matmul speed and NCCL; ends with one verdict.")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the timed square matmul")
    parser.add_argument("--iterations", type=int, default=50, help="timed matmuls")
    args = parser.parse_args(argv)
    if args.matmul_size <= 0 or args.iterations <= 0:
        print("error: --matmul-size and --iterations must be positive", file=sys.stderr)
        return 2

    started = time.perf_counter()
    found = Findings()
    guarded(found, check_driver)
    cuda_available = check_torch_build(found)
    if cuda_available:
        guarded(found, check_devices)
        if found.devices:
            guarded(found, check_attention)
            guarded(found, partial(check_matmul, size=args.matmul_size, iterations=args.iterations))
            guarded(found, check_nccl)
    line, code = verdict(found, cuda_available)
    print(f"\n(checked in {time.perf_counter() - started:.1f} s)")
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
