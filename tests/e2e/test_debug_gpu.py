"""debug_gpu.py: its verdict on this (GPU-less) machine and on broken CUDA setups faked with a stand-in nvidia-smi."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import debug_gpu
from conftest import REPO_ROOT

NO_GPU_HERE = not torch.cuda.is_available() and not debug_gpu.NVIDIA_PROC.exists()
needs_cpu_machine = pytest.mark.skipif(not NO_GPU_HERE, reason="checks the no-GPU paths; this machine has a GPU")


def run_debug(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess:
    """debug_gpu.py with PATH holding only a stand-in nvidia-smi (or none at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + nvidia_smi)
        fake.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir)}
    return subprocess.run([sys.executable, str(REPO_ROOT / "debug_gpu.py"), "--matmul-size", "256"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@needs_cpu_machine
def test_no_gpu_says_so_and_exits_0(tmp_path):
    result = run_debug(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("ℹ️  VERDICT: no NVIDIA GPU")
    assert f"torch {torch.__version__}" in result.stdout and "nvidia-smi not found" in result.stdout


@needs_cpu_machine
def test_gpu_with_a_cpu_only_torch_is_broken(tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build; the CPU-only case cannot be shown here")
    result = run_debug(tmp_path, 'echo "0, NVIDIA H100 80GB HBM3, 570.86, 81559, 1, 0, 31"\n')
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GPU 0: NVIDIA H100 80GB HBM3, driver 570.86" in result.stdout
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("❌ VERDICT: CUDA setup broken") and "CPU-only build" in verdict


@needs_cpu_machine
def test_failing_driver_is_broken(tmp_path):
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    result = run_debug(tmp_path, f'echo "{message}"\nexit 9\n')
    assert result.returncode == 1
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("❌ VERDICT: CUDA setup broken: nvidia-smi failed (exit 9): " + message)
    assert "more above" in verdict  # torch being CPU-only (or unable to start CUDA) is the second problem


def test_verdicts():
    ready = debug_gpu.Findings(devices=["NVIDIA H100 80GB HBM3"], matmul_tflops=712.4, matmul_dtype="bfloat16")
    assert debug_gpu.verdict(ready, cuda_available=True) == (
        "✅ VERDICT: ready to train on 1x NVIDIA H100 80GB HBM3, bfloat16 matmul 712 TFLOP/s", 0)
    broken = debug_gpu.Findings(devices=["A100"], problems=["NCCL all-reduce failed: x", "other"])
    line, code = debug_gpu.verdict(broken, cuda_available=True)
    assert code == 1 and line == "❌ VERDICT: CUDA setup broken: NCCL all-reduce failed: x (+1 more above)"
    assert debug_gpu.verdict(debug_gpu.Findings(), cuda_available=False)[1] == 0


def test_a_crashing_check_is_a_finding(capsys):
    def check_devices(found: debug_gpu.Findings) -> None:
        raise RuntimeError("CUDA error: unspecified launch failure\nmore detail")

    found = debug_gpu.Findings()
    debug_gpu.guarded(found, check_devices)
    assert found.problems == ["check_devices crashed: RuntimeError: CUDA error: unspecified launch failure"]
    assert "❌" in capsys.readouterr().out


def test_a_package_that_fails_to_import_is_one_line(tmp_path):
    fake_torch = tmp_path / "fake" / "torch"
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text('raise ImportError("simulated: libcudart.so.13 missing")\n')
    result = subprocess.run([sys.executable, str(REPO_ROOT / "debug_gpu.py")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")}, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: debug_gpu.py cannot start, these imports fail here: "
                           "torch (ImportError: simulated: libcudart.so.13 missing)"), line
