"""Whether a training run is alive in a folder, read from the outside (the monitor): train.py's first process
holds FOLDER/.run.lock (utils/checkpoints/ownership.py's lock_for_this_run) until it exits, and writes into it
"pid N on HOST, since YYYY-MM-DD HH:MM:SS".

Read without taking the lock: a probe that held it even for an instant could make a run starting at that
instant refuse to start ("another training run is using ..."). No torch: the tools import this.
"""
import re
import socket
from datetime import datetime
from pathlib import Path

import psutil

RUN_LOCK = ".run.lock"
"""The lock's name, for ownership.py (which takes it) and for the tools (which read it, without torch)."""
HOLDER = re.compile(r"pid (\d+) on (.+), since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
"""The line lock_for_this_run writes into the lock."""


def live_run_holder(folder: str | Path) -> str | None:
    """FOLDER/.run.lock's line ("pid N on HOST, since ...") while the process it names runs on this machine;
    None when no run locked the folder, the run has ended, or it runs on another machine (not visible here)."""
    try:
        text = (Path(folder) / RUN_LOCK).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    match = HOLDER.fullmatch(text)
    if match is None or match[2] != socket.gethostname():
        return None
    locked_at = datetime.strptime(match[3], "%Y-%m-%d %H:%M:%S").timestamp()
    try:
        process = psutil.Process(int(match[1]))
        started, ended = process.create_time(), process.status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped
    except psutil.Error:  # no such process (the run ended), or one this user may not inspect
        return None
    if ended:
        return None
    # The lock is written after its process started; a process started later only reuses the pid. The lock's
    # time is cut to the second, hence the one second of slack.
    return text if started <= locked_at + 1 else None
