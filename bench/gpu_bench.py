#!/usr/bin/env python3
"""train.py's speed on one GPU, in one call: tokens/s and MFU of the 1.2b preset at seq 2048 (bf16) with
torch.compile on and off, activation checkpointing on and off, each at the largest micro-batch the memory
preflight allows, plus a tiny-config smoke run of the default path.

    python bench/gpu_bench.py                      # all variants, results in $OUT (or bench/gpu_results/)
    python bench/gpu_bench.py --variants tiny,1.2b-compiled --budget-s 300
    python bench/gpu_bench.py --smoke              # a few seconds, also on a CPU: one tiny run, the same code paths

Every variant is a real `python train.py` run on random-token shards made here, so the numbers include
data loading, logging and the loop; throughput is the median of train.py's own logging windows after the
first `--skip-windows` (which hold compilation and warm-up). A run that dies of out-of-memory is tried once
more at 3/4 of the micro-batch. Peak GPU memory: train.py's own (tensors, the largest of its logging
windows, comparable with the anchor's and the preflight's) and nvidia-smi's (the whole process, polled).
Writes gpu_bench.json (device, date, versions, one row per variant) and the last 200 lines of each run's
stderr (VARIANT-mbN.stderr.txt) to the output folder, and prints a Markdown table for bench/RESULTS.md.
The exit code is 1 when a variant failed (one not started for lack of time is no failure).

On a lent GPU machine, which lacks the GCS and archive packages train.py imports, run it through
bench/gpu_check.sh (prepared here by bench/prepare_gpu_check.sh), which installs them from carried wheels
and runs the bare-model anchor on the same card. Before anything else it imports what train.py needs and
stops with one line naming what fails (TensorBoard included: train.py's default tracker). metrics.jsonl is
what is read here.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import smoke  # noqa: E402
from bench.check_imports import TRAIN_IMPORTS, require  # noqa: E402  (standard library only)

if __name__ == "__main__":  # before the imports below: a missing or broken package is one line, not a traceback
    require(TRAIN_IMPORTS, "bench/gpu_bench.py")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs.training_config import ConfigError, config_from_dict  # noqa: E402
from utils.performance import check_memory, flops_per_token

STDERR_TAIL_LINES = 200
"""Lines of each run's stderr kept in the output folder: enough for a traceback and the start-up log."""
SPEED_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?Speed: (.+)$")
"""train.py's start-up line saying what the run does for speed, after the timestamp its log lines begin with."""


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    compile: bool | str
    activation_checkpointing: bool
    steps: int
    micro_batch: int | str | None = None
    """None: the largest the memory preflight allows (found here); "auto": train.py's own choice."""
    global_batch: int | None = None
    """global_batch_size (accumulation makes it up); None: one micro-batch a step."""


VARIANTS = {
    "tiny": Variant("tiny", "tiny", "auto", False, 40, micro_batch=8),
    # production.json's micro-batch, compiled, one micro-batch a step.
    "1.2b-production-mb4": Variant("1.2b-production-mb4", "1.2b", True, False, 40, micro_batch=4),
    # per_device_train_batch_size "auto": train.py picks the micro-batch; 4 of them a step at 8.
    "1.2b-compiled-auto": Variant("1.2b-compiled-auto", "1.2b", True, False, 25, micro_batch="auto", global_batch=32),
    "1.2b-eager": Variant("1.2b-eager", "1.2b", False, False, 30),
    # The anchor's (../shared/bench/gpu_anchor_bench.py) micro-batch, for a like-for-like comparison.
    "1.2b-compiled-mb8": Variant("1.2b-compiled-mb8", "1.2b", True, False, 40, micro_batch=8),
    "1.2b-eager-mb8": Variant("1.2b-eager-mb8", "1.2b", False, False, 30, micro_batch=8),
    "1.2b-compiled": Variant("1.2b-compiled", "1.2b", True, False, 40),
    "1.2b-compiled-ac": Variant("1.2b-compiled-ac", "1.2b", True, True, 25),
    "1.2b-eager-ac": Variant("1.2b-eager-ac", "1.2b", False, True, 20),
    # --smoke: a few steps of the tiny preset at the micro-batch the preflight picks (CPU or GPU).
    "tiny-smoke": Variant("tiny-smoke", "tiny", "auto", False, 6),
}
DEFAULT_VARIANTS = ("tiny,1.2b-compiled-mb8,1.2b-production-mb4,1.2b-compiled-auto,1.2b-eager-mb8,1.2b-compiled,"
                    "1.2b-eager,1.2b-compiled-ac,1.2b-eager-ac")
SMOKE_DEFAULTS = {"variants": "tiny-smoke", "max_micro_batch": 2, "log_every": 2, "skip_windows": 1,
                  "budget_s": 60, "shard_tokens": 2**15}


def environment() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "device_count": torch.cuda.device_count()}
    for package in ("transformers", "accelerate"):
        info[package] = __import__(package).__version__
    if shutil.which("nvidia-smi"):
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip().splitlines()[0]
    return info


def make_shards(folder: Path, vocab_size: int, tokens: int, shards: int = 4) -> None:
    """Random-token shards: the model's speed does not depend on what the tokens are."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(shards):
        np.savez(folder / f"tokenized_{index:05d}.npz",
                 input_ids=generator.integers(0, vocab_size, tokens, dtype=np.int32))


def largest_micro_batch(values: dict, limit: int, device: torch.device) -> int:
    """The largest micro-batch (<= limit) the memory preflight lets through on this device."""
    for micro_batch in range(limit, 0, -1):
        try:
            check_memory(config_from_dict({**values, "per_device_train_batch_size": micro_batch}, "bench"), device, 1)
            return micro_batch
        except ConfigError:
            continue
    return 1


class MemoryPoller:
    """Highest GPU memory nvidia-smi shows for processes other than this one while a run lasts (train.py's
    CUDA context and caching allocator included)."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            result = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                     "--format=csv,noheader,nounits"], capture_output=True, text=True)
            if result.returncode == 0:
                rows = [line.split(",") for line in result.stdout.strip().splitlines() if "," in line]
                used = sum(int(mib) for pid, mib in rows if int(pid) != os.getpid() and mib.strip().isdigit())
                self.peak_mib = max(self.peak_mib, used)

    def __enter__(self) -> "MemoryPoller":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def training_windows(metrics: Path) -> list[dict]:
    """The complete training lines of metrics.jsonl so far (validation lines and a half-written last line left out)."""
    if not metrics.is_file():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [record for record in records if "tokens_per_sec" in record]


def speed_line(output: str) -> str | None:
    """What train.py's `Speed:` start-up log line says (without its timestamp), or None when it did not log one."""
    matches = (SPEED_LINE.match(line) for line in output.splitlines())
    return next((match.group(1) for match in matches if match), None)


def keep_stderr_tail(output: str, path: Path) -> None:
    """The last lines of a run's stderr where they come back from a lent machine, to diagnose a failed run."""
    path.write_text("\n".join(output.splitlines()[-STDERR_TAIL_LINES:]) + "\n")


def run_variant(variant: Variant, micro_batch: int | str, work: Path, out: Path, env: dict, log_every: int, skip: int,
                timeout: float) -> dict:
    """One train.py run, stopped (SIGKILL) once it has logged `variant.steps` steps: it never reaches a
    save, so no time goes into writing a 17 GB checkpoint that is not what is measured. Its stderr's tail goes
    to `out`."""
    folder = work / f"{variant.name}-mb{micro_batch}"
    folder.mkdir()
    values = {"model_preset": variant.preset, "data": str(work / f"data-{variant.preset}"),
              "max_steps": 1_000_000, "per_device_train_batch_size": micro_batch, "warmup_steps": 5,
              "save_steps": 1_000_000, "logging_steps": log_every, "compile": variant.compile,
              "activation_checkpointing": variant.activation_checkpointing,
              "checkpoint_dir": str(folder / "checkpoints"), "log_dir": str(folder / "logs"),
              **({"global_batch_size": variant.global_batch} if variant.global_batch else {})}
    (folder / "config.json").write_text(json.dumps(values))
    metrics, stderr_path = folder / "logs" / "metrics.jsonl", folder / "stderr.txt"
    wanted_windows = variant.steps // log_every
    started = time.perf_counter()
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(folder / "config.json")]
    with MemoryPoller() as memory, open(stderr_path, "w") as stderr:
        # Its own process group: the kill reaches the compile workers too.
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                   start_new_session=True)
        while (process.poll() is None and len(training_windows(metrics)) < wanted_windows
               and time.perf_counter() - started < timeout):
            time.sleep(0.5)
        finished_alone, timed_out = process.poll() is not None, time.perf_counter() - started >= timeout
        if not finished_alone:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = stderr_path.read_text(errors="replace")
    keep_stderr_tail(output, out / f"{folder.name}.stderr.txt")
    chosen = re.search(r"Micro-batch: (\d+) \(per_device_train_batch_size \"auto\"", output)
    row = {"variant": variant.name, "micro_batch": int(chosen.group(1)) if chosen else micro_batch,
           "compile": variant.compile,
           "activation_checkpointing": variant.activation_checkpointing, "wall_s": time.perf_counter() - started,
           "peak_memory_gib_nvidia_smi": memory.peak_mib / 1024 if memory.peak_mib else None}
    records = training_windows(metrics)
    windows = records[skip:]
    if finished_alone or not windows:  # train.py died (it never ends by itself here), or too slow to measure
        tail = output.strip().splitlines()[-5:]
        row["error"] = (f"timed out after {timeout:.0f} s; " if timed_out else "") + " | ".join(tail)[-600:]
        row["out_of_memory"] = "out of memory" in output.lower() or "OutOfMemoryError" in output
        return row
    row.update(tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in windows),
               mfu=statistics.median(r["mfu"] for r in windows) if windows[0]["mfu"] is not None else None,
               windows=len(windows), final_loss=records[-1]["loss"],
               peak_memory_gib_train=max((r["gpu_memory_gib"] for r in records
                                          if r.get("gpu_memory_gib") is not None), default=None),
               speed_line=speed_line(output))
    if timed_out:
        row["note"] = f"stopped by the time limit after {len(records)} of {wanted_windows} windows"
    return row


def time_left(budget_s: float, start: float) -> float:
    """A started variant may go on up to 120 s past the budget (a 1.2b compile alone takes a minute)."""
    return max(60.0, budget_s + 120 - (time.perf_counter() - start))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=480, help="start no new variant after this many seconds")
    parser.add_argument("--max-micro-batch", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=5, help="train.py's logging_steps (one window)")
    parser.add_argument("--skip-windows", type=int, default=2, help="first windows left out (compile, warm-up)")
    parser.add_argument("--shard-tokens", type=int, default=2**21, help="tokens in each of the 4 random shards")
    parser.add_argument("--anchor", type=Path, help="anchor.json of ../shared/bench/gpu_anchor_bench.py on this card: "
                                                   "train.py's rows are compared with its rows of the same micro-batch")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO_ROOT / "bench" / "gpu_results")))
    return smoke.parse_args(parser, SMOKE_DEFAULTS, argv)


def table(rows: list[dict]) -> list[str]:
    """The Markdown table of the rows, for bench/RESULTS.md."""
    lines = ["| variant | micro-batch | tokens/s | MFU | peak GiB (train.py) | peak GiB (nvidia-smi) | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row.get('micro_batch', '-')} | {row['error'][:120]} | | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        memory = " | ".join(f"{row[key]:.1f}" if row[key] else "-"
                            for key in ("peak_memory_gib_train", "peak_memory_gib_nvidia_smi"))
        lines.append(f"| {row['variant']} | {row['micro_batch']} | {row['tokens_per_sec']:,.0f} | {mfu} | {memory} | "
                     f"{row['wall_s']:.0f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.smoke:
        print("error: no CUDA GPU visible; this benchmark measures the GPU path (--smoke runs on a CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = environment()
    print(json.dumps(info), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        for preset in sorted({VARIANTS[name].preset for name in names}):
            vocab_size = config_from_dict({"model_preset": preset}, "bench").model_shape().vocab_size
            make_shards(work / f"data-{preset}", vocab_size, args.shard_tokens)
        rows = []
        for name in names:
            variant = VARIANTS[name]
            if time.perf_counter() - start > args.budget_s:
                rows.append({"variant": name, "error": "skipped: budget spent", "skipped": True})
                continue
            values = {"model_preset": variant.preset, "activation_checkpointing": variant.activation_checkpointing}
            micro_batch = variant.micro_batch or largest_micro_batch(values, args.max_micro_batch, device)
            row = run_variant(variant, micro_batch, work, args.out, env, args.log_every, args.skip_windows,
                              time_left(args.budget_s, start))
            if row.get("out_of_memory") and isinstance(micro_batch, int) and micro_batch > 1:
                print(json.dumps(row), flush=True)
                row = run_variant(variant, max(1, micro_batch * 3 // 4), work, args.out, env, args.log_every,
                                  args.skip_windows, time_left(args.budget_s, start))
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "gpu_bench.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    gflop = {preset: flops_per_token(config_from_dict({"model_preset": preset}, "bench").model_shape()) / 1e9
             for preset in ("tiny", "1.2b")}
    print(f"\n{info['date']}: {info['device']}, torch {info['torch']} (CUDA {info['cuda']}), transformers "
          f"{info['transformers']}, accelerate {info['accelerate']}")
    print(f"GFLOP per token: 1.2b {gflop['1.2b']:.2f}, tiny {gflop['tiny']:.4f}\n")
    print("\n".join(table(rows)))
    if args.anchor is not None and args.anchor.is_file():
        print("\n" + "\n".join(compare_with_anchor(rows, json.loads(args.anchor.read_text())["rows"])))
    failed = [f"{row['variant']}-mb{row['micro_batch']}" for row in rows if "error" in row and not row.get("skipped")]
    if failed:
        print(f"error: {len(failed)} variant(s) failed: {', '.join(failed)}; their stderr tails are in "
              f"{args.out}/VARIANT-mbN.stderr.txt", file=sys.stderr)
        return 1
    return 0


def compare_with_anchor(rows: list[dict], anchor_rows: list[dict]) -> list[str]:
    """train.py's 1.2b rows against the bare model's rows of the same micro-batch and compile setting
    (the goal: train.py at most 3% slower)."""
    lines = []
    for row in rows:
        if "error" in row or not row["variant"].startswith("1.2b") or row["activation_checkpointing"]:
            continue
        for bare in anchor_rows:
            if ("error" not in bare and bare.get("shape") == "1.2b" and bare["micro_batch"] == row["micro_batch"]
                    and bare["compile"] == bool(row["compile"])):
                lines.append(f"{row['variant']} / anchor {bare['variant']}: {row['tokens_per_sec']:,.0f} / "
                             f"{bare['tokens_per_sec']:,.0f} tokens/s = {row['tokens_per_sec'] / bare['tokens_per_sec']:.3f}")
    return lines or ["no anchor row with the same micro-batch and compile setting to compare with"]


if __name__ == "__main__":
    sys.exit(main())
