"""The agent daemon's settings: flag > `MUSTER_*` environment > /etc/muster/agent.yaml > default.

Every default works on a node that was given nothing at all: the broker is `amqp://muster/`,
the node id is the host's FQDN, state lives in /var/lib/muster (root) or the user's state
home. The one thing an operator must add before a node accepts plans is the rule engine's
public key (`trusted_keys`); without it the agent announces itself, sends keepalives and
refuses every plan, with an alert saying why.

Lists and maps may be given in the environment as JSON or, more simply, separated by commas:
`MUSTER_TRUSTED_KEYS=/etc/muster/a.pub,/etc/muster/b.pub`, `MUSTER_LABELS=tier=web,dc=ams`.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from broker.config import MusterSettings
from broker.types import Duration, NodeId

DEFAULT_METADATA_URL = "http://169.254.169.254/openstack/latest/meta_data.json"
DEFAULT_CLOUD_INIT_PATH = Path("/run/cloud-init/instance-data.json")
DEFAULT_CONFIG_DRIVE_PATH = Path("/mnt/config")  # where config-2 is mounted, as in Nova's docs
DEFAULT_STATE_DIR = Path("/var/lib/muster")

_NOT_NODE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def default_node_id() -> str:
    """This host's fully qualified name made into a valid node id (the same rule as
    `agent.context.default_node`, which the unit tests hold it to)."""
    names = [socket.getfqdn(), socket.gethostname()]
    chosen = next((n for n in names if n and not n.startswith("localhost")), names[-1])
    return _NOT_NODE_CHARS.sub("-", chosen).lstrip("._-")[:253] or "localhost"


def default_state_dir() -> Path:
    """Root keeps state in /var/lib/muster, an ordinary user in their own state home (as
    `agent.state.default_state_dir`; MUSTER_STATE_DIR is read as a setting)."""
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(home) / "muster"


class AgentSettings(MusterSettings):
    """What `muster agent run` reads. Sizes of things it keeps are bounded here too."""

    default_file: ClassVar[Path] = Path("/etc/muster/agent.yaml")

    node: NodeId = Field(
        default_factory=default_node_id, description="this node's id [default: its FQDN]"
    )
    labels: dict[str, str] = Field(
        default={}, description="free key/values sent with the facts, for rules to match"
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="plan.json, identity.txt, the spool, schedule state, catalog cache",
    )
    keepalive_interval: Duration = Field(default=20, gt=0, description="seconds")
    facts_interval: Duration = Field(
        default=300, gt=0, description="seconds between two collections of the node's facts"
    )
    metadata_url: str | None = Field(
        default=DEFAULT_METADATA_URL,
        description="OpenStack metadata service, tried when neither cloud-init's instance "
        "data nor a config drive is found; empty disables it",
    )
    metadata_timeout: float = Field(default=2.0, gt=0, le=30, description="seconds")
    cloud_init_path: Path = DEFAULT_CLOUD_INIT_PATH
    config_drive_path: Path = Field(
        default=DEFAULT_CONFIG_DRIVE_PATH,
        description="a mounted OpenStack config drive (or its meta_data.json itself)",
    )
    trusted_keys: list[Path] = Field(
        default=[], description="PEM files of the rule engine's Ed25519 public keys"
    )
    spool_max_files: int = Field(default=10_000, ge=10)
    spool_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    status_interval: float = Field(
        default=2.0, ge=0, description="seconds between two run_status messages of a run"
    )
    reconnect_max: float = Field(
        default=30.0, gt=0, description="longest wait, in seconds, between two connection attempts"
    )
    stop_timeout: float = Field(
        default=20.0, ge=0, description="seconds SIGTERM waits for a run to reach a safe point"
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        labels = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"label {item!r} is not KEY=VALUE")
            labels[key.strip()] = val.strip()
        return labels

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _paths_from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]

    @field_validator("metadata_url")
    @classmethod
    def _empty_disables(cls, value: str | None) -> str | None:
        return value or None
