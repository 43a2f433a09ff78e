"""Commands for the contract itself: declare the topology, read dead letters, make keys."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from broker.config import MusterSettings
from broker.connection import QUEUE_HEADER, REASON_HEADER, body_bytes, connect
from broker.topology import DEAD_QUEUE, declare

# rich (tables) and broker.signing (cryptography) are imported by the commands that use
# them: the agent daemon imports `settings_options` from here and must stay small.


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--config` and `--broker-url`, the options every connected command shares."""
    command = click.option(
        "--broker-url",
        help="AMQP URL(s), ';'-separated for failover [env MUSTER_BROKER_URL; default "
        "amqp://muster/]",
    )(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML settings file [env MUSTER_CONFIG]",
    )(command)


def load_settings(config_file: Path | None, broker_url: str | None) -> MusterSettings:
    return MusterSettings.load(config_file, broker_url=broker_url)


@click.group("broker")
def broker_group() -> None:
    """The RabbitMQ side: topology and dead letters."""


@broker_group.command("declare")
@settings_options
def declare_command(config_file: Path | None, broker_url: str | None) -> None:
    """Declare Muster's exchanges and queues (idempotent; every process does it too)."""
    settings = load_settings(config_file, broker_url)
    with connect(settings.broker_urls, settings.heartbeat) as connection:
        declare(connection)
        click.echo(f"topology declared on {connection.as_uri()}")


@broker_group.command("dead-letters")
@settings_options
@click.option("--limit", default=20, show_default=True, help="how many to show")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dead_letters_command(
    config_file: Path | None, broker_url: str | None, limit: int, as_json: bool
) -> None:
    """Show messages that failed validation, with the reason; they stay queued."""
    settings = load_settings(config_file, broker_url)
    with connect(settings.broker_urls, settings.heartbeat) as connection:
        declare(connection)
        letters = peek(connection, limit)
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("queue", "routing key", "reason", "body")
    for letter in letters:
        table.add_row(letter["queue"], letter["routing_key"], letter["reason"], letter["body"])
    Console().print(table)


def peek(connection: Any, limit: int) -> list[dict[str, str]]:
    """Read up to `limit` dead letters without consuming them: nothing is acknowledged,
    so closing the channel hands every one back to the queue."""
    letters = []
    with connection.channel() as channel:
        queue = DEAD_QUEUE(channel)
        while len(letters) < limit and (delivery := queue.get(no_ack=False)) is not None:
            headers = delivery.headers or {}
            letters.append(
                {
                    "queue": str(headers.get(QUEUE_HEADER, "")),
                    "routing_key": delivery.delivery_info.get("routing_key", ""),
                    "reason": str(headers.get(REASON_HEADER, "")),
                    "body": body_bytes(delivery)[:500].decode("utf-8", "replace"),
                }
            )
    return letters


@click.group("keys")
def keys_group() -> None:
    """Keys: node identities (age) and the rule engine's plan-signing key."""


@keys_group.command("generate-signing-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def generate_signing_key_command(path: Path) -> None:
    """Write an Ed25519 plan-signing key to PATH (mode 0600) and its public half to
    PATH.pub, the file every agent pins."""
    from broker.signing import generate_signing_key, key_id, public_pem

    if path.exists():
        raise click.ClickException(f"{path} exists; refusing to overwrite a signing key")
    key = generate_signing_key(path)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(public_pem(key.public_key()))
    click.echo(f"signing key {key_id(key.public_key())}: private {path}, public {public}")
