"""The root of `muster`: global options, logging, and errors people can act on."""

import gc
import logging
import sys

import click

from broker.errors import ContractError
from muster import LOG_FORMAT, __version__
from muster.loading import import_frozen

# Each command is imported only when it runs: `muster restore` need not load MongoDB,
# the rule engine and the daemon first. `muster --help` imports them all.
COMMANDS = {
    "agent": "agent.daemon_cli:agent_group",
    "backup": "agent.cli:backup_command",
    "broker": "broker.cli:broker_group",
    "events": "reporter.cli:events_command",
    "find": "agent.restore_cli:find_command",
    "forget": "agent.restore_cli:forget_command",
    "keys": "agent.cli:keys_group",
    "ls": "agent.restore_cli:ls_command",
    "report": "reporter.cli:report_command",
    "reporter": "reporter.cli:reporter_group",
    "restore": "agent.restore_cli:restore_command",
    "rules": "ruleengine.cli:rules_group",
    "ruleengine": "ruleengine.cli:ruleengine_group",
    "snapshots": "agent.cli:snapshots_command",
    "status": "reporter.cli:status_command",
    "up": "muster.up:up_command",
    "verify": "agent.restore_cli:verify_command",
    "versions": "agent.restore_cli:versions_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(import_frozen(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="muster")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    envvar="MUSTER_LOG_LEVEL",
)
def cli(log_level: str) -> None:
    """Muster: fleet backup. Agents announce themselves, rules assign signed plans,
    backups go straight to object storage as tar + zstd + age."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)


def main() -> None:
    try:
        _run()
    finally:
        # The interpreter's exit collects garbage over every object still alive (tens of
        # thousands, pydantic's schemas among them): 30-60 ms of a 0.6 s incremental
        # backup. Frozen objects are skipped; the rest of the exit (buffers flushed,
        # modules released, atexit) is unchanged.
        gc.freeze()


def _run() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ContractError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except Exception as error:
        if not _broker_unreachable(error):
            raise
        click.echo(
            f"error: cannot reach the message broker: {error}\n"
            "Point MUSTER_BROKER_URL (or --broker-url, or broker_url in the config file) "
            "at your RabbitMQ.",
            err=True,
        )
        sys.exit(3)


def _broker_unreachable(error: Exception) -> bool:
    """kombu's connection error, looked up only if kombu is loaded: a command that never
    talks to the broker (`muster backup` from a plan file) then never imports kombu and
    amqp (with ssl, about 16 ms of its start-up), and cannot have raised that error."""
    exceptions = sys.modules.get("kombu.exceptions")
    return exceptions is not None and isinstance(error, exceptions.OperationalError)
