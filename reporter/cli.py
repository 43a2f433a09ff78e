"""`muster reporter run|reindex`, and the operators' `muster status`, `muster events` and
`muster report`."""

from __future__ import annotations

import fnmatch
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from kombu import Consumer
from pymongo.errors import PyMongoError
from rich.console import Console
from rich.table import Table

from agent.display import human_duration, human_size
from agent.storage import StorageError, open_storage, parse_repo_url
from broker.cli import settings_options
from broker.codec import parse_json
from broker.connection import body_bytes, connect
from broker.reporter_config import ReporterSettings
from broker.topology import declare, tail_queue
from broker.types import parse_duration
from reporter.queries import fleet_status, report
from reporter.store import Store

log = logging.getLogger(__name__)

EVENT_TYPES = {
    "announce": "announce.#",
    "keepalive": "keepalive.#",
    "status": "run_status.#",
    "result": "run_result.#",
    "alert": "alert.#",
}


def mongo_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--database", help="MongoDB database [env MUSTER_DATABASE]")(command)
    return click.option("--mongo-url", help="MongoDB URI [env MUSTER_MONGO_URL]")(command)


def open_store(settings: ReporterSettings, instance: str = "cli") -> Store:
    store = Store.from_settings(settings, instance)
    try:
        store.client.admin.command("ping")
    except PyMongoError as error:
        reason = str(error).splitlines()[0][:300]
        raise click.ClickException(
            f"cannot reach MongoDB at {settings.mongo_location}: {reason}\n"
            "Point MUSTER_MONGO_URL (or --mongo-url, or mongo_url in the config file) at it."
        ) from None
    return store


# -- muster reporter ---------------------------------------------------------------------------


@click.group("reporter")
def reporter_group() -> None:
    """The reporter process: results, keepalives and alerts into MongoDB; the watchdog."""


@reporter_group.command("run")
@settings_options
@mongo_options
@click.option("--batch-size", type=int, help="messages per MongoDB write [env MUSTER_BATCH_SIZE]")
@click.option(
    "--flush-interval", type=float, help="seconds a partial batch waits [MUSTER_FLUSH_INTERVAL]"
)
@click.option(
    "--metrics-port", type=int, help="Prometheus /metrics port, 0 disables [MUSTER_METRICS_PORT]"
)
@click.option("--metrics-host", help="address of /metrics [env MUSTER_METRICS_HOST]")
@click.option(
    "--watchdog-interval", type=float, help="seconds between checks [MUSTER_WATCHDOG_INTERVAL]"
)
@click.option("--no-watchdog", is_flag=True, help="only write; let other instances watch")
def run_command(
    config_file: Path | None,
    broker_url: str | None,
    mongo_url: str | None,
    database: str | None,
    batch_size: int | None,
    flush_interval: float | None,
    metrics_port: int | None,
    metrics_host: str | None,
    watchdog_interval: float | None,
    no_watchdog: bool,
) -> None:
    """Consume muster.reporter into MongoDB, watch the fleet, serve /metrics.

    Run several: they share the queue, and the watchdog's alert changes are claimed in
    MongoDB, so each change is published once. SIGTERM or Ctrl-C stop it after writing
    and acknowledging what it holds.
    """
    from reporter.metrics import serve
    from reporter.service import Reporter

    settings = ReporterSettings.load(
        config_file,
        broker_url=broker_url,
        mongo_url=mongo_url,
        database=database,
        batch_size=batch_size,
        flush_interval=flush_interval,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        watchdog_interval=watchdog_interval,
    )
    instance = socket.gethostname()
    store = Store.from_settings(settings, instance)
    while True:  # MongoDB may come up after us: wait, do not crash-loop
        try:
            store.ensure_indexes()
            break
        except PyMongoError as error:
            log.warning("MongoDB not ready (%s); retrying", str(error).splitlines()[0][:200])
            click.echo(f"waiting for MongoDB: {str(error).splitlines()[0][:200]}", err=True)
            time.sleep(2)
    connection = connect(settings.broker_urls, settings.heartbeat)
    declare(connection)
    reporter = Reporter(connection, store, settings, instance=instance, watchdog=not no_watchdog)
    stop_metrics = None
    if settings.metrics_port:
        stop_metrics = serve(
            store, reporter, settings.metrics_host, settings.metrics_port, settings.metrics_cache
        )

    def stop(signum: int, frame: Any) -> None:
        reporter.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(
        f"reporter {instance}: {settings.mongo_url.split('@')[-1]} database {settings.database}, "
        f"batches of {settings.batch_size}, broker {connection.as_uri()}"
        + (f", metrics on :{settings.metrics_port}" if settings.metrics_port else ""),
        err=True,
    )
    try:
        reporter.run()
    finally:
        connection.release()
        if stop_metrics:
            stop_metrics()
        store.close()
    click.echo(f"reporter {instance} stopped: {dict(reporter.counts)}", err=True)


@reporter_group.command("reindex")
@click.option("--repo", "repo_url", required=True, help="file:///DIR, swift://C/PREFIX, s3://B/P")
@click.option("--node", "node_glob", help="only nodes matching this glob")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path))
@mongo_options
def reindex_command(
    repo_url: str,
    node_glob: str | None,
    config_file: Path | None,
    mongo_url: str | None,
    database: str | None,
) -> None:
    """Rebuild snapshot history in MongoDB from the snapshot records in storage.

    Records are plain JSON: no key is needed. Snapshots of this repository that are no
    longer in storage are removed from MongoDB; storage is the truth.
    """
    from reporter.reindex import reindex

    settings = ReporterSettings.load(config_file, mongo_url=mongo_url, database=database)
    try:
        storage = open_storage(parse_repo_url(repo_url))
    except StorageError as error:
        raise click.ClickException(str(error)) from None
    store = open_store(settings)
    try:
        outcome = reindex(store, storage, repo_url, node_glob)
    except StorageError as error:
        raise click.ClickException(str(error)) from None
    finally:
        store.close()
    for problem in outcome.errors:
        click.echo(f"skipped {problem}", err=True)
    click.echo(
        f"{outcome.found} snapshot records found, {outcome.written} written, "
        f"{outcome.removed} removed (no longer in storage), {len(outcome.errors)} skipped"
    )


# -- muster status -----------------------------------------------------------------------------


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def ago(value: str | None, now: datetime) -> str:
    moment = parse_time(value)
    if moment is None:
        return "never"
    return human_duration(max(0.0, (now - moment).total_seconds())) + " ago"


def console() -> Console:
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 200))
    return out


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="one JSON document instead of a table")
@click.option("--follow", is_flag=True, help="show progress, results and alerts live (Ctrl-C ends)")
@settings_options
@mongo_options
def status_command(
    as_json: bool,
    follow: bool,
    config_file: Path | None,
    broker_url: str | None,
    mongo_url: str | None,
    database: str | None,
) -> None:
    """The fleet: one line per node and job, with last backup, size, last restore test
    and open alerts. With --follow, the live stream of runs and alerts instead."""
    settings = ReporterSettings.load(
        config_file, broker_url=broker_url, mongo_url=mongo_url, database=database
    )
    if follow:
        patterns = [EVENT_TYPES["status"], EVENT_TYPES["result"], EVENT_TYPES["alert"]]
        tail(settings, patterns, lambda message: click.echo(describe(message)), None)
        return
    store = open_store(settings)
    try:
        nodes = fleet_status(store)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"nodes": nodes}, indent=2))
        return
    render_status(nodes, datetime.now(UTC))


def render_status(nodes: list[dict[str, Any]], now: datetime) -> None:
    table = Table(
        "node", "last seen", "job", "last backup", "size", "last restore test", "open alerts"
    )
    for node in nodes:
        alerts = ", ".join(f"{a['kind']} ({a['severity']})" for a in node["alerts"]) or "-"
        seen = ago(node.get("last_seen"), now)
        if node.get("unprotected"):
            seen += " (empty plan)"
        jobs = node["jobs"] or [None]
        for index, job in enumerate(jobs):
            first = index == 0
            if job is None:
                cells = ["-", "-", "-", "-"]
            else:
                backup = job.get("last_backup")
                verify = job.get("last_restore_test")
                cells = [
                    job["job"],
                    f"{ago(backup['time'], now)} {backup['status']}" if backup else "never",
                    human_size(backup.get("bytes_stored") or 0) if backup else "-",
                    f"{ago(verify['time'], now)} {verify['status']}" if verify else "never",
                ]
            table.add_row(
                node["node"] if first else "",
                seen if first else "",
                *cells,
                alerts if first else "",
            )
    console().print(table)


# -- live streams ------------------------------------------------------------------------------


def tail(
    settings: ReporterSettings,
    patterns: Iterable[str],
    show: Callable[[dict[str, Any]], None],
    node_glob: str | None,
) -> None:
    """Print what arrives on a private queue until Ctrl-C (exit 0) or SIGTERM."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a follower started from a background job inherits SIGINT ignored,
    # and Ctrl-C (or `kill -INT`) must still end it.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def on_message(delivery: Any) -> None:
        try:
            message = parse_json(body_bytes(delivery))
        except Exception as error:  # not ours to judge: show what can be shown
            log.warning("unreadable message: %s", error)
            return
        node = message.get("node")
        if node_glob and not (isinstance(node, str) and fnmatch.fnmatchcase(node, node_glob)):
            return
        show(message)

    try:
        with connect(settings.broker_urls, settings.heartbeat) as connection:
            declare(connection)
            channel = connection.channel()
            queue = tail_queue(list(patterns))
            with Consumer(channel, queues=[queue], on_message=on_message, no_ack=True):
                click.echo(f"following {connection.as_uri()} (Ctrl-C ends)", err=True)
                while True:
                    try:
                        connection.drain_events(timeout=1)
                    except TimeoutError:
                        connection.heartbeat_check()
    except KeyboardInterrupt:
        return


def result_figures(kind: Any, stats: dict[str, Any]) -> str:
    """What a run of this kind did, in the words that fit it."""
    if kind == "backup":
        return f", {human_size(stats.get('bytes_stored') or 0)} stored"
    if kind == "verify":
        return (
            f", {stats.get('files_checked', 0)} files checked, "
            f"{stats.get('files_failed', 0)} failed"
        )
    return ""


def describe(message: dict[str, Any]) -> str:
    """One line a person reads, for `status --follow`."""
    when = (message.get("time") or "")[11:19]
    kind = message.get("type")
    node = message.get("node") or "-"
    if kind == "run_status":
        done, total = message.get("bytes_done") or 0, message.get("bytes_total")
        share = f" ({100 * done / total:.0f}%)" if total else ""
        of = f" / {human_size(total)}" if total else ""
        return (
            f"{when} {node} {message.get('job')} {message.get('kind')} {message.get('phase')}: "
            f"{message.get('files_done', 0)} files, {human_size(done)}{of}{share}"
        )
    if kind == "run_result":
        started, finished = parse_time(message.get("started")), parse_time(message.get("finished"))
        took = human_duration((finished - started).total_seconds()) if started and finished else "?"
        line = (
            f"{when} {node} {message.get('job')} {message.get('kind')} {message.get('status')} "
            f"in {took}{result_figures(message.get('kind'), message.get('stats') or {})}"
        )
        if message.get("snapshot"):
            line += f", snapshot {message['snapshot']}"
        if message.get("error"):
            line += f": {message['error']}"
        return line
    if kind == "alert":
        return (
            f"{when} ALERT {message.get('state')} {message.get('severity')} {message.get('key')}: "
            f"{message.get('summary')}"
        )
    return f"{when} {node} {kind}"


@click.command("events")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(sorted(EVENT_TYPES)),
    help="only these types (repeatable) [default: all]",
)
@click.option("--node", "node_glob", help="only nodes matching this glob")
@settings_options
def events_command(
    types: tuple[str, ...], node_glob: str | None, config_file: Path | None, broker_url: str | None
) -> None:
    """Print live events as JSON, one object per line, for piping (Ctrl-C ends)."""
    settings = ReporterSettings.load(config_file, broker_url=broker_url)
    patterns = [EVENT_TYPES[name] for name in types] or list(EVENT_TYPES.values())

    def show(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    tail(settings, patterns, show, node_glob)


# -- muster report -----------------------------------------------------------------------------


def parse_since(text: str, now: datetime) -> datetime:
    """`7d`, `24h`, `90m` (that long ago), `3 days ago`, or a date / time (UTC unless
    it names a zone; a bare date is the start of that day)."""
    value = text.strip()
    try:
        return now - timedelta(seconds=parse_duration(value))
    except (ValueError, TypeError):
        pass
    if value.isdigit():
        return now - timedelta(seconds=int(value))
    from agent.when import BadWhen, parse_when

    if value.endswith(" ago") or value in ("yesterday", "now"):
        try:
            moment = parse_when(value, now)
        except BadWhen as error:
            raise click.BadParameter(str(error)) from None
        if isinstance(moment, datetime):
            return moment
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"cannot read {text!r}: use 7d, 24h, '3 days ago' or a date like 2026-11-20"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@click.command("report")
@click.option("--since", default="7d", show_default=True, help="7d, 24h, '3 days ago', a date")
@click.option("--json", "as_json", is_flag=True, help="one JSON document instead of tables")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path))
@mongo_options
def report_command(
    since: str, as_json: bool, config_file: Path | None, mongo_url: str | None, database: str | None
) -> None:
    """Success rate, bytes, durations and restore-test coverage, per job and for the fleet."""
    now = datetime.now(UTC)
    start = parse_since(since, now)
    settings = ReporterSettings.load(config_file, mongo_url=mongo_url, database=database)
    store = open_store(settings)
    try:
        data = report(store, start)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    render_report(data)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_report(data: dict[str, Any]) -> None:
    out = console()
    table = Table(
        "node", "job", "backups", "success", "read", "stored", "avg time", "max time",
        "restore tests", "tested", title=f"runs finished since {data['since']}",
    )  # fmt: skip
    for row in data["jobs"]:
        backup = row.get("backup") or {}
        verify = row.get("restore_test") or {}
        table.add_row(
            row["node"],
            row["job"],
            str(backup.get("runs", 0)),
            _rate(backup.get("success_rate")),
            human_size(backup.get("bytes_read", 0)),
            human_size(backup.get("bytes_stored", 0)),
            human_duration(backup["duration_avg"]) if backup.get("duration_avg") else "-",
            human_duration(backup["duration_max"]) if backup.get("duration_max") else "-",
            f"{verify.get('succeeded', 0)}/{verify.get('runs', 0)}",
            "yes" if row["restore_tested"] else "no",
        )
    out.print(table)
    fleet = data["fleet"]
    backup = fleet.get("backup") or {}
    verify = fleet.get("restore_test") or {}
    out.print(
        f"fleet: {fleet['nodes']} nodes, {fleet['jobs']} jobs; "
        f"{backup.get('runs', 0)} backups, success {_rate(backup.get('success_rate'))}, "
        f"{human_size(backup.get('bytes_read', 0))} read, "
        f"{human_size(backup.get('bytes_stored', 0))} stored; "
        f"{verify.get('runs', 0)} restore tests, success {_rate(verify.get('success_rate'))}; "
        f"restore-test coverage {_rate(fleet.get('restore_test_coverage'))}"
    )
