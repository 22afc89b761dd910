"""Checkpoint folders on local disk: their names, listing and lookup, retention, and the leftovers of a crash.

A checkpoint is the folder checkpoints/checkpoint-epoch{E}-step{S}-files{F}/ holding Accelerate's state
(model.safetensors, optimizer.bin, scheduler.bin, random_states_*.pkl) and our JSON files:
training_config.json, metadata.json, training_metrics.json and data_state.json. It is written as
.tmp-<name>/ and renamed when complete (utils/checkpoints/writer.py), so a folder under a checkpoint name is
always whole. Nothing here needs torch: the tools read checkpoints with this module alone.
"""
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configs.training_config import CONFIG_DIR, ConfigError, load_config
from utils.errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"checkpoint-epoch(\d+)-step(\d+)-files(\d+)")
TMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    path: Path
    epoch: int
    step: int
    files: int


def checkpoint_name(epoch: int, step: int, files: int) -> str:
    return f"checkpoint-epoch{epoch}-step{step}-files{files}"


def parse_checkpoint_name(name: str) -> tuple[int, int, int] | None:
    match = CHECKPOINT_PATTERN.fullmatch(name)  # "$" would let a trailing newline through
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def list_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints in the folder, oldest step first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        parsed = parse_checkpoint_name(path.name)
        if parsed and path.is_dir():
            found.append(CheckpointInfo(path.name, path, *parsed))
    return sorted(found, key=lambda info: (info.step, info.epoch, info.files))


def find_checkpoint(checkpoint_dir: str | Path, name: str) -> CheckpointInfo:
    """`name` or "latest" among the local checkpoints; an error listing what exists otherwise."""
    found = list_checkpoints(checkpoint_dir)
    if name == "latest":
        if not found:
            raise CheckpointError(f"latest: no checkpoint in {checkpoint_dir}")
        return found[-1]
    for info in found:
        if info.name == Path(name).name:
            return info
    existing = ", ".join(info.name for info in found) or "none"
    raise CheckpointError(f"checkpoint {name!r} not found in {checkpoint_dir} (existing: {existing})")


def remove_incomplete_saves(checkpoint_dir: str | Path) -> list[str]:
    """Deletes the .tmp-checkpoint-* a crash left behind: folders of a save or a deletion cut short, and
    archives of a download cut short. None of them is a complete checkpoint."""
    folder = Path(checkpoint_dir)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.glob(f"{TMP_PREFIX}checkpoint-*")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def prune_checkpoints(checkpoint_dir: str | Path, keep: int,
                      may_delete: Callable[[CheckpointInfo], bool] = lambda info: True) -> list[str]:
    """Deletes all but the newest `keep` checkpoints, sparing any that may_delete refuses."""
    deleted = []
    for info in list_checkpoints(checkpoint_dir)[:-keep]:
        if may_delete(info):
            # Renamed first: a deletion cut short leaves a .tmp- folder (removed at the next start), never a
            # partial folder under a checkpoint's name that --resume would take for complete.
            doomed = info.path.with_name(f"{TMP_PREFIX}{info.name}")
            os.rename(info.path, doomed)
            shutil.rmtree(doomed)
            deleted.append(info.name)
    return deleted


# Where the tools point when a folder holds nothing: after `bash run.sh tiny`, checkpoints/ and logs/ hold the run
# in tiny/ (scripts/checkpoint_viewer.py and scripts/monitor_training.py say so the same way).

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
