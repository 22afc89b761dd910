"""How the tools print numbers, sizes, times and upload states, and where they point when a folder holds
nothing (scripts/checkpoint_viewer.py and scripts/monitor_training.py show them the same way)."""
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from configs.training_config import CONFIG_DIR, ConfigError, load_config
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


# ---------------------------------------------------------------------------------------------
# Where to look instead: after `bash run.sh tiny`, checkpoints/ and logs/ hold the run in tiny/
# ---------------------------------------------------------------------------------------------

def subfolders_holding(folder: Path, holds: Callable[[Path], bool]) -> list[Path]:
    """The subfolders of `folder` for which `holds` is true, sorted; OSError when `folder` cannot be read."""
    holders = []
    for sub in sorted(folder.iterdir()):
        try:
            if sub.is_dir() and holds(sub):
                holders.append(sub)
        except OSError:  # an unreadable subfolder is simply not a hint
            continue
    return holders


def config_naming(folder: Path, folder_field: str) -> str | None:
    """The name of a config in configs/ whose `folder_field` ("checkpoint_dir" or "log_dir") is `folder`."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            config = load_config(path.stem).with_repo_paths()  # like train.py: relative to the repo root
        except ConfigError:
            continue
        if Path(getattr(config, folder_field)).resolve() == folder.resolve():
            return path.stem
    return None


def holders_hint(holders: list[Path], option: str, folder_field: str) -> str:
    """"DIR holds some: pass OPTION DIR or --config NAME" (the config only where one names DIR), for one or
    several (non-empty) holders."""
    hints = []
    for sub in holders:
        config = config_naming(sub, folder_field)
        hints.append(f"pass {option} {sub}" + (f" or --config {config}" if config else ""))
    if len(holders) == 1:
        return f"{holders[0]} holds some: {hints[0]}"
    return f"subfolders {', '.join(str(sub) for sub in holders)} hold some: {'; '.join(hints)}"
