"""The agent's commands: `muster backup`, `muster snapshots` and `muster keys generate`.

Each command resolves its repository through `agent.context` and calls one action; this
module only decides what the person at the terminal (or the script) sees. Results go to
stdout, progress, warnings and errors to stderr.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from agent.actions.backup import BackupOutcome, run_backup
from agent.actions.keys import generate_identity
from agent.actions.snapshots import SnapshotSummary, latest, list_snapshots
from agent.context import RepoContext, repo_command, reported_errors
from broker.cli import keys_group
from broker.snapshot import SnapshotRecord
from muster import __version__

MAX_WARNINGS_SHOWN = 20
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def register(root: click.Group) -> None:
    """Add the agent's commands to the `muster` group, and `generate` to `muster keys`."""
    root.add_command(backup_command)
    root.add_command(snapshots_command)
    keys_group.add_command(keys_generate_command)


# -- muster backup -------------------------------------------------------------------------


@click.command("backup")
@repo_command(sources=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: record + warnings")
def backup_command(context: RepoContext, as_json: bool) -> None:
    """Back up one job now: a full or incremental snapshot, encrypted to the node's identity.

    With a plan (the default), the job comes from it. With --repo URL, the PATHs are
    backed up ad hoc to that repository. Exits 0 when the snapshot is written, even
    with warnings (files that vanished or could not be read), which go to stderr.
    """
    identity = context.identity
    stderr = Console(stderr=True)
    if as_json or not stderr.is_terminal:
        outcome = run_backup(context.job, context.repo, identity, context.cache, __version__)
    else:
        parent = latest(context.repo)
        full = parent is None or parent.chain + 1 >= context.job.full_every
        with BackupProgress(stderr, context.name, parent, full) as progress:
            outcome = run_backup(
                context.job, context.repo, identity, context.cache, __version__, progress.update
            )
    if as_json:
        data = outcome.record.model_dump(mode="json")
        click.echo(json.dumps({**data, "warnings": outcome.warnings}, indent=2))
    else:
        click.echo(backup_summary(outcome, context))
    show_warnings(outcome.warnings)


def backup_summary(outcome: BackupOutcome, context: RepoContext) -> str:
    record = outcome.record
    stats = record.stats
    kind = "full" if record.full else f"incremental +{record.chain} on {record.parent}"
    took = (record.finished - record.started).total_seconds()
    lines = [
        f"snapshot {record.id} of {context.name} in {context.location}",
        f"  kind     {kind}",
        f"  files    {stats.files:,}: {stats.files_new:,} new, {stats.files_changed:,} changed, "
        f"{stats.files_unchanged:,} unchanged; {stats.directories:,} directories",
        f"  size     {human_size(stats.bytes)}",
        f"  read     {human_size(stats.bytes_new)}",
        f"  stored   {human_size(stats.bytes_stored)}",
        f"  took     {human_duration(took)}",
    ]
    if outcome.warnings:
        lines.append(f"  warnings {len(outcome.warnings)} (on stderr)")
    return "\n".join(lines)


def show_warnings(warnings: list[str]) -> None:
    if not warnings:
        return
    click.echo(f"{len(warnings)} warning{'s' * (len(warnings) != 1)}:", err=True)
    for warning in warnings[:MAX_WARNINGS_SHOWN]:
        click.echo(f"  {warning}", err=True)
    if len(warnings) > MAX_WARNINGS_SHOWN:
        click.echo(
            f"  ... and {len(warnings) - MAX_WARNINGS_SHOWN} more (--json lists all)", err=True
        )


class BackupProgress:
    """A progress bar fed by `run_backup`'s callback (files done, bytes done or read).

    The previous snapshot gives the expected totals, its files and bytes; without one the
    bar is indeterminate.
    """

    INTERVAL = 0.1  # seconds between redraws; the callback comes once per entry

    def __init__(
        self, console: Console, name: str, parent: SnapshotRecord | None, full: bool
    ) -> None:
        self._files_total = parent.stats.files if parent else None
        self._bytes_total = parent.stats.bytes if parent else None
        self._by_bytes = bool(self._bytes_total)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        kind = "full" if full else "incremental"
        total = self._bytes_total if self._by_bytes else self._files_total
        self._task = self._progress.add_task(f"{name} {kind}", total=total or None, detail="")
        self._started = time.monotonic()
        self._shown = 0.0
        self.files = 0
        self.bytes = 0

    def __enter__(self) -> BackupProgress:
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

    def update(self, files: int, bytes_read: int) -> None:
        self.files, self.bytes = files, bytes_read
        now = time.monotonic()
        if now - self._shown >= self.INTERVAL:
            self._shown = now
            self._redraw()

    def detail(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        files = f"{self.files:,}" + (f"/{self._files_total:,}" if self._files_total else "")
        read = human_size(self.bytes) + (
            f"/{human_size(self._bytes_total)}" if self._bytes_total else ""
        )
        return f"{files} files  {read}  {human_size(self.bytes / elapsed)}/s"

    def _redraw(self) -> None:
        completed = self.bytes if self._by_bytes else self.files
        self._progress.update(self._task, completed=completed, detail=self.detail())


# -- muster snapshots ----------------------------------------------------------------------


@click.command("snapshots")
@repo_command(identity_required=False)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, oldest first")
def snapshots_command(context: RepoContext, as_json: bool) -> None:
    """List a job's snapshots, oldest first. Reads only the plain records: no key needed."""
    summaries = list_snapshots(context.repo)
    if as_json:
        click.echo(json.dumps([summary.as_json() for summary in summaries], indent=2))
        return
    if not summaries:
        click.echo(
            f"no snapshots of {context.name} in {context.location} yet; `muster backup` makes one",
            err=True,
        )
        return
    console = Console()
    if not console.is_terminal:  # a pipe or file: no need to squeeze into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(snapshots_table(summaries, f"{context.name} in {context.location}"))


def snapshots_table(summaries: list[SnapshotSummary], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("files", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("stored", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for summary in summaries:
        table.add_row(
            summary.id,
            local_time(summary),
            f"{summary.files:,}",
            human_size(summary.bytes),
            human_size(summary.bytes_stored),
            summary.kind,
        )
    return table


# -- muster keys generate ------------------------------------------------------------------


@click.command("generate")
@click.argument("keyfile", type=click.Path(dir_okay=False, path_type=Path))
def keys_generate_command(keyfile: Path) -> None:
    """Create this node's age identity in KEYFILE (mode 0600; an existing file is never
    replaced) and print its public recipient. Backups are encrypted to it; restores need
    KEYFILE, so keep a copy somewhere safe (usually STATE_DIR/identity.txt)."""
    with reported_errors():
        recipient = generate_identity(keyfile)
    click.echo(str(recipient))
    click.echo(
        f"identity written to {keyfile}; keep a copy of it away from this node: "
        "without it, its backups cannot be decrypted",
        err=True,
    )


# -- formatting ----------------------------------------------------------------------------


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


def local_time(summary: SnapshotSummary) -> str:
    return summary.started.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
