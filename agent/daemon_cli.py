"""`muster agent run`: the daemon every node runs (see agent/daemon.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from agent.daemon_main import exec_daemon
from broker.agent_config import AgentSettings
from broker.cli import settings_options


@click.group("agent")
def agent_group() -> None:
    """The node's agent daemon."""


def _labels(
    _context: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str] | None:
    labels = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        labels[key] = text
    return labels or None


@agent_group.command("run")
@settings_options
@click.option("--node", help="this node's id [env MUSTER_NODE; default: the host's FQDN]")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="plan, identity, spool, schedule state [env MUSTER_STATE_DIR; default "
    "/var/lib/muster as root]",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_labels,
    help="a label sent with the facts (repeatable) [env MUSTER_LABELS=k=v,k2=v2]",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="the rule engine's public key file (repeatable) [env MUSTER_TRUSTED_KEYS=a.pub,b.pub]",
)
@click.option(
    "--keepalive-interval",
    type=int,
    help="seconds between keepalives [env MUSTER_KEEPALIVE_INTERVAL; default 20]",
)
@click.option(
    "--metadata-url",
    help="OpenStack metadata service, '' to disable [env MUSTER_METADATA_URL; default "
    "http://169.254.169.254/openstack/latest/meta_data.json]",
)
def run_command(
    config_file: Path | None,
    broker_url: str | None,
    node: str | None,
    state_dir: Path | None,
    labels: dict[str, str] | None,
    trusted_keys: tuple[Path, ...],
    keepalive_interval: int | None,
    metadata_url: str | None,
) -> None:
    """Run this node's agent until SIGTERM: announce the node with its facts, follow the
    signed plan the rule engine sends, run its backups and restore tests on schedule and
    report every run. Needs no options: every setting also comes from MUSTER_* variables
    or /etc/muster/agent.yaml. Exits 0 after SIGTERM, once the run in progress stopped at a
    safe point (reported as `interrupted`)."""
    settings = AgentSettings.load(
        config_file,
        broker_url=broker_url,
        node=node,
        state_dir=state_dir,
        labels=labels,
        trusted_keys=list(trusted_keys) or None,
        keepalive_interval=keepalive_interval,
        metadata_url=metadata_url,
    )
    exec_daemon(settings, logging.getLogger().getEffectiveLevel())
