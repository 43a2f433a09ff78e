"""How long work is shown to people: sizes, durations and one progress bar for all."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(size: float) -> str:
    """IEC units with one decimal: 1.2 GiB, 512 B."""
    value = float(size)
    for unit in _UNITS:
        if abs(round(value, 1)) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class TransferProgress:
    """Files and bytes done against expected totals (from a previous snapshot, or from
    the catalog); unknown totals give an indeterminate bar. Redrawn at most every
    INTERVAL seconds, however often the callback comes."""

    INTERVAL = 0.1

    def __init__(
        self, console: Console, label: str, files_total: int | None, bytes_total: int | None
    ) -> None:
        self._files_total = files_total
        self._bytes_total = bytes_total
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        total = bytes_total or files_total or None
        self._by_bytes = bool(bytes_total)
        self._task = self._progress.add_task(label, total=total, detail="")
        self._started = time.monotonic()
        self._shown = 0.0
        self.files = 0
        self.bytes = 0

    def __enter__(self) -> TransferProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self._redraw()
        self._progress.stop()

    def update(self, files: int, bytes_done: int) -> None:
        self.files, self.bytes = files, bytes_done
        now = time.monotonic()
        if now - self._shown >= self.INTERVAL:
            self._shown = now
            self._redraw()

    def detail(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        files = f"{self.files:,}" + (f"/{self._files_total:,}" if self._files_total else "")
        done = human_size(self.bytes) + (
            f"/{human_size(self._bytes_total)}" if self._bytes_total else ""
        )
        return f"{files} files  {done}  {human_size(self.bytes / elapsed)}/s"

    def _redraw(self) -> None:
        completed = self.bytes if self._by_bytes else self.files
        self._progress.update(self._task, completed=completed, detail=self.detail())
