"""The root of `muster`: global options, logging, and errors people can act on."""

import logging
import sys

import click
from kombu.exceptions import OperationalError

from agent.cli import register as register_agent_commands
from agent.daemon_cli import register as register_daemon_commands
from agent.restore_cli import register_restore_commands
from broker.cli import broker_group, keys_group
from broker.errors import ContractError
from muster import __version__
from reporter.cli import register as register_reporter_commands
from ruleengine.cli import register as register_ruleengine_commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


cli.add_command(broker_group)
cli.add_command(keys_group)
register_agent_commands(cli)
register_daemon_commands(cli)
register_ruleengine_commands(cli)
register_restore_commands(cli)
register_reporter_commands(cli)


def main() -> None:
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
    except OperationalError as error:
        click.echo(
            f"error: cannot reach the message broker: {error}\n"
            "Point MUSTER_BROKER_URL (or --broker-url, or broker_url in the config file) "
            "at your RabbitMQ.",
            err=True,
        )
        sys.exit(3)
