"""The agent's commands: `muster backup`, `muster snapshots` and `muster keys generate`.

Each command resolves its repository through `agent.context` and calls one action; this
module only decides what the person at the terminal (or the script) sees. Results go to
stdout, progress, warnings and errors to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from agent.actions.backup import BackupOutcome, run_backup
from agent.actions.keys import generate_identity
from agent.actions.snapshots import SnapshotSummary, latest, list_snapshots
from agent.context import RepoContext, repo_command, reported_errors
from agent.display import TransferProgress, human_duration, human_size
from muster import __version__

MAX_WARNINGS_SHOWN = 20


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
        label = f"{context.name} {'full' if full else 'incremental'}"
        expected = parent.stats if parent else None
        files, size = (expected.files, expected.bytes) if expected else (None, None)
        with TransferProgress(stderr, label, files, size) as progress:
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


def __getattr__(name: str) -> click.Group:
    """`keys_group`, which `muster keys` loads: broker.cli's group plus `generate`. Built
    only when asked for, because broker.cli brings kombu, which `muster backup` and
    `muster snapshots` never use (tens of ms of every backup's start-up)."""
    if name != "keys_group":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from broker.cli import keys_group

    keys_group.add_command(keys_generate_command)
    return keys_group


# -- formatting ----------------------------------------------------------------------------


def local_time(summary: SnapshotSummary) -> str:
    return summary.started.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
