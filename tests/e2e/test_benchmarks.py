"""Every benchmark in bench/ still runs: each one's --smoke mode (its own code paths at tiny sizes) as a subprocess,
the GPU check's import check, and the parts of bench/gpu_bench.py a CPU can run (arguments, shards, the preflight's
micro-batch, train.py's output read back, the table, the exit code)."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import gpu_bench
from bench.check_imports import TRAIN_IMPORTS, import_problems
from configs.training_config import ConfigError, config_from_dict
from conftest import REPO_ROOT
from utils import performance

FIGURE = r"\d+\.\d+"


def run_bench(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A benchmark as a user runs it, from the repository root, on one torch thread (the suite shares 2 cores)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=full_env, timeout=180)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout


def test_async_save_smoke():
    output = succeeded(run_bench(sys.executable, "bench/bench_async_save.py", "--smoke"))
    for mode in ("sync ", "async"):
        assert re.search(rf"^{mode} checkpoint .+: blocked per save {FIGURE} s .+ written after {FIGURE} s$",
                         output, re.MULTILINE), output


def test_checkpoint_upload_smoke():
    output = succeeded(run_bench(sys.executable, "bench/bench_checkpoint_upload.py", "--smoke"))
    for archive_format in ("tar.zst", "tar", "tar.gz"):  # ratio, archive only, local folder, emulator
        assert re.search(rf"^{re.escape(archive_format)} +{FIGURE}( +[\d,]+){{3}}$", output, re.MULTILINE), output
    for streams in (1, 2):  # local folder, emulator
        assert re.search(rf"^ +{streams} +[\d,]+ +[\d,]+$", output, re.MULTILINE), output
    for archive_format in ("files", "tar.zst"):  # MB/s, disk peak, checkpoint, peak / checkpoint
        assert re.search(rf"^ +{re.escape(archive_format)} +[\d,]+ +[\d,]+ MB +[\d,]+ MB +{FIGURE}$", output,
                         re.MULTILINE), output
    assert re.search(rf"blocked per checkpoint: {FIGURE} s", output), output
    assert re.search(rf"with one in flight \(\d+ steps\) -> ratio {FIGURE}", output), output


def test_init_smoke():
    output = succeeded(run_bench(sys.executable, "bench/bench_init.py", "--smoke"))
    assert re.search(rf"^std attention.dense.weight +({FIGURE} +){{4}}{FIGURE}$", output, re.MULTILINE), output
    assert re.search(rf"^residual stream after layer 4 +{FIGURE} +{FIGURE} +{FIGURE}$", output, re.MULTILINE), output


def test_input_pipeline_smoke():
    output = succeeded(run_bench(sys.executable, "bench/bench_input_pipeline.py", "--smoke"))
    for source in ("warm cache, one core", "the same, prepare_data.py's streams", "emulator, empty cache"):
        assert re.search(rf"^ *{re.escape(source)}.* = +{FIGURE} M tokens/s", output, re.MULTILINE), output
    assert re.search(rf"^one verified download from the emulator .* = +{FIGURE} MB/s$", output, re.MULTILINE)
    assert "shards downloaded: 2" in output
    assert "order over 2 shards in 2 windows of 1 shards' worth an epoch" in output
    assert re.search(rf"^ +windows of whole shards +2 +{FIGURE} +2 +2$", output, re.MULTILINE), output
    assert re.search(rf"^ +mix_whole_dataset +4 +{FIGURE} +2 +\d+$", output, re.MULTILINE), output  # half: timing


def test_train_overhead_smoke(tmp_path):
    gpu_bench.make_shards(tmp_path / "data", 4096, 2**15)
    output = succeeded(run_bench(sys.executable, "bench/bench_train_overhead.py", "--smoke", "--data",
                                 str(tmp_path / "data"), "--json", str(tmp_path / "overhead.json")))
    for loop in ("train.py", "bare", "trainer"):
        assert re.search(rf"^\| {loop} \| {FIGURE} \| {FIGURE} \| {FIGURE} \|", output, re.MULTILINE), output
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert result["rounds"] == 1 and result["micro_batch"] == 2
    assert all(seconds > 0 for seconds in result["median_step_s"].values())
    assert result["train_over_bare"]["median_of_rounds"] > 0 and result["train_over_trainer"]["median_of_rounds"] > 0


def test_gpu_check_smoke(tmp_path):
    """gpu_check.sh's import check, then gpu_bench.py's whole path on one tiny train.py run on this CPU."""
    output = succeeded(run_bench("bash", "bench/gpu_check.sh", "--smoke",
                                 env={"PYTHON": sys.executable, "OUT": str(tmp_path)}))
    assert "imports ok: " + ", ".join(TRAIN_IMPORTS) in output
    assert re.search(r"^\| tiny-smoke \| 2 \| [\d,]+ \| - \| - \| - \| \d+ \|$", output, re.MULTILINE), output
    [row] = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert row["tokens_per_sec"] > 0 and row["windows"] >= 2  # train.py may log another window before its kill
    assert row["speed_line"].startswith("compile off, activation checkpointing off"), row
    tail = (tmp_path / "tiny-smoke-mb2.stderr.txt").read_text()
    assert " Speed: compile off" in tail
    assert (tmp_path / "imports.log").read_text().startswith("imports ok")


def test_gpu_check_stops_at_a_broken_import(tmp_path):
    """A package that fails to import (as google.cloud.storage does under an older protobuf) stops the check in
    one line naming it, before any benchmark starts."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("simulated: libcudart.so.13 missing")\n')
    out = tmp_path / "out"
    result = run_bench("bash", "bench/gpu_check.sh", "--smoke",
                       env={"PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": str(tmp_path / "fake")})
    assert result.returncode == 2
    [line] = (result.stdout + result.stderr).strip().splitlines()
    assert line.startswith("error: train.py cannot start, these imports fail here: "
                           "torch (ImportError: simulated: libcudart.so.13 missing)"), line
    assert sorted(path.name for path in out.iterdir()) == ["imports.log"]  # no benchmark started


def test_import_problems_names_each_failing_module(tmp_path, monkeypatch):
    # protobuf refuses generated modules newer than itself with its own exception type, not an ImportError.
    (tmp_path / "generated_for_newer_protobuf.py").write_text(
        'raise RuntimeError("Detected incompatible Protobuf Gencode/Runtime versions\\nmore")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_problems(["json", "generated_for_newer_protobuf", "no_such_package_here"]) == [
        "generated_for_newer_protobuf (RuntimeError: Detected incompatible Protobuf Gencode/Runtime versions)",
        "no_such_package_here (ModuleNotFoundError: No module named 'no_such_package_here')"]


def test_train_imports_cover_what_train_py_imports():
    """A package train.py starts to import is added to the GPU check's list, or the check would pass a machine
    where train.py cannot start."""
    sources = [REPO_ROOT / "train.py", *(REPO_ROOT / "utils").glob("*.py"), *(REPO_ROOT / "configs").glob("*.py")]
    imported = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"utils", "configs"}
    assert third_party <= {module.split(".")[0] for module in TRAIN_IMPORTS}


def test_speed_line_is_found_after_the_timestamp():
    output = ("2026-12-07 10:00:00 Model: GPT-NeoX 1.2b, 1,414,647,808 parameters\n"
              "2026-12-07 10:00:00 Speed: compile on, activation checkpointing off | 9.08 GFLOP per token\n"
              "training:   0%|          | 1/1000000 [00:01<450:54:41,  1.62s/step]\r")
    assert gpu_bench.speed_line(output) == "compile on, activation checkpointing off | 9.08 GFLOP per token"
    assert gpu_bench.speed_line("2026-12-07 10:00:00 Model: tiny\nTraceback (most recent call last):\n") is None


def test_stderr_tail_keeps_the_last_lines(tmp_path):
    gpu_bench.keep_stderr_tail("".join(f"line {n}\n" for n in range(500)), tmp_path / "tail.txt")
    lines = (tmp_path / "tail.txt").read_text().splitlines()
    assert len(lines) == gpu_bench.STDERR_TAIL_LINES and lines[0] == "line 300" and lines[-1] == "line 499"


def test_training_windows_leave_out_other_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 5, "loss": 8.1, "tokens_per_sec": 100.0}\n{"step": 5, "val_loss": 8.0}\n'
                       '{"event": "save", "step": 5}\n{"step": 10, "loss": 7.9, "tokens_per_sec": 110.0}\n'
                       '{"step": 15, "lo')
    assert [record["step"] for record in gpu_bench.training_windows(metrics)] == [5, 10]


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_largest_micro_batch_is_the_preflight_limit(monkeypatch, activation_checkpointing):
    """On a made-up 80 GB card: the micro-batch chosen passes the memory preflight and the next one would not."""
    monkeypatch.setattr(performance, "usable_memory", lambda device, processes: (74 * 2**30, "a made-up 80 GB card"))
    values = {"model_preset": "1.2b", "activation_checkpointing": activation_checkpointing}
    device = torch.device("cuda")
    chosen = gpu_bench.largest_micro_batch(values, 64, device)
    assert 1 < chosen < 64
    performance.check_memory(config_from_dict({**values, "per_device_train_batch_size": chosen}, "t"), device, 1)
    with pytest.raises(ConfigError, match="memory preflight"):
        performance.check_memory(config_from_dict({**values, "per_device_train_batch_size": chosen + 1}, "t"),
                                 device, 1)


def test_table_and_exit_code_when_a_variant_fails(tmp_path, monkeypatch, capsys):
    def failing_run(variant, micro_batch, *args):  # noqa: ANN001, ANN202 - run_variant's signature
        return {"variant": variant.name, "micro_batch": micro_batch, "error": "RuntimeError: CUDA error"}

    monkeypatch.setattr(gpu_bench, "run_variant", failing_run)
    assert gpu_bench.main(["--smoke", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "| tiny-smoke | 2 | RuntimeError: CUDA error | | | | |" in captured.out
    assert captured.err.strip() == (f"error: 1 variant(s) failed: tiny-smoke-mb2; their stderr tails are in "
                                    f"{tmp_path}/VARIANT-mbN.stderr.txt")
    rows = [{"variant": "1.2b-compiled", "micro_batch": 11, "tokens_per_sec": 49_000.4, "mfu": 0.452,
             "peak_memory_gib_train": 60.04, "peak_memory_gib_nvidia_smi": None, "wall_s": 95.2},
            {"variant": "1.2b-eager", "error": "skipped: budget spent", "skipped": True}]
    assert gpu_bench.table(rows)[2:] == ["| 1.2b-compiled | 11 | 49,000 | 45.2% | 60.0 | - | 95 |",
                                         "| 1.2b-eager | - | skipped: budget spent | | | | |"]


def test_gpu_bench_arguments():
    assert gpu_bench.parse_args([]).variants == gpu_bench.DEFAULT_VARIANTS
    smoke = gpu_bench.parse_args(["--smoke", "--log-every", "3"])
    assert (smoke.variants, smoke.max_micro_batch, smoke.log_every) == ("tiny-smoke", 2, 3)  # explicit flags win
    assert set(gpu_bench.DEFAULT_VARIANTS.split(",")) == set(gpu_bench.VARIANTS) - {"tiny-smoke"}


def test_gpu_profile_smoke():
    # On a CPU too, the compiled model's causal attention without a mask runs torch's flash kernel for the CPU.
    output = succeeded(run_bench(sys.executable, "bench/gpu_profile.py", "--smoke"))
    assert re.search(r"^attention kernel: aten::_scaled_dot_product_flash_attention_for_cpu +2 calls", output,
                     re.MULTILINE), output
