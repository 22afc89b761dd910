#!/usr/bin/env python3
"""Watch a training run from another terminal: progress, speed, ETA, checkpoints, uploads and hardware.

    python scripts/monitor_training.py --refresh 3            # live view, Ctrl+C to leave
    python scripts/monitor_training.py --once --config tiny   # one snapshot
    python scripts/monitor_training.py --logs-only            # follow the metrics log

It only reads what train.py writes: <log_dir>/metrics.jsonl (one JSON line per logging step, with
"loss" and the running run's "max_steps", one per validation, with "eval_loss", and lines with an "event":
"start" (with the max_steps of a run that starts or resumes), "save" and "upload" are shown, others skipped),
the checkpoint folders, <checkpoint_dir>/uploads.json and the run lock (.run.lock: a live run holds it).
A line still being written is left for the next refresh. It imports no torch, so that it starts at once.
"""
import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from configs.training_config import ConfigError, load_config  # noqa: E402
from utils.checkpoints.folders import holders_hint, list_checkpoints, subfolders_holding
from utils.display import fmt_bytes, fmt_count, fmt_duration, fmt_loss, fmt_lr
from utils.errors import CheckpointError
from utils.files import read_json
from utils.run_lock import live_run_holder
from utils.uploads.manifest import read_snapshot, upload_label

METRICS_FILE = "metrics.jsonl"
TAIL_BYTES = 256 * 1024
"""How much of the end of metrics.jsonl a snapshot reads: thousands of lines, enough for any rate estimate."""
STALE_AFTER_S = 300
"""No new metrics line for this long while unfinished: the run may have stopped or hung."""


# ---------------------------------------------------------------------------------------------
# Reading metrics.jsonl while it grows
# ---------------------------------------------------------------------------------------------

def is_event(record: dict[str, Any]) -> bool:
    """A line about something that happened rather than a step's numbers: {"event": "start", "step",
    "max_steps"}, {"event": "save", ...}, {"event": "upload", ...}, and maybe other kinds later (read, and skipped
    where not shown)."""
    return isinstance(record.get("event"), str)


def is_training(record: dict[str, Any]) -> bool:
    """A logging step's line: {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s", ...}."""
    return "loss" in record and not is_event(record)


def is_validation(record: dict[str, Any]) -> bool:
    """A validation's line: {"step", "eval_loss", "eval_perplexity", "eval_tokens"}."""
    return "eval_loss" in record and "loss" not in record and not is_event(record)


@dataclass
class MetricsReader:
    """Reads complete lines of metrics.jsonl from where it left off; a half-written last line waits."""

    path: Path
    offset: int = 0
    inode: int | None = None
    restarted: bool = False
    """The last read_new() found the file replaced or truncated (a new run) and read it from the start."""
    bad_lines: int = 0
    """Complete lines that were neither a training, a validation nor an event record (skipped and counted,
    never fatal)."""

    def read_new(self, tail_bytes: int | None = None) -> list[dict[str, Any]]:
        """Records appended since the last call; on the first call, those in the last `tail_bytes`."""
        try:
            stat = self.path.stat()
            size = stat.st_size
            self.restarted = self.inode is not None and (stat.st_ino != self.inode or size < self.offset)
            if self.restarted:
                self.offset = 0
            self.inode = stat.st_ino
            start = max(self.offset, size - tail_bytes) if tail_bytes else self.offset
            with open(self.path, "rb") as handle:
                handle.seek(start)
                data = handle.read(size - start)
        except FileNotFoundError:
            return []
        if start > self.offset and start > 0:  # began mid-file: the first piece is part of an earlier line
            cut = data.find(b"\n") + 1
            start, data = start + cut, data[cut:]
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a line still being written
        self.offset = start + end
        records = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and (is_event(record) or isinstance(record.get("step"), int)
                                             and (is_training(record) or is_validation(record))):
                records.append(record)
            else:
                self.bad_lines += 1
        return records


# ---------------------------------------------------------------------------------------------
# What the numbers say
# ---------------------------------------------------------------------------------------------

def current_segment(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records since the last (re)start: elapsed_s restarts from zero when a run is resumed."""
    start = len(records) - 1
    while start > 0 and records[start - 1].get("elapsed_s", 0) < records[start].get("elapsed_s", 0) \
            and records[start - 1]["step"] < records[start]["step"]:
        start -= 1
    return records[start:]


def seconds_per_step(records: list[dict[str, Any]]) -> float | None:
    """Wall time per optimizer step over the current segment (saves and logging included)."""
    segment = current_segment(records)[-200:]
    if len(segment) >= 2:
        steps = segment[-1]["step"] - segment[0]["step"]
        seconds = segment[-1].get("elapsed_s", 0) - segment[0].get("elapsed_s", 0)
        if steps > 0 and seconds > 0:
            return seconds / steps
    last = records[-1] if records else None
    if last and last.get("tokens_per_sec") and last.get("tokens_seen") and last["step"] > 0:
        return last["tokens_seen"] / last["step"] / last["tokens_per_sec"]
    return None


def is_count(value: Any) -> bool:
    """A positive integer (JSON true is a Python int too, and is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def newest_max_steps(records: list[dict[str, Any]], previous: int | None) -> int | None:
    """The running run's max_steps: that of the newest line among `records` that has one (train.py writes it in
    its start line, when a run starts or resumes, and in every training line), else `previous` (None in older
    logs)."""
    for record in reversed(records):
        if is_count(record.get("max_steps")):
            return record["max_steps"]
    return previous


def eta_seconds(records: list[dict[str, Any]], max_steps: int | None) -> float | None:
    if not records or max_steps is None:
        return None
    per_step = seconds_per_step(records)
    return None if per_step is None else max(0, max_steps - records[-1]["step"]) * per_step


def has_mfu(record: dict[str, Any]) -> bool:
    """train.py logs "mfu" as a fraction of the accelerator's peak, or null when it does not know the peak."""
    return isinstance(record.get("mfu"), (int, float))


def fmt_mfu(value: float) -> str:
    return f"{value:.1%}"


@dataclass
class RunView:
    """Everything one refresh shows; built from files, rendered as text."""

    log_dir: Path
    checkpoint_dir: Path
    max_steps: int | None
    """--max-steps, else the config's or the newest checkpoint's: the run's own (in its log) goes first unless
    max_steps_given."""
    max_steps_source: str
    max_steps_given: bool = False
    """--max-steps was passed: it wins over the run's log."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Training lines only (those with "loss")."""
    logged_max_steps: int | None = None
    """The max_steps of the newest line that has one (a start or a training line): the running run's."""
    run_holder: str | None = None
    """"pid N on HOST, since ..." while a live process holds the run lock of the checkpoint or log folder."""
    validations: list[dict[str, Any]] = field(default_factory=list)
    """Validation lines (those with "eval_loss")."""
    last_save: dict[str, Any] | None = None
    """The newest {"event": "save", "step", "checkpoint", "bytes", "seconds_blocked", "seconds_writing"}."""
    last_upload: dict[str, Any] | None = None
    """The newest {"event": "upload", "checkpoint", "bytes", "seconds", "mb_per_s", "streams", "queue"}."""
    bad_lines: int = 0
    metrics_age_s: float | None = None


def run_max_steps(view: RunView) -> tuple[int | None, str]:
    """max_steps and where it came from: --max-steps, else the running run's (a resume may have changed it
    from the config's), else the config's or the newest checkpoint's."""
    logged = None if view.max_steps_given else view.logged_max_steps
    if logged is not None:
        return logged, "the run's log"
    return view.max_steps, view.max_steps_source


def elsewhere(folder: Path, holds: Callable[[Path], bool], option: str, folder_field: str) -> str:
    """"; DIR holds some: pass OPTION DIR or --config NAME" for the subfolders of `folder` holding what it
    lacks (logs/tiny and checkpoints/tiny after the quick start), or "" when none does."""
    try:
        holders = subfolders_holding(folder, holds)
    except OSError:  # a folder that does not exist (yet) or cannot be read has no subfolders to point at
        return ""
    return f"; {holders_hint(holders, option, folder_field)}" if holders else ""


def metrics_elsewhere(log_dir: Path) -> str:
    """Where metrics are when `log_dir` has no metrics.jsonl: its subfolders that hold one."""
    if (log_dir / METRICS_FILE).exists():
        return ""
    return elsewhere(log_dir, lambda sub: (sub / METRICS_FILE).is_file(), "--log-dir", "log_dir")


def run_holder(checkpoint_dir: Path, log_dir: Path) -> str | None:
    """Who holds the run lock, in the checkpoint folder or else the log folder (a run locks both), while alive."""
    return live_run_holder(checkpoint_dir) or live_run_holder(log_dir)


def render_run(view: RunView) -> list[str]:
    lines = [f"🏃 Running: {view.run_holder}"] if view.run_holder is not None else []
    max_steps, max_steps_source = run_max_steps(view)
    metrics_path = view.log_dir / METRICS_FILE
    if not view.records:
        hint = metrics_elsewhere(view.log_dir)
        lines.append(f"⏳ No metrics in {metrics_path}{hint}" if hint
                     else f"⏳ No metrics yet in {metrics_path} (training has not logged a step)")
    else:
        last = view.records[-1]
        step = last["step"]
        total = f" / {max_steps:,}" if max_steps else ""
        percent = f" ({step / max_steps:.1%})" if max_steps else ""
        reached = max_steps is not None and step >= max_steps
        # A live run is not finished, even past the max_steps known here: a run resumed towards more steps holds
        # its lock from the start, and writes its own max_steps only once it starts training.
        finished = reached and view.run_holder is None
        status = "   ✅ finished" if finished else ("   🏃 still running" if reached else "")
        lines.append(f"🔢 Step: {step:,}{total}{percent}   epoch {last.get('epoch', 'n/a')}{status}")
        lines.append(f"💥 Loss: {fmt_loss(last.get('loss'))}   📈 LR: {fmt_lr(last.get('lr'))}   "
                     f"grad norm: {last.get('grad_norm', float('nan')):.3f}")
        speed = last.get("tokens_per_sec")
        mfu = f"   MFU: {fmt_mfu(last['mfu'])}" if has_mfu(last) else ""
        memory = last.get("gpu_memory_gib")  # null on the CPU
        memory_text = f"   GPU memory (peak): {memory:.1f} GiB" if isinstance(memory, (int, float)) else ""
        lines.append(f"⚡ Tokens/s: {f'{speed:,.0f}' if speed else 'n/a'}{mfu}   "
                     f"tokens seen: {fmt_count(last.get('tokens_seen'))}{memory_text}")
        eta = eta_seconds(view.records, max_steps)
        eta_text = "done" if finished else (fmt_duration(eta) if eta is not None and not reached else "n/a")
        source = f" (max steps from {max_steps_source})" if max_steps else " (max steps unknown: pass --config)"
        lines.append(f"⏱️  Elapsed: {fmt_duration(last.get('elapsed_s', 0))}   ETA: {eta_text}{source}")
        if last.get("shards_skipped"):
            lines.append(f"⚠️  Shards skipped: {last['shards_skipped']}")
        if view.metrics_age_s is not None:
            age = f"📝 Last log line {fmt_duration(view.metrics_age_s)} ago"
            if view.metrics_age_s > STALE_AFTER_S and not finished:
                age += "  ⚠️  no progress for a while: stopped or stalled?"
            lines.append(age)
    if view.validations:
        lines.append(format_validation_summary(view.validations[-1]))
    if view.bad_lines:
        lines.append(f"⚠️  {view.bad_lines} unreadable line(s) in {metrics_path} skipped")
    return lines


def fmt_number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def fmt_size(value: Any) -> str:
    return fmt_bytes(value) if isinstance(value, (int, float)) else "n/a"


def save_figures(record: dict[str, Any]) -> str:
    """A save event's cost: the checkpoint's size, how long training waited, how long the writing took."""
    return (f"{fmt_size(record.get('bytes'))}, blocked {fmt_number(record.get('seconds_blocked'), '.1f')} s, "
            f"written in {fmt_number(record.get('seconds_writing'), '.1f')} s")


def upload_figures(record: dict[str, Any]) -> str:
    """An upload event's figures: size, rate, parallel streams, and the uploads still queued behind it."""
    return (f"{fmt_size(record.get('bytes'))} at {fmt_number(record.get('mb_per_s'), ',.0f')} MB/s, "
            f"{fmt_number(record.get('streams'), '.0f')} streams, {fmt_number(record.get('queue'), '.0f')} queued")


def latest_event(records: list[dict[str, Any]], kind: str, previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest line with "event": kind among `records`, else `previous` (the one seen at an earlier refresh)."""
    found = [record for record in records if record.get("event") == kind]
    return found[-1] if found else previous


def render_events(view: RunView) -> list[str]:
    lines = []
    if view.last_save is not None:
        lines.append(f"💾 Last save: {view.last_save.get('checkpoint', 'n/a')} at step "
                     f"{fmt_number(view.last_save.get('step'), ',.0f')}, {save_figures(view.last_save)}")
    if view.last_upload is not None:
        lines.append(f"☁️  Last upload: {view.last_upload.get('checkpoint', 'n/a')}, "
                     f"{upload_figures(view.last_upload)}")
    return lines


def format_validation_summary(record: dict[str, Any]) -> str:
    return (f"📏 Validation at step {record['step']:,}: loss {fmt_number(record.get('eval_loss'), '.4f')}, "
            f"perplexity {fmt_number(record.get('eval_perplexity'), '.2f')}")


def render_checkpoints(checkpoint_dir: Path, shown: int = 3) -> list[str]:
    found = list_checkpoints(checkpoint_dir)
    if not found:
        return [f"💾 No checkpoints yet in {checkpoint_dir}"
                + elsewhere(checkpoint_dir, lambda sub: bool(list_checkpoints(sub)), "--checkpoint-dir",
                            "checkpoint_dir")]
    manifest = read_snapshot(checkpoint_dir)
    lines = [f"💾 Checkpoints: {len(found)} in {checkpoint_dir}, newest last"]
    for info in found[-shown:]:
        lines.append(f"   {info.name:<40} upload: {upload_label(manifest, info.name)}")
    if manifest is not None and manifest.problem:
        lines.append(f"⚠️  Upload state unknown: {manifest.problem}")
    elif manifest is not None:
        pending, failed = manifest.names_in("queued", "uploading"), manifest.names_in("failed")
        lines.append(f"☁️  Uploads to {manifest.destination}: {len(pending)} pending, {len(failed)} failed"
                     + (f" ({', '.join(failed)})" if failed else ""))
    return lines


# ---------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------

def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def system_lines(checkpoint_dir: Path) -> list[str]:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(existing_ancestor(checkpoint_dir)))
    line = (f"🖥️  CPU: {psutil.cpu_percent():.0f}% of {psutil.cpu_count()} cores   "
            f"RAM: {fmt_bytes(memory.used)} / {fmt_bytes(memory.total)} ({memory.percent:.0f}%)   "
            f"Disk (checkpoints): {fmt_bytes(disk.free)} free of {fmt_bytes(disk.total)}")
    return [line + ("  ⚠️  low disk" if disk.percent > 90 else "")]


class GpuProbe:
    """GPU utilization and memory through NVML; says why when there is no GPU to show."""

    def __init__(self) -> None:
        import pynvml
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            self.problem: str | None = None
        except pynvml.NVMLError as error:
            self.problem = str(error)

    def lines(self) -> list[str]:
        nvml = self.nvml
        if self.problem is not None:
            return [f"🎮 GPU: none visible (NVML: {self.problem})"]
        lines = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                line = (f"🎮 GPU {index} {nvml.nvmlDeviceGetName(handle)}: {utilization.gpu}% busy   "
                        f"memory {fmt_bytes(memory.used)} / {fmt_bytes(memory.total)}")
                try:
                    line += (f"   {nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)}°C   "
                             f"{nvml.nvmlDeviceGetPowerUsage(handle) / 1000:.0f} W")
                except nvml.NVMLError:
                    pass  # temperature and power are not reported on every GPU (e.g. some MIG or vGPU setups)
                lines.append(line)
        except nvml.NVMLError as error:
            lines.append(f"🎮 GPU: NVML error ({error})")
        return lines or ["🎮 GPU: NVML sees no device"]

    def close(self) -> None:
        if self.problem is None:
            self.nvml.nvmlShutdown()


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------

@dataclass
class ElapsedAcrossResumes:
    """--logs-only's elapsed column. train.py's elapsed_s restarts from zero when a run resumes; shown here, it goes
    on: the time trained before the resume (the elapsed_s of the last training line before it) plus the time since."""

    before_s: float = 0.0
    """The training time of the runs before the last resume."""
    last_s: float = 0.0
    """elapsed_s of the newest training line."""
    resumed: bool = False
    """A start line came after the newest training line: the next one counts from zero again."""

    def start(self) -> None:
        self.resumed = True

    def total(self, record: dict[str, Any]) -> float:
        """The time the run has trained, in all, at this training line."""
        elapsed = record.get("elapsed_s", 0)
        if not isinstance(elapsed, (int, float)):
            elapsed = 0
        # Logs of older runs have no start lines: there, an elapsed_s smaller than the previous one is the resume.
        if self.resumed or elapsed < self.last_s:
            self.before_s += self.last_s
        self.resumed, self.last_s = False, elapsed
        return self.before_s + elapsed


def format_start(record: dict[str, Any]) -> str:
    """A start line's row: a run that starts, or resumes (at a step past 0), and its max_steps."""
    step = record.get("step")
    resumed = isinstance(step, int) and step > 0
    return (f"{fmt_number(step, '.0f'):>8} {'resumed' if resumed else 'start'}: "
            f"max steps {fmt_number(record.get('max_steps'), ',.0f')}")


def format_record(record: dict[str, Any], elapsed_s: float | None = None) -> str | None:
    """A row of --logs-only; None for an event it does not show (a kind added after this monitor). `elapsed_s`:
    the time trained in all at a training line (its own elapsed_s when not given)."""
    if is_event(record):
        if record["event"] == "start":
            return format_start(record)
        if record["event"] == "save":
            return (f"{fmt_number(record.get('step'), '.0f'):>8} save: {record.get('checkpoint', 'n/a')}, "
                    f"{save_figures(record)}")
        if record["event"] == "upload":  # no step: it runs beside training, for a checkpoint saved earlier
            return f"{'':>8} upload: {record.get('checkpoint', 'n/a')}, {upload_figures(record)}"
        return None
    if is_validation(record):
        return (f"{record['step']:>8} validation: loss {fmt_number(record.get('eval_loss'), '.6f')}, "
                f"perplexity {fmt_number(record.get('eval_perplexity'), '.2f')}")
    speed = record.get("tokens_per_sec")
    mfu = f" {fmt_mfu(record['mfu']):>6}" if has_mfu(record) else ""
    return (f"{record['step']:>8} {fmt_loss(record.get('loss')):>10} {fmt_lr(record.get('lr')):>9} "
            f"{record.get('grad_norm', float('nan')):>8.3f} {f'{speed:,.0f}' if speed else 'n/a':>10}"
            f" {fmt_duration(record.get('elapsed_s', 0) if elapsed_s is None else elapsed_s):>10}{mfu}")


LOG_HEADER = f"{'step':>8} {'loss':>10} {'lr':>9} {'grad':>8} {'tok/s':>10} {'elapsed':>10}"


def log_rows(records: list[dict[str, Any]], clock: ElapsedAcrossResumes) -> list[str]:
    """The rows of `records`, read in order; `clock` carries the time trained across the calls."""
    rows = []
    for record in records:
        if record.get("event") == "start":
            clock.start()
        row = format_record(record, clock.total(record) if is_training(record) else None)
        if row is not None:
            rows.append(row)
    return rows


def follow_logs(log_dir: Path, lines: int, once: bool, refresh: float) -> int:
    """Prints the last `lines` metrics records, then (unless once) new ones as they arrive. The whole file is read
    (not only its tail): the elapsed column adds up the time of every run before the last resume."""
    reader = MetricsReader(log_dir / METRICS_FILE)
    clock = ElapsedAcrossResumes()
    if not reader.path.exists():
        print((f"⏳ Waiting for {reader.path} (no step logged yet)" if not once
               else f"📝 No metrics yet in {reader.path}") + metrics_elsewhere(log_dir))
    records = reader.read_new()
    print(LOG_HEADER + (f" {'mfu':>6}" if any(has_mfu(record) for record in records) else ""))
    for row in log_rows(records, clock)[-lines:]:
        print(row)
    while not once:
        sys.stdout.flush()
        time.sleep(refresh)
        before = reader.bad_lines
        records = reader.read_new()
        if reader.restarted:  # read again from the start (a resume rewrites the file), and so is the time
            print(f"--- {reader.path} was rewritten: a resume or a new run ---")
            clock = ElapsedAcrossResumes()
        rows = log_rows(records, clock)
        for row in rows[-lines:] if reader.restarted else rows:  # not the whole history again
            print(row)
        if reader.bad_lines > before:
            print(f"⚠️  {reader.bad_lines - before} unreadable line(s) skipped")
    if reader.bad_lines:
        print(f"⚠️  {reader.bad_lines} unreadable line(s) skipped")
    return 0


def snapshot(view: RunView, reader: MetricsReader, gpu: GpuProbe, max_records: int = 5000) -> str:
    new_records = reader.read_new(tail_bytes=TAIL_BYTES)
    if reader.restarted:
        view.records, view.validations, view.last_save, view.last_upload = [], [], None, None
        view.logged_max_steps = None
    view.logged_max_steps = newest_max_steps(new_records, view.logged_max_steps)
    view.run_holder = run_holder(view.checkpoint_dir, view.log_dir)
    view.records = (view.records + [record for record in new_records if is_training(record)])[-max_records:]
    view.validations = (view.validations + [record for record in new_records if is_validation(record)])[-max_records:]
    view.last_save = latest_event(new_records, "save", view.last_save)
    view.last_upload = latest_event(new_records, "upload", view.last_upload)
    view.bad_lines = reader.bad_lines
    try:
        view.metrics_age_s = time.time() - reader.path.stat().st_mtime
    except FileNotFoundError:
        view.metrics_age_s = None
    lines = [f"🚀 Training monitor — {time.strftime('%Y-%m-%d %H:%M:%S')}   logs: {view.log_dir}", "=" * 78]
    lines += render_run(view)
    lines.append("-" * 78)
    lines += render_checkpoints(view.checkpoint_dir) + render_events(view)
    lines.append("-" * 78)
    lines += system_lines(view.checkpoint_dir) + gpu.lines()
    lines.append(f"📈 TensorBoard: tensorboard --logdir {tensorboard_dir(view.log_dir)}")
    return "\n".join(lines)


def tensorboard_dir(log_dir: Path) -> Path:
    """The folder of train.py's TensorBoard events, <log_dir>/<project_name>; until it exists (or when the runs
    are in subfolders, as logs/tiny after the quick start), log_dir itself: tensorboard searches it recursively."""
    found = sorted(log_dir.glob("*/events.out.tfevents.*"))
    return found[0].parent if found else log_dir


def watch(view: RunView, once: bool, refresh: float) -> int:
    reader = MetricsReader(view.log_dir / METRICS_FILE)
    gpu = GpuProbe()
    clear = sys.stdout.isatty() and not once
    psutil.cpu_percent()  # starts the CPU measurement window; the first snapshot then shows a real figure
    try:
        if once:
            time.sleep(0.2)
        while True:
            text = snapshot(view, reader, gpu)
            print(("\033[2J\033[H" if clear else "") + text, flush=True)
            if once:
                return 0
            print(f"\n(refreshing every {refresh:g}s; Ctrl+C to exit)", flush=True)
            time.sleep(refresh)
    finally:
        gpu.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def latest_max_steps(checkpoint_dir: Path) -> tuple[int | None, str]:
    """max_steps of the newest checkpoint's training_config.json, when no config was named."""
    found = list_checkpoints(checkpoint_dir)
    if not found:
        return None, "unknown"
    try:
        value = read_json(found[-1].path / "training_config.json").get("max_steps")
    except (CheckpointError, AttributeError):
        return None, "unknown"
    return (value, f"{found[-1].name}/training_config.json") if isinstance(value, int) else (None, "unknown")


def build_view(args: argparse.Namespace) -> RunView:
    log_dir, checkpoint_dir, max_steps, source = Path("logs"), Path("checkpoints"), None, "unknown"
    if args.config is not None:
        config = load_config(args.config).with_repo_paths()  # like train.py: relative to the repo root
        log_dir, checkpoint_dir = Path(config.log_dir), Path(config.checkpoint_dir)
        max_steps, source = config.max_steps, f"config {args.config}"
    log_dir = Path(args.log_dir) if args.log_dir else log_dir
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else checkpoint_dir
    if args.max_steps is not None:
        max_steps, source = args.max_steps, "--max-steps"
    elif max_steps is None:
        max_steps, source = latest_max_steps(checkpoint_dir)
    return RunView(log_dir, checkpoint_dir, max_steps, source, max_steps_given=args.max_steps is not None)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Live view of a training run: progress, loss, speed, ETA, "
                                                 "checkpoints, uploads, CPU/RAM/disk and GPU.")
    parser.add_argument("--refresh", type=positive_float, default=5.0, metavar="SECONDS",
                        help="seconds between refreshes (default 5)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--logs-only", action="store_true",
                        help="only the metrics log: its last lines, then new ones as they arrive; a validation "
                             "line shows as 'STEP validation: loss L, perplexity P', a save as 'STEP save: ...', "
                             "an upload as 'upload: ...', a start as 'STEP start: max steps N' ('resumed' past "
                             "step 0); the elapsed column goes on across resumes")
    parser.add_argument("--lines", type=positive_int, default=20,
                        help="log lines (training, validation, start, save and upload) shown by --logs-only "
                             "(default 20)")
    parser.add_argument("--config", help="training config (name or path) giving log_dir, checkpoint_dir and (when "
                                         "the log does not) max_steps")
    parser.add_argument("--log-dir", help="folder holding metrics.jsonl (default: logs, or the config's log_dir)")
    parser.add_argument("--checkpoint-dir",
                        help="folder holding the checkpoints (default: checkpoints, or the config's checkpoint_dir)")
    parser.add_argument("--max-steps", type=positive_int,
                        help="the run's max_steps, for progress and ETA (default: the run's own, from its metrics "
                             "log; in older logs, from --config or the newest checkpoint)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A process started in the background by a non-interactive shell inherits an ignored SIGINT; restore
    # Ctrl+C so that it always stops the monitor cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        view = build_view(args)
        if args.once and not view.log_dir.is_dir() and not view.checkpoint_dir.is_dir():
            raise ConfigError(f"nothing to show: neither {view.log_dir} nor {view.checkpoint_dir} exists "
                              "(pass --config, or --log-dir and --checkpoint-dir)")
        if args.logs_only:
            return follow_logs(view.log_dir, args.lines, args.once, args.refresh)
        return watch(view, args.once, args.refresh)
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n👋 Monitor stopped.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
