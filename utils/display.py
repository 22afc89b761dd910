"""How numbers, sizes, durations and errors are printed, the same way everywhere: one formatter each.

Sizes are in decimal units, labelled as such (1 MB = 1,000,000 bytes), as GCS and disk makers count them."""
from datetime import datetime
from typing import Any

MESSAGE_CHARS = 300
"""How much of a library's error message a one-line error keeps (its middle is cut, not its end)."""


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
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:,.1f} TB"


def fmt_value(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def shorten_middle(text: str, limit: int = MESSAGE_CHARS) -> str:
    """One line of at most `limit` characters: a library's messages put the reason at the end ("... Failed to
    resolve 'storage.googleapis.com'"), after a long URL, so the middle goes."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    head = limit // 3
    return f"{line[:head]} … {line[len(line) - (limit - head - 3):]}"


def one_line(error: BaseException) -> str:
    """An error as one line: its type and message, at most 500 characters."""
    return shorten_middle(f"{type(error).__name__}: {error}", 500)
