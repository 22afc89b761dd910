#!/usr/bin/env python3
"""Look inside the checkpoints a run wrote: list, view, compare and plot.

    python scripts/checkpoint_viewer.py list [--remote]
    python scripts/checkpoint_viewer.py view checkpoint-epoch0-step50-files0
    python scripts/checkpoint_viewer.py compare checkpoint-epoch0-step50-files0 latest
    python scripts/checkpoint_viewer.py plot latest --save training_plot.png

It only reads: metadata.json, training_metrics.json and training_config.json of each checkpoint,
<checkpoint_dir>/uploads.json (the upload state the background uploader records) and, for plot's validation
curve, <log_dir>/metrics.jsonl. It writes only plot's PNG (by default into <checkpoint_dir>/plots/).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.training_config import ConfigError, TrainingConfig, load_config  # noqa: E402
from utils.checkpoints.folders import (
    CheckpointInfo,
    find_checkpoint,
    holders_hint,
    list_checkpoints,
    parse_checkpoint_name,
    subfolders_holding,
)
from utils.display import fmt_count, fmt_duration, fmt_loss, fmt_lr, fmt_time, fmt_value
from utils.errors import CheckpointError
from utils.files import read_json
from utils.train_state import TrainingMetrics
from utils.uploads.manifest import MANIFEST_NAME, ManifestSnapshot, read_snapshot, upload_label

TREND_ARROWS = {"improving": "↓", "worsening": "↑", "flat": "→"}
RULE = "=" * 78
METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
"""plot's default folder, inside checkpoint_dir (its name is no checkpoint's, so list and view ignore it)."""
TRAINING_SUMMARY = ("current_avg_loss", "steps_since_best", "loss_trend")
"""The keys of metadata.json's validation_metrics that are training numbers (TrainingMetrics.summary; the rest
are validation results): view shows each under its own heading."""


# ---------------------------------------------------------------------------------------------
# Reading what training wrote
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint's JSON files, read and checked."""

    info: CheckpointInfo
    metadata: dict[str, Any]
    metrics: TrainingMetrics | None
    """From training_metrics.json (the full history); None when that file is missing or unreadable."""
    metrics_problem: str | None
    """Why `metrics` is None, shown to the user, who then sees statistics of metadata.json's shorter history."""
    validation_history: list[Any] | None
    """training_metrics.json's "validation_history" ([{"step", "eval_loss", ...}]) where train.py keeps one;
    its validation_metrics holds only the latest validation."""

    @property
    def losses(self) -> list[float]:
        if self.metrics is not None:
            return [entry["loss"] for entry in self.metrics.loss_history]
        return list(self.metadata.get("loss_history") or [])

    @property
    def learning_rates(self) -> list[float]:
        if self.metrics is not None:
            return [entry["lr"] for entry in self.metrics.learning_rates]
        return list(self.metadata.get("learning_rates") or [])

    @property
    def validation(self) -> dict[str, Any]:
        """metadata.json's validation_metrics: training-loss statistics, and with validation on, the latest and
        the best validation (best_eval_loss, best_eval_step)."""
        block = self.metadata.get("validation_metrics")
        return block if isinstance(block, dict) else {}

    @property
    def validation_results(self) -> dict[str, Any]:
        """The validation numbers of metadata.json's validation_metrics (eval_loss, eval_perplexity, eval_tokens,
        eval_step, best_eval_loss, best_eval_step): the block without its training-loss statistics."""
        return {key: value for key, value in self.validation.items() if key not in TRAINING_SUMMARY}

    @property
    def best_from_validation(self) -> bool:
        """A run that validates makes best_loss its best validation loss (train.py); else the best training loss."""
        return self.validation.get("best_eval_loss") is not None

    @property
    def current_loss(self) -> float | None:
        losses = self.losses
        return losses[-1] if losses else self.metadata.get("current_loss")

    @property
    def current_lr(self) -> float | None:
        rates = self.learning_rates
        return rates[-1] if rates else None

    @property
    def tokens_seen(self) -> int | None:
        return self.metadata.get("training_progress", {}).get("tokens_seen")

    @property
    def timestamp(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.metadata["timestamp"])
        except (KeyError, TypeError, ValueError):
            return None


def load_record(info: CheckpointInfo) -> CheckpointRecord:
    """Reads a checkpoint's metadata.json (required) and training_metrics.json (optional, reported if absent)."""
    metadata = read_json(info.path / "metadata.json")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("step"), int):
        raise CheckpointError(f"{info.path / 'metadata.json'}: not a checkpoint metadata file (no integer 'step')")
    metrics, problem, history = None, None, None
    try:
        state = read_json(info.path / "training_metrics.json")
        if not isinstance(state, dict):
            raise CheckpointError(f"{info.path / 'training_metrics.json'}: expected a JSON object")
        metrics = TrainingMetrics()
        metrics.load_state_dict(state)
        history = state.get("validation_history") if isinstance(state.get("validation_history"), list) else None
    except CheckpointError as error:
        problem = str(error)
    return CheckpointRecord(info, metadata, metrics, problem, history)


def read_jsonl(path: Path) -> Iterator[Any]:
    """The JSON values of a .jsonl file's lines; a line that is not JSON (the one being written) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def validation_points(entries: Iterable[Any], up_to_step: int) -> list[tuple[int, float]]:
    """(step, eval_loss) of the validation records among `entries` up to a checkpoint's step, oldest first. A
    step seen twice keeps its last record: a run resumed from an earlier checkpoint logs the steps after it again."""
    by_step: dict[int, float] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "loss" in entry:  # "loss": a training line
            continue
        step, loss = entry.get("step"), entry.get("eval_loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and step <= up_to_step:
            by_step[step] = float(loss)
    return sorted(by_step.items())


def validation_history(record: CheckpointRecord, log_dir: Path) -> tuple[list[tuple[int, float]], str]:
    """The validation losses up to the checkpoint and the file they came from (or, without any, why): the
    checkpoint's own history where train.py keeps one, else the eval_loss lines of <log_dir>/metrics.jsonl."""
    recorded = validation_points(record.validation_history or [], record.info.step)
    if recorded:
        return recorded, str(record.info.path / "training_metrics.json")
    path = log_dir / METRICS_FILE
    try:
        logged = validation_points(read_jsonl(path), record.info.step)
    except OSError as error:
        return [], f"{path}: {error.strerror or error}"
    return (logged, str(path)) if logged else ([], f"no validation lines in {path}")


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def best_loss_line(record: CheckpointRecord) -> str:
    """The best loss, named for what it is: the best validation loss when the run validates, else the best
    training loss (the current loss shown above it is always a training loss)."""
    if record.best_from_validation:
        return (f"🏆 Best validation loss (step {record.validation.get('best_eval_step', 'n/a')}): "
                f"{fmt_loss(record.validation['best_eval_loss'])}")
    best = record.metadata.get("best_loss")
    if best is None:  # a run that validates but had not yet when it saved this checkpoint
        return "🏆 Best loss: n/a"
    step = record.metrics.best_step if record.metrics is not None else None
    return f"🏆 Best training loss{f' (step {step})' if step is not None else ''}: {fmt_loss(best)}"


def trend_label(record: CheckpointRecord) -> str:
    if record.metrics is not None:
        trend = record.metrics.loss_trend()
    else:
        trend = record.validation.get("loss_trend", "insufficient data")
    arrow = TREND_ARROWS.get(trend)
    return f"{arrow} {trend}" if arrow else str(trend)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def no_checkpoints_message(checkpoint_dir: Path) -> str:
    """Why there is nothing to show in an existing folder, with the subfolders that do hold checkpoints."""
    try:
        holders = subfolders_holding(checkpoint_dir, lambda sub: bool(list_checkpoints(sub)))
    except OSError as error:
        return f"cannot read {checkpoint_dir}: {error.strerror or error}"
    message = f"no checkpoints in {checkpoint_dir}"
    if not holders:
        return message + " (pass --checkpoint-dir or --config to look elsewhere)"
    return f"{message}; {holders_hint(holders, '--checkpoint-dir', 'checkpoint_dir')}"


def require_folder(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint_dir} does not exist "
                              "(pass --checkpoint-dir or --config)")


def require_checkpoints(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """The folder's checkpoints; an existing folder without any is an error too (naming subfolders that hold some)."""
    require_folder(checkpoint_dir)
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointError(no_checkpoints_message(checkpoint_dir))
    return found


def cmd_list(checkpoint_dir: Path, remote: bool, credentials: str | None = None) -> int:
    require_folder(checkpoint_dir)
    found = list_checkpoints(checkpoint_dir)
    manifest = read_snapshot(checkpoint_dir)
    if not found and not (remote and manifest is not None and manifest.destination):
        raise CheckpointError(no_checkpoints_message(checkpoint_dir))
    if not found:  # --remote: the destination may still hold this folder's checkpoints
        print(f"📁 No local checkpoints in {checkpoint_dir}")
    else:
        print(f"📁 Found {len(found)} checkpoint{'s' if len(found) != 1 else ''} in {checkpoint_dir}:")
        print(RULE)
        for index, info in enumerate(found, 1):
            try:
                record = load_record(info)
            except CheckpointError as error:
                print(f"{index:2d}. {info.name:<38} ⚠️  {error}")
                continue
            print(f"{index:2d}. {info.name:<38} Step: {info.step:<6} Loss: {fmt_loss(record.current_loss):<10} "
                  f"Time: {fmt_time(record.timestamp)}   Upload: {upload_label(manifest, info.name)}")
    if manifest is not None and manifest.problem:
        print(f"⚠️  Upload state unknown: {manifest.problem}")
    return list_remote(checkpoint_dir, manifest, {info.name for info in found}, credentials) if remote else 0


def list_remote(checkpoint_dir: Path, manifest: ManifestSnapshot | None, local_names: set[str],
                credentials: str | None) -> int:
    """The checkpoints at the upload destination recorded in uploads.json."""
    if manifest is None or not manifest.destination:
        reason = manifest.problem if manifest is not None and manifest.problem else \
            f"{checkpoint_dir / MANIFEST_NAME} does not exist yet; the uploader writes it at the first upload"
        raise CheckpointError(f"--remote: no upload destination known ({reason})")
    try:
        from utils.display import fmt_bytes
        from utils.storage import open_storage
        from utils.storage.base import StorageError
        from utils.uploads.destination import checkpoint_bytes
        from utils.uploads.formats import split_archive_name
    except ImportError as error:
        raise CheckpointError(f"--remote: remote listing unavailable (cannot import utils.storage: {error})") from None
    try:
        # Short timeouts unless set in the environment: a viewer should answer in seconds, not wait out
        # training's patient retries.
        storage = open_storage(manifest.destination, credentials,
                               timeout_s=float(os.environ.get("GCS_TIMEOUT_S", "10")),
                               retry_deadline_s=float(os.environ.get("GCS_RETRY_DEADLINE_S", "20")))
        # Both layouts: <name>.files.json (sized by the files it lists) and <name>.tar* archives.
        objects = [(item, split[0], checkpoint_bytes(storage, item)) for item in storage.list("checkpoint-*")
                   if (split := split_archive_name(item.name)) is not None]
    except (StorageError, CheckpointError) as error:
        raise CheckpointError(f"--remote: cannot list {manifest.destination}: {error}") from None

    def step_of(name: str) -> int:
        parsed = parse_checkpoint_name(name)
        return parsed[1] if parsed else -1

    objects = sorted(objects, key=lambda entry: (step_of(entry[1]), entry[0].name))
    print()
    print(f"☁️  {len(objects)} remote checkpoint{'s' if len(objects) != 1 else ''} in {manifest.destination}:")
    print(RULE)
    for index, (item, name, size) in enumerate(objects, 1):
        print(f"{index:2d}. {item.name:<46} Step: {step_of(name):<6} Size: {fmt_bytes(size):<10} "
              f"Local: {'yes' if name in local_names else 'no'}")
    return 0


def cmd_view(checkpoint_dir: Path, name: str) -> int:
    require_checkpoints(checkpoint_dir)
    record = load_record(find_checkpoint(checkpoint_dir, name))
    meta = record.metadata
    progress, system = meta.get("training_progress", {}), meta.get("system_info", {})
    losses, rates = record.losses, record.learning_rates

    print(f"\n📊 Checkpoint Summary: {record.info.name}")
    print("=" * 60)
    print(f"📅 Timestamp: {meta.get('timestamp', 'n/a')}")
    print(f"🔢 Step: {meta['step']}")
    print(f"🔄 Epoch: {meta.get('epoch', record.info.epoch)}")
    print(f"📁 Files Processed: {progress.get('files_processed', record.info.files)}")
    print(f"🔤 Tokens Seen: {fmt_count(record.tokens_seen)}")
    print(f"🖥️  CUDA Available: {system.get('cuda_available', 'n/a')}")
    print(f"🎮 GPU Count: {system.get('device_count', 'n/a')} ({system.get('device_name', 'n/a')}, "
          f"{system.get('num_processes', 'n/a')} process(es))")
    print(f"⚡ Mixed Precision: {system.get('mixed_precision', 'n/a')}")
    print(f"☁️  Upload: {upload_label(read_snapshot(checkpoint_dir), record.info.name, detailed=True)}")

    # metadata.json keeps training statistics and validation results in one block (validation_metrics): each
    # number goes under its own heading. steps_since_best counts from the best shown, training or validation.
    summary = record.validation
    steps_since_best = summary.get("steps_since_best")
    since_best = f"⏳ Steps Since Best: {steps_since_best if steps_since_best is not None else 'n/a'}"
    print("\n📈 Training Metrics:")
    print("-" * 30)
    if record.metrics_problem:
        print(f"⚠️  {record.metrics_problem}; statistics below use metadata.json's last {len(losses)} losses")
    print(f"💥 Current training loss: {fmt_loss(record.current_loss)}")
    if "current_avg_loss" in summary:
        print(f"📉 Recent Average Loss (last 10 logged): {fmt_loss(summary['current_avg_loss'])}")
    if not record.best_from_validation:
        print(best_loss_line(record))
        print(since_best)
    print(f"📊 Loss History Length: {len(losses)}")
    print(f"📉 Average Loss: {fmt_loss(statistics.fmean(losses) if losses else None)}")
    print(f"📊 Loss Std Dev: {fmt_loss(statistics.stdev(losses) if len(losses) > 1 else None)}")
    print(f"🔄 Loss Trend: {trend_label(record)}")
    print(f"📈 Current LR: {fmt_lr(record.current_lr)}")
    print(f"📊 LR History Length: {len(rates)}")
    if record.metrics is not None and record.metrics.shards_skipped:
        print(f"⚠️  Shards Skipped: {record.metrics.shards_skipped}")

    print("\n🎯 Validation Metrics:")
    print("-" * 30)
    if record.best_from_validation:
        print(best_loss_line(record))
        print(since_best)
    shown_above = ("best_eval_loss", "best_eval_step") if record.best_from_validation else ()
    for key, value in record.validation_results.items():
        if key not in shown_above:
            print(f"  {key}: {fmt_value(value)}")
    if not record.validation_results:
        print("  (none recorded)")
    return 0


def cmd_compare(checkpoint_dir: Path, names: Sequence[str]) -> int:
    require_checkpoints(checkpoint_dir)
    infos = {info.name: info for info in (find_checkpoint(checkpoint_dir, name) for name in names)}
    if len(infos) < 2:
        raise CheckpointError("compare needs at least two different checkpoints")
    records = sorted((load_record(info) for info in infos.values()), key=lambda r: r.info.step)

    header = (f"{'Checkpoint':<38} {'Step':>7} {'Loss':>10} {'Best':>10} {'LR':>9} {'Tokens':>13} "
              f"{'Time':>19}")
    print(f"\n🔍 Comparing {len(records)} checkpoints (oldest first; Δ = change from the row above)")
    print("=" * len(header))
    print(header)
    print("-" * len(header))
    previous: CheckpointRecord | None = None
    for record in records:
        if previous is not None:
            print(delta_row(previous, record))
        print(f"{record.info.name:<38} {record.info.step:>7} {fmt_loss(record.current_loss):>10} "
              f"{fmt_loss(record.metadata.get('best_loss')):>10} {fmt_lr(record.current_lr):>9} "
              f"{fmt_count(record.tokens_seen):>13} {fmt_time(record.timestamp):>19}")
        previous = record
    first, last = records[0], records[-1]
    first_loss, last_loss = first.current_loss, last.current_loss
    if first_loss is not None and last_loss is not None and first_loss:
        print("-" * len(header))
        print(f"Overall: loss {last_loss - first_loss:+.6f} ({(last_loss - first_loss) / first_loss:+.2%}) "
              f"over {last.info.step - first.info.step} steps")
    return 0


def delta_row(before: CheckpointRecord, after: CheckpointRecord) -> str:
    """The change between two neighbouring checkpoints, with the token rate between their saves."""
    def difference(a: float | None, b: float | None, fmt: str) -> str:
        return "" if a is None or b is None else format(b - a, fmt)

    seconds = (after.timestamp - before.timestamp).total_seconds() \
        if after.timestamp is not None and before.timestamp is not None else None
    tokens = difference(before.tokens_seen, after.tokens_seen, "+,d")
    rate = ""
    if seconds and before.tokens_seen is not None and after.tokens_seen is not None:
        rate = f"  ({(after.tokens_seen - before.tokens_seen) / seconds:,.0f} tok/s between saves)"
    return (f"{'  Δ':<38} {difference(before.info.step, after.info.step, '+d'):>7} "
            f"{difference(before.current_loss, after.current_loss, '+.6f'):>10} "
            f"{difference(before.metadata.get('best_loss'), after.metadata.get('best_loss'), '+.6f'):>10} "
            f"{difference(before.current_lr, after.current_lr, '+.1e'):>9} {tokens:>13} "
            f"{fmt_duration(seconds) if seconds is not None else '':>19}{rate}")


def cmd_plot(checkpoint_dir: Path, name: str, save: Path | None, log_dir: Path) -> int:
    require_checkpoints(checkpoint_dir)
    record = load_record(find_checkpoint(checkpoint_dir, name))
    if record.metrics is None:
        raise CheckpointError(f"cannot plot {record.info.name}: {record.metrics_problem}")
    if not record.metrics.loss_history:
        raise CheckpointError(f"cannot plot {record.info.name}: no losses recorded")
    if save is not None and not save.parent.is_dir():
        raise CheckpointError(f"--save: folder {save.parent} does not exist")
    validations, source = validation_history(record, log_dir)
    if validations:
        print(f"📏 Validation loss from {source} ({len(validations)} point{'s' if len(validations) != 1 else ''})")
    else:
        print(f"📏 No validation history found ({source}): plotting the training loss only "
              "(--log-dir names the folder of the run's metrics.jsonl)")

    import matplotlib
    if save is not None:
        matplotlib.use("Agg")  # writing a file needs no window, and works without a display
    import matplotlib.pyplot as plt
    from matplotlib.backends import BackendFilter, backend_registry
    headless = matplotlib.get_backend().lower() in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)
    if save is None and headless:
        # Beside the checkpoints it shows rather than in whatever folder the command ran from.
        save = checkpoint_dir / PLOTS_DIR / f"{record.info.name}-plot.png"
        try:
            save.parent.mkdir(exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"cannot create {save.parent}: {error.strerror or error}") from None
        print(f"🖥️  No display available: saving the plot to {save} (choose another file with --save)")

    figure = plot_metrics(plt, record, validations)
    if save is None:
        plt.show()
        return 0
    try:
        figure.savefig(save, dpi=100)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"cannot write the plot to {save}: {error}") from None
    print(f"🖼️  Saved plot to {save}")
    return 0


def best_point(record: CheckpointRecord) -> tuple[int, float, str] | None:
    """The best loss as (step, loss, "validation" or "training"): which curve it belongs to."""
    if record.best_from_validation:
        step, loss, kind = record.validation.get("best_eval_step"), record.validation["best_eval_loss"], "validation"
    else:
        assert record.metrics is not None
        step, loss, kind = record.metrics.best_step, record.metrics.best_loss, "training"
    if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
        return step, float(loss), kind
    return None


def plot_metrics(plt: Any, record: CheckpointRecord, validations: list[tuple[int, float]]) -> Any:
    """Training loss (with its running mean) and validation loss, with the best point on the curve it belongs
    to, above the learning rate, against the step."""
    metrics = record.metrics
    assert metrics is not None
    steps = [entry["step"] for entry in metrics.loss_history]
    losses = [entry["loss"] for entry in metrics.loss_history]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    figure.suptitle(f"{record.info.name}  ({fmt_count(record.tokens_seen)} tokens)")

    loss_axis.plot(steps, losses, label="training loss", color="tab:blue", alpha=0.6 if len(losses) > 20 else 1.0)
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        loss_axis.plot(steps, smoothed, label=f"training loss, mean of {window}", color="tab:orange")
    if validations:
        loss_axis.plot([step for step, _ in validations], [loss for _, loss in validations], label="validation loss",
                       color="tab:purple", marker="o", markersize=3)
    best = best_point(record)
    if best is not None:
        step, loss, kind = best
        loss_axis.scatter([step], [loss], color="tab:green", zorder=3, label=f"best {kind} loss {loss:.4f} @ {step}")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()

    lr_axis.plot([entry["step"] for entry in metrics.learning_rates],
                 [entry["lr"] for entry in metrics.learning_rates], color="tab:red")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def resolve_log_dir(log_dir: Path | None, config: TrainingConfig | None) -> Path:
    """--log-dir as given; else the config's log_dir (relative to the repo, like train.py's); else ./logs."""
    if log_dir is not None:
        return log_dir
    if config is not None:
        return Path(config.with_repo_paths().log_dir)
    return Path("logs")


def resolve_checkpoint_dir(checkpoint_dir: str | None, config: TrainingConfig | None) -> Path:
    """--checkpoint-dir as given; else the config's checkpoint_dir, which (like train.py) is relative to the repo."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    if config is not None:
        return Path(config.with_repo_paths().checkpoint_dir)
    return Path("checkpoints")


def folder_options(default: Any) -> argparse.ArgumentParser:
    """--checkpoint-dir and --config, accepted before and after the command. The commands' copies default to
    argparse.SUPPRESS, so that an option given before the command is not overwritten by their default."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--checkpoint-dir", default=default,
                         help="folder holding the checkpoints (default: ./checkpoints, or the checkpoint_dir of "
                              "--config)")
    options.add_argument("--config", default=default,
                         help="take the checkpoint folder from this training config (name or path)")
    return options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="List, inspect, compare and plot training checkpoints. "
                                                 "--checkpoint-dir and --config go before or after the command.",
                                     parents=[folder_options(None)])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command_options = folder_options(argparse.SUPPRESS)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[command_options])

    listing = add_command("list", help="every checkpoint: step, loss, time and upload state")
    listing.add_argument("--remote", action="store_true",
                         help="also list the checkpoints at the upload destination recorded in uploads.json")
    listing.add_argument("--gcs-credentials", metavar="KEY.json",
                         help="service-account key for a gs:// destination (default: the config's gcs_credentials, "
                              "else Application Default Credentials)")
    view = add_command("view", help="the detailed summary of one checkpoint")
    view.add_argument("name", help="checkpoint folder name, or 'latest'")
    compare = add_command("compare", help="a table of several checkpoints with the change between them")
    compare.add_argument("names", nargs="+", metavar="NAME", help="two or more checkpoint names (or 'latest')")
    plot = add_command("plot", help="training and validation loss and learning-rate curves")
    plot.add_argument("name", help="checkpoint folder name, or 'latest'")
    plot.add_argument("--save", type=Path, metavar="FILE.png",
                      help="write the plot to this file instead of opening a window (without a display: "
                           "CHECKPOINT_DIR/plots/NAME-plot.png)")
    plot.add_argument("--log-dir", type=Path,
                      help="folder of the run's metrics.jsonl, for the validation curve when the checkpoint does "
                           "not record its history (default: the log_dir of --config, else ./logs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config) if args.config is not None else None
        checkpoint_dir = resolve_checkpoint_dir(args.checkpoint_dir, config)
        if args.command == "list":
            return cmd_list(checkpoint_dir, args.remote,
                            args.gcs_credentials or (config.gcs_credentials if config is not None else None))
        if args.command == "view":
            return cmd_view(checkpoint_dir, args.name)
        if args.command == "compare":
            return cmd_compare(checkpoint_dir, args.names)
        return cmd_plot(checkpoint_dir, args.name, args.save, resolve_log_dir(args.log_dir, config))
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
