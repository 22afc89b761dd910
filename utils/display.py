"""How the tools print numbers, sizes, times and upload states (scripts/checkpoint_viewer.py and
scripts/monitor_training.py show them the same way)."""
from datetime import datetime
from typing import Any

from utils.manifest import ManifestSnapshot


def fmt_loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def fmt_lr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def fmt_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def fmt_time(value: datetime | None) -> str:
    """Local wall-clock time, to the second."""
    return "n/a" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{sign}{hours}:{rest // 60:02d}:{rest % 60:02d}"


def fmt_bytes(size: float) -> str:
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TB"


def fmt_value(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def upload_label(manifest: ManifestSnapshot | None, name: str, detailed: bool = False) -> str:
    """One checkpoint's upload state in words: "uploaded", "failed (...)", "n/a" when nothing records it."""
    if manifest is None:
        return "n/a"
    if manifest.problem:
        return f"unknown ({manifest.problem})" if detailed else "unknown"
    entry = manifest.checkpoints.get(name)
    if not isinstance(entry, dict):
        return "not recorded"
    label = str(entry.get("state", "unknown"))
    if detailed:
        if label == "failed" and entry.get("error"):
            label += f" ({entry['error']})"
        if entry.get("remote_url"):
            label += f" -> {entry['remote_url']}"
        if entry.get("attempts"):
            label += f", {entry['attempts']} attempt(s)"
        if entry.get("updated"):
            label += f", updated {entry['updated']}"
    return label
