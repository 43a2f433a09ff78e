"""The reading commands: `muster restore`, `ls`, `versions`, `find`, `verify` and `forget`.

Like `agent.cli`, each command resolves its repository through `agent.context` (so on a
node with a plan it needs no option, and from another machine `--repo URL --node NAME
--identity KEY` works) and calls one action; this module decides what people and scripts
see. Results go to stdout, progress, questions, warnings and errors to stderr.

`muster restore` never replaces an existing file silently: files whose content already
matches the backup are left alone, others are asked about one by one on a terminal, and
refused without one unless `--overwrite` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from agent.actions.find import Match, run_find
from agent.actions.forget import ForgetOutcome, run_forget
from agent.actions.ls import Listing, run_ls
from agent.actions.restore import RestoreOutcome, absolute, choose_snapshots, run_restore
from agent.actions.verify import VerifyOutcome, run_verify
from agent.actions.versions import Version, run_versions
from agent.archive import Archive, NoSnapshot, inside
from agent.catalog import DIRECTORY, FILE, HARDLINK, SYMLINK, TYPE_BITS, Entry
from agent.context import CommandError, RepoContext, repo_command, repository_key
from agent.display import TransferProgress, human_duration, human_size
from agent.retention import POLICY_EMPTY
from agent.when import BadWhen, parse_when
from broker.plan import Retention
from broker.snapshot import SnapshotRecord
from broker.types import parse_duration

PROGRESS_MIN_BYTES = 4 << 20  # a restore this big (or with this many files) shows a bar
PROGRESS_MIN_FILES = 100
MAX_LISTED = 20  # refused files or errors named in a text summary; --json lists all
READ_SIZE = 1 << 20


# -- shared pieces ---------------------------------------------------------------------------


def interactive() -> bool:
    """Whether a person can answer questions: stdin and stdout are both terminals."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _check_when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_when(value)
        except BadWhen as error:
            raise click.BadParameter(str(error)) from None
    return value


at_option = click.option(
    "--at",
    metavar="WHEN",
    callback=_check_when,
    help="a snapshot id (or the start of one), a date ('2026-11-20', '2026-11-20 14:00', "
    "local time), or '3 days ago': the last snapshot at that time [default: the latest]",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")


def repo_archive(context: RepoContext) -> Archive:
    return Archive(context.repo, context.identities, context.cache)


@contextlib.contextmanager
def lookup_errors() -> Iterator[None]:
    """A snapshot or path that is not there is a failure of the command (exit 1)."""
    try:
        yield
    except NoSnapshot as error:
        raise CommandError(str(error)) from None
    except BadWhen as error:
        raise CommandError(f"--at: {error}", exit_code=2) from None


def when(record: SnapshotRecord) -> str:
    """A snapshot's start in local time, to the second."""
    return record.started.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def local_mtime(entry: Entry) -> str:
    return datetime.fromtimestamp(entry.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")


def iso_mtime(mtime_ns: int) -> str:
    moment = datetime.fromtimestamp(mtime_ns // 1_000_000_000, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def snapshot_json(record: SnapshotRecord) -> dict[str, Any]:
    return {"id": record.id, "started": iso(record.started)}


def entry_json(entry: Entry) -> dict[str, Any]:
    """What a script may want of a catalog entry; where its data is stored is left out."""
    return {
        "path": entry.path,
        "type": entry.type,
        "mode": f"{entry.mode:04o}",
        "user": entry.user,
        "group": entry.group,
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime": iso_mtime(entry.mtime_ns),
        "link": entry.link,
        "sha256": entry.sha256,
    }


def print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2))


def table_console() -> Console:
    console = Console()
    if not console.is_terminal:  # a pipe or file: no need to squeeze into 80 columns
        console = Console(width=max(console.width, 200))
    return console


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'s' * (count != 1)}"


def listed(lines: list[str], limit: int = MAX_LISTED) -> list[str]:
    """At most `limit` lines, indented, and how many more there are."""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more (--json lists all)")
    return shown


# -- muster restore --------------------------------------------------------------------------


@dataclass
class RestorePlan:
    """What a restore will write, learnt from the catalogs before anything is written.

    Only what already exists at the target is kept entry by entry, so that planning the
    restore of a whole machine to an empty directory costs no memory per file."""

    root: Path
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)  # requested -> record
    files: int = 0  # regular files the restore will write (hard links to them aside)
    bytes: int = 0
    existing: dict[str, Entry] = field(default_factory=dict)  # catalog path -> entry
    unchanged: set[str] = field(default_factory=set)  # already there, same content
    conflicts: list[tuple[Entry, os.stat_result]] = field(default_factory=list)

    def target(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def plan_restore(
    archive: Archive, paths: list[str], root: Path, at: str | None, existing: bool = True
) -> RestorePlan:
    """Choose the snapshots as `run_restore` does and, with `existing`, find what already
    exists at the target: the backup's own content is unchanged, anything else conflicts."""
    plan = RestorePlan(root)
    wanted = list(dict.fromkeys(absolute(p) for p in paths))
    for record, record_paths, entries in choose_snapshots(archive, wanted, at, RestoreOutcome()):
        plan.snapshots.update(dict.fromkeys(record_paths, record))
        for entry in entries:
            if entry.type != DIRECTORY:
                _plan_entry(plan, entry, record_paths, existing)
    plan.snapshots = {p: plan.snapshots[p] for p in wanted if p in plan.snapshots}
    return plan


def _plan_entry(plan: RestorePlan, entry: Entry, paths: list[str], existing: bool) -> None:
    # a hard link whose file is not restored with it is restored as a copy of that file
    copy = entry.type == HARDLINK and not inside(entry.link or "", paths)
    if entry.type == FILE or copy:
        plan.files += 1
        plan.bytes += entry.size
    if not existing:
        return
    target = plan.target(entry.path)
    try:
        info = target.lstat()
    except OSError:
        return
    plan.existing[entry.path] = entry
    if _same(entry, target, info):
        plan.unchanged.add(entry.path)
    else:
        plan.conflicts.append((entry, info))


def _same(entry: Entry, target: Path, info: os.stat_result) -> bool:
    """Whether what is at `target` is what the restore would put there (content only)."""
    try:
        if entry.type == SYMLINK:
            return stat.S_ISLNK(info.st_mode) and os.readlink(target) == entry.link
        if entry.type not in (FILE, HARDLINK) or not stat.S_ISREG(info.st_mode):
            return False
        if info.st_size != entry.size or entry.sha256 is None:
            return False
        digest = hashlib.sha256()
        with target.open("rb") as stream:
            while block := stream.read(READ_SIZE):
                digest.update(block)
        return digest.hexdigest() == entry.sha256
    except OSError:
        return False


class Answers:
    """Decides, for each existing file, whether the restore replaces it.

    Files already holding the backup's content are left alone. With `overwrite`, all
    others are replaced; on a terminal the person is asked about each (before anything
    is written); otherwise each is refused, which the command reports as a failure.
    """

    CHOICES = ("y", "n", "a", "q")

    def __init__(self, plan: RestorePlan, overwrite: bool, ask: bool) -> None:
        self.plan = plan
        self.overwrite = overwrite
        self.decided: dict[str, bool] = {}
        self.kept: list[str] = []  # declined on the terminal
        self.refused: list[str] = []  # no terminal to ask on, no --overwrite
        self.left: set[str] = set()  # every existing path the restore was told to leave
        if ask and not overwrite and plan.conflicts:
            self._ask()

    def _ask(self) -> None:
        conflicts = self.plan.conflicts
        click.echo(
            f"{plural(len(conflicts), 'existing file')} differ from the backup. For each: "
            "y = replace it, n = keep it, a = replace it and all the others, "
            "q = keep it and all the others",
            err=True,
        )
        everything: bool | None = None
        for entry, info in conflicts:
            if everything is None:
                answer = click.prompt(
                    f"replace {self.plan.target(entry.path)} ({_describe_existing(info)}) "
                    f"with the backup's {_describe_entry(entry)}?",
                    type=click.Choice(self.CHOICES, case_sensitive=False),
                    default="n",
                    err=True,
                ).lower()
                if answer in ("a", "q"):
                    everything = answer == "a"
                replace = answer in ("y", "a")
            else:
                replace = everything
            self.decided[entry.path] = replace
            if not replace:
                self.kept.append(entry.path)

    def __call__(self, path: str) -> bool:
        """The `Overwrite` callback of `run_restore`: called for paths that exist."""
        if self.overwrite:
            return True
        if path in self.decided:
            replace = self.decided[path]
        elif path in self.plan.unchanged:
            replace = False
        else:
            self.refused.append(path)  # not asked about: there was no terminal, or it is new
            replace = False
        if not replace:
            self.left.add(path)
        return replace


def _describe_existing(info: os.stat_result) -> str:
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    modified = datetime.fromtimestamp(info.st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"{human_size(info.st_size)}, modified {modified}"


def _describe_entry(entry: Entry) -> str:
    if entry.type == SYMLINK:
        return f"symlink to {entry.link}"
    return f"{human_size(entry.size)}, modified {local_mtime(entry)}"


@click.command("restore")
@repo_command()
@click.argument("wanted", nargs=-1, required=True, metavar="PATH...")
@at_option
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="restore under DIR (DIR/etc/hosts for /etc/hosts), following no symlink in it "
    "[default: in place]",
)
@click.option("--overwrite", is_flag=True, help="replace existing files without asking")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object; never asks")
def restore_command(
    context: RepoContext,
    wanted: tuple[str, ...],
    at: str | None,
    to: Path | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Bring PATHs back from a snapshot: each from the newest snapshot that holds it, or
    from the one --at names. Relative PATHs start at the current directory.

    An existing file is never replaced silently. One whose content matches the backup is
    left as it is; for the others, on a terminal you are asked file by file; without
    one they are refused (and the command fails) unless --overwrite is given. Exits 0
    only when everything asked for was restored.
    """
    root = Path(os.path.abspath(to)) if to else Path("/")
    with lookup_errors(), repo_archive(context) as archive:
        plan = plan_restore(archive, list(wanted), root, at, existing=not overwrite)
        answers = Answers(plan, overwrite, ask=not as_json and interactive())
        stderr = Console(stderr=True)
        large = plan.bytes >= PROGRESS_MIN_BYTES or plan.files >= PROGRESS_MIN_FILES

        def restore(progress: Callable[[int, int], None] | None = None) -> RestoreOutcome:
            return run_restore(
                archive,
                list(wanted),
                root,
                at=at,
                overwrite=answers,
                strict=to is not None,
                progress=progress,
            )

        if as_json or not stderr.is_terminal or not large:
            outcome = restore()
        else:
            with TransferProgress(stderr, "restoring", plan.files, plan.bytes) as bar:
                outcome = restore(bar.update)
    snapshots = {r.id: r for r in plan.snapshots.values()}
    if as_json:
        print_json(
            {
                "root": str(root),
                "snapshots": {
                    path: snapshot_json(snapshots[sid]) for path, sid in outcome.snapshots.items()
                },
                "files": outcome.files,
                "bytes": outcome.bytes,
                "unchanged": sorted(plan.unchanged),
                "kept": answers.kept,
                "refused": answers.refused,
                "errors": outcome.errors,
            }
        )
    else:
        click.echo(restore_summary(outcome, plan, answers, context))
    show_problems(outcome, answers, to is not None, "--json never asks" if as_json else "")
    if outcome.errors or answers.refused:
        raise SystemExit(1)


def restore_summary(
    outcome: RestoreOutcome, plan: RestorePlan, answers: Answers, context: RepoContext
) -> str:
    where = "in place" if plan.root == Path("/") else f"under {plan.root}"
    lines = [f"restored {where} from {context.name} in {context.location}"]
    width = max(len(p) for p in outcome.snapshots) if outcome.snapshots else 0
    by_id = {r.id: r for r in plan.snapshots.values()}
    for path, sid in outcome.snapshots.items():
        lines.append(f"  {path:<{width}}  from {sid} ({when(by_id[sid])})")
    lines.append(f"  files      {outcome.files:,} ({human_size(outcome.bytes)})")
    if plan.unchanged:
        lines.append(f"  unchanged  {len(plan.unchanged):,} (already as in the backup, left alone)")
    if answers.kept:
        lines.append(f"  kept       {len(answers.kept):,} existing (you chose to keep them)")
    if answers.refused:
        lines.append(f"  refused    {len(answers.refused):,} existing (on stderr)")
    lines.append(f"  errors     {len(outcome.errors):,}" + (" (on stderr)" * bool(outcome.errors)))
    return "\n".join(lines)


def show_problems(
    outcome: RestoreOutcome, answers: Answers, elsewhere: bool, why: str = ""
) -> None:
    lines: list[str] = []
    if answers.refused:
        lines.append(
            f"refused to replace {plural(len(answers.refused), 'existing file')} "
            f"({why or 'no terminal to ask on'}):"
        )
        lines += listed(answers.refused)
        hint = "pass --overwrite to replace them"
        lines.append(hint + ("" if elsewhere else ", or --to DIR to restore somewhere else"))
    if outcome.errors:
        lines.append(f"{plural(len(outcome.errors), 'error')}:")
        lines += listed(outcome.errors)
        lines.append(
            "what next: a file that does not match its sha256 or a volume that cannot be read "
            "means damaged storage: `muster verify --all` checks the snapshot, and --at "
            "restores an older version (`muster versions PATH` lists them); a permission "
            "error means restoring as a user who may write there, or with --to DIR"
        )
    for line in lines:
        click.echo(line, err=True)


# -- muster ls -------------------------------------------------------------------------------


@click.command("ls")
@repo_command()
@click.argument("path", required=False, default="/")
@at_option
@json_option
def ls_command(context: RepoContext, path: str, at: str | None, as_json: bool) -> None:
    """List one directory of a snapshot, like `ls -l` [default PATH: /]. Directories that
    only lead to backed-up paths are listed too, with unknown details."""
    with lookup_errors(), repo_archive(context) as archive:
        listing = run_ls(archive, path, at)
        alone = None
        if not listing.entries and not listing.implied:
            alone = _lookup(archive, listing.snapshot, listing.directory)
            if alone is None:
                raise NoSnapshot(
                    f"nothing at {listing.directory} in snapshot {listing.snapshot.id}; "
                    "`muster find NAME` searches every snapshot"
                )
    rows = _ls_rows(listing, alone)
    if as_json:
        print_json(
            {
                "snapshot": snapshot_json(listing.snapshot),
                "directory": listing.directory,
                "entries": rows,
            }
        )
        return
    snapshot = listing.snapshot
    click.echo(f"{listing.directory} in {context.name}, snapshot {snapshot.id} ({when(snapshot)})")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("mode", no_wrap=True)
    table.add_column("owner", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("modified", no_wrap=True)
    table.add_column("name", overflow="fold")
    for row in rows:
        table.add_row(*_ls_cells(row))
    table_console().print(table)


def _lookup(archive: Archive, record: SnapshotRecord, path: str) -> Entry | None:
    with archive.entries(record) as entries:
        return next((e for e in entries if e.path == path), None)


def _ls_rows(listing: Listing, alone: Entry | None) -> list[dict[str, Any]]:
    """Children (or the one entry PATH names), implied directories among them, by name."""
    prefix = listing.directory.rstrip("/") + "/"
    rows: list[dict[str, Any]] = []
    if alone is not None and alone.type != DIRECTORY:
        rows.append({"name": alone.path.rsplit("/", 1)[-1], "implied": False, **entry_json(alone)})
    for entry in listing.entries:
        rows.append({"name": entry.path[len(prefix) :], "implied": False, **entry_json(entry)})
    for name in listing.implied:
        rows.append({"name": name, "path": prefix + name, "type": DIRECTORY, "implied": True})
    return sorted(rows, key=lambda row: row["name"])


def _ls_cells(row: dict[str, Any]) -> tuple[str, str, str, str, str]:
    if row["implied"]:
        return "d?????????", "", "", "", row["name"] + "/"
    kind = row["type"]
    mode = stat.filemode(TYPE_BITS.get(kind, stat.S_IFLNK) | int(row["mode"], 8))
    owner = f"{row['user'] or row['uid']}:{row['group'] or row['gid']}"
    size = "" if kind in (DIRECTORY, SYMLINK) else human_size(row["size"])
    modified = datetime.fromisoformat(row["mtime"]).astimezone().strftime("%Y-%m-%d %H:%M")
    name = row["name"]
    if kind == DIRECTORY:
        name += "/"
    elif kind == SYMLINK:
        name += f" -> {row['link']}"
    elif kind == HARDLINK:
        name += f" (hard link to {row['link']})"
    return mode, owner, size, modified, name


# -- muster versions -------------------------------------------------------------------------


@click.command("versions")
@repo_command()
@click.argument("path")
@json_option
def versions_command(context: RepoContext, path: str, as_json: bool) -> None:
    """Every distinct version of PATH across the job's snapshots, oldest first: when each
    was first and last seen. `muster restore PATH --at ID` brings one back."""
    with lookup_errors():
        versions = run_versions(Archive(context.repo, context.identities, context.cache), path)
    if as_json:
        print_json([_version_json(version) for version in versions])
    if not versions:
        raise CommandError(
            f"{absolute(path)} is in no snapshot of {context.name}; `muster find NAME` "
            "searches by name"
        )
    if as_json:
        return
    click.echo(f"{plural(len(versions), 'version')} of {absolute(path)} in {context.name}")
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("first seen", "last seen"):
        table.add_column(column, no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("modified", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    table.add_column("type", overflow="fold")
    for version in versions:
        entry = version.entry
        kind = entry.type + (f" -> {entry.link}" if entry.link else "")
        table.add_row(
            f"{when(version.first_seen)}\n{version.first_seen.id}",
            f"{when(version.last_seen)}\n{version.last_seen.id}",
            "" if entry.type == DIRECTORY else human_size(entry.size),
            local_mtime(entry),
            entry.sha256[:12] if entry.sha256 else "",
            kind,
        )
    table_console().print(table)


def _version_json(version: Version) -> dict[str, Any]:
    return {
        "first_seen": snapshot_json(version.first_seen),
        "last_seen": snapshot_json(version.last_seen),
        **entry_json(version.entry),
    }


# -- muster find -----------------------------------------------------------------------------


@click.command("find")
@repo_command()
@click.argument("pattern")
@json_option
def find_command(context: RepoContext, pattern: str, as_json: bool) -> None:
    """Search every snapshot for PATTERN, a shell wildcard ('*.conf', 'hosts'): matched
    against names, or against whole paths when it holds a '/' ('/etc/*/*.conf')."""
    with lookup_errors():
        matches = run_find(Archive(context.repo, context.identities, context.cache), pattern)
    if as_json:
        print_json([_match_json(match) for match in matches])
        return
    if not matches:
        hint = "" if "*" in pattern or "/" in pattern else f"; for part of a name: '*{pattern}*'"
        click.echo(f"nothing matches {pattern!r} in {context.name}{hint}", err=True)
        return
    click.echo(f"{plural(len(matches), 'path')} matching {pattern!r} in {context.name}")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("first seen", no_wrap=True)
    table.add_column("last seen", no_wrap=True)
    for match in matches:
        entry = match.entry
        name = entry.path + ("/" if entry.type == DIRECTORY else "")
        table.add_row(
            name,
            "" if entry.type == DIRECTORY else human_size(entry.size),
            f"{when(match.first_seen)} {match.first_seen.id}",
            f"{when(match.last_seen)} {match.last_seen.id}",
        )
    table_console().print(table)


def _match_json(match: Match) -> dict[str, Any]:
    return {
        **entry_json(match.entry),
        "first_seen": snapshot_json(match.first_seen),
        "last_seen": snapshot_json(match.last_seen),
    }


# -- muster verify ---------------------------------------------------------------------------


def _check_duration(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> float | None:
    if value is None:
        return None
    try:
        seconds = int(parse_duration(value))
    except ValueError:
        raise click.BadParameter(
            f"not a duration: {value!r} (use e.g. 90, '30s', '15m', '1h30m')"
        ) from None
    if seconds <= 0:
        raise click.BadParameter("a duration above zero, e.g. '15m'")
    return float(seconds)


@click.command("verify")
@repo_command()
@click.option(
    "--snapshot",
    metavar="ID",
    callback=_check_when,
    help="the snapshot to test: an id or the start of one, or a time as for --at "
    "[default: the latest]",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    metavar="N",
    help="restore N files, spread over the volumes tested least recently "
    "[default: the job's restore_test.sample]",
)
@click.option(
    "--all", "everything", is_flag=True, help="restore every file, and check every volume's sha256"
)
@click.option(
    "--max-duration",
    metavar="D",
    callback=_check_duration,
    help="stop picking volumes after D ('15m', '1h') [default: the job's "
    "restore_test.max_duration, else none]",
)
@json_option
def verify_command(
    context: RepoContext,
    snapshot: str | None,
    sample: int | None,
    everything: bool,
    max_duration: float | None,
    as_json: bool,
) -> None:
    """Test-restore files of a snapshot into a temporary directory, through the code that
    restores, and check each against its sha256. Each run tests the volumes tested least
    recently, so successive runs cover them all. Exits 1 if anything failed."""
    if everything and sample is not None:
        raise click.UsageError("--sample and --all exclude each other")
    test = context.job.restore_test
    if max_duration is None and test.max_duration:
        max_duration = float(test.max_duration)
    archive = Archive(context.repo, context.identities, context.cache)
    key = repository_key(context.job.storage, context.node, context.job.name)
    stderr = Console(stderr=True)
    options: dict[str, Any] = {
        "snapshot": snapshot,
        "sample": None if everything else sample or test.sample,
        "all": everything,
        "max_duration": max_duration,
        "repository_key": key,
    }
    with lookup_errors():
        if as_json or not stderr.is_terminal:
            outcome = run_verify(archive, context.state_dir, **options)
        else:
            with stderr.status(f"verifying {context.name} in {context.location}"):
                outcome = run_verify(archive, context.state_dir, **options)
    if as_json:
        print_json({**dataclasses.asdict(outcome), "ok": outcome.ok})
    else:
        click.echo(verify_summary(outcome, context))
    if not outcome.ok:
        lines = [f"{plural(len(outcome.failures), 'failure')}:"]
        lines += [f"  {failure}" for failure in outcome.failures]
        lines.append(
            "what next: the files named cannot be restored from this snapshot. A volume "
            "missing or changed in storage was deleted or altered there: check the "
            "storage, restore the files from another snapshot that holds them (`muster "
            "versions PATH`), and run `muster verify --all` to see every damaged volume"
        )
        for line in lines:
            click.echo(line, err=True)
        raise SystemExit(1)


def verify_summary(outcome: VerifyOutcome, context: RepoContext) -> str:
    verdict = "ok" if outcome.ok else "FAILED"
    lines = [
        f"verify of snapshot {outcome.snapshot} of {context.name} in {context.location}: {verdict}",
        f"  files     {outcome.files_checked:,} checked ({human_size(outcome.bytes_checked)}), "
        f"{outcome.files_failed:,} failed",
        f"  volumes   {len(outcome.volumes_tested):,} tested",
        f"  coverage  {outcome.coverage:.0%} of the snapshot's volumes have passed a test",
        f"  took      {human_duration(outcome.duration)}",
    ]
    if outcome.stopped:
        lines.append("  stopped   at --max-duration, before everything chosen was tested")
    return "\n".join(lines)


# -- muster forget ---------------------------------------------------------------------------


@click.command("forget")
@repo_command(identity_required=False)
@click.option("--dry-run", is_flag=True, help="show what would go, delete nothing")
@json_option
def forget_command(context: RepoContext, dry_run: bool, as_json: bool) -> None:
    """Forget the snapshots the job's retention no longer keeps, and delete the data no
    kept snapshot uses. Reads only plain records: no key needed."""
    retention = context.job.retention
    if retention == Retention():
        records = context.repo.snapshots()
        if as_json:
            reasons = {record.id: [POLICY_EMPTY] for record in records}
            empty = ForgetOutcome(records, reasons=reasons, dry_run=dry_run)
            print_json(_forget_json(empty, retention))
            return
        advice = (
            "set keep_daily, keep_weekly and the like in the job's retention to forget old "
            "snapshots"
            if context.plan
            else "an ad hoc job (--repo) has no retention: use the node's plan"
        )
        click.echo(
            f"nothing forgotten: every keep_* rule of {context.name}'s retention is 0, which "
            f"keeps every snapshot ({len(records):,} kept); {advice}"
        )
        return
    with context.cache.writer_lock():
        outcome = run_forget(context.repo, retention, dry_run)
    if as_json:
        print_json(_forget_json(outcome, retention))
        return
    if not outcome.kept and not outcome.forgotten:
        click.echo(f"no snapshots of {context.name} in {context.location} yet", err=True)
    else:
        table_console().print(forget_table(outcome))
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{len(outcome.forgotten):,} of {len(outcome.kept) + len(outcome.forgotten):,} "
        f"snapshots {'would be ' if dry_run else ''}forgotten; {verb} "
        f"{plural(len(outcome.deleted_objects), 'object')}, "
        f"{'freeing' if dry_run else 'freed'} {human_size(outcome.freed_bytes)}"
        + (" (dry run: nothing was deleted)" if dry_run else "")
    )


def forget_table(outcome: ForgetOutcome) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("files", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("why", overflow="fold")
    rows = [(r, True) for r in outcome.kept] + [(r, False) for r in outcome.forgotten]
    for record, kept in sorted(rows, key=lambda row: (row[0].started, row[0].id)):
        table.add_row(
            record.id,
            when(record),
            f"{record.stats.files:,}",
            human_size(record.stats.bytes),
            "keep" if kept else "forget",
            ", ".join(outcome.reasons.get(record.id, [])) if kept else "",
        )
    return table


def _forget_json(outcome: ForgetOutcome, retention: Retention) -> dict[str, Any]:
    return {
        "dry_run": outcome.dry_run,
        "retention": retention.model_dump(mode="json"),
        "kept": [
            {**snapshot_json(r), "reasons": outcome.reasons.get(r.id, [])} for r in outcome.kept
        ],
        "forgotten": [snapshot_json(r) for r in outcome.forgotten],
        "deleted_objects": outcome.deleted_objects,
        "freed_bytes": outcome.freed_bytes,
    }
