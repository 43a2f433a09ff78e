"""`muster up`: Muster's central part from one command, or the whole system in one process.

`muster up` runs the rule engine and the reporter (muster.central) against the RabbitMQ,
MongoDB and rules named in one settings file; agents run on their nodes.
`muster up --embedded` runs everything, simulated nodes included, with no server at all
(muster.embedded).
"""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import FrameType

import click

from broker.cli import settings_options
from broker.up_config import UpSettings
from muster.central import Central, CentralError
from muster.mongo import MongoUnavailable
from reporter.cli import mongo_options
from ruleengine.cli import engine_options


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT (even where a shell ignores it for background jobs) end
    `muster up` as Ctrl-C does, by KeyboardInterrupt in the main thread,
    so every `finally` runs: threads stop in order, and the embedded MongoDB server (a
    child in a session of its own) is stopped instead of orphaned."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM; both end the wait the same orderly way."""
    with suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


@click.command("up")
@click.option(
    "--embedded",
    is_flag=True,
    help="everything in this process: in-memory broker, embedded MongoDB-protocol server, "
    "simulated nodes, local storage; then a restore, a report, and exit",
)
@click.option(
    "--keep-running", is_flag=True, help="with --embedded: keep the fleet up until Ctrl-C"
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="with --embedded: keep rules, keys, node data and backups here [default: a temporary "
    "directory, removed at exit]",
)
@click.option(
    "--secantusd",
    type=click.Path(dir_okay=False, path_type=Path),
    help="with --embedded: the SecantusDB server [env MUSTER_SECANTUSD; default: "
    ".services/venv-secantus/bin/secantusd-py, then the PATH]",
)
@engine_options
@mongo_options
@settings_options
def up_command(
    embedded: bool,
    keep_running: bool,
    workdir: Path | None,
    secantusd: Path | None,
    rules: Path | None,
    signing_key: Path | None,
    mongo_url: str | None,
    database: str | None,
    config_file: Path | None,
    broker_url: str | None,
) -> None:
    """Run Muster's central part, the rule engine and the reporter, from one settings
    file (/etc/muster/up.yaml, --config or MUSTER_CONFIG: the keys of ruleengine.yaml and
    reporter.yaml together) until Ctrl-C. Agents run on their nodes (`muster agent run`).

    With --embedded, the whole system runs in this process with no server to install:
    three simulated nodes receive their plans, back up and test restores; a lost file
    comes back with `muster restore` and with age, zstd and tar; the fleet report is
    printed. Exits 0 when every step passed.
    """
    if not embedded and (keep_running or workdir or secantusd):
        raise click.UsageError("--keep-running, --workdir and --secantusd go with --embedded")
    if embedded and (rules or signing_key or mongo_url or database or config_file or broker_url):
        raise click.UsageError(
            "--embedded brings its own broker, MongoDB, rules and key: drop --rules, "
            "--signing-key, --mongo-url, --database, --config and --broker-url"
        )
    with signals_interrupt():
        try:
            if embedded:
                run_embedded_command(workdir, secantusd, keep_running)
                return
            settings = UpSettings.load(
                config_file,
                broker_url=broker_url,
                rules=rules,
                signing_key=signing_key,
                mongo_url=mongo_url,
                database=database,
            )
            run_central(settings)
        except KeyboardInterrupt:
            raise click.Abort() from None


def run_central(settings: UpSettings) -> None:
    central = Central(settings)
    try:
        central.start()
        click.echo(
            f"muster up: rule engine ({settings.rules}) and reporter "
            f"({settings.mongo_location} database {settings.database}) on "
            f"{central.engine.connection.as_uri()}; Ctrl-C stops",  # type: ignore[union-attr]
            err=True,
        )
        wait_for_interrupt()
    except CentralError as error:
        raise click.ClickException(str(error)) from None
    finally:
        central.stop()
    click.echo("muster up: stopped", err=True)


def run_embedded_command(workdir: Path | None, secantusd: Path | None, keep_running: bool) -> None:
    from muster.embedded import run_embedded

    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="muster-up-")))
        try:
            run_embedded(workdir.resolve(), secantusd, keep_running, wait_for_interrupt)
        except (MongoUnavailable, CentralError) as error:
            raise click.ClickException(str(error)) from None
