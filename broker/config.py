"""Settings shared by every Muster process, resolved flag > environment > file > default.

Like Puppet's `puppet` host name, the broker defaults to `amqp://muster/`: an operator
points one DNS name at the RabbitMQ cluster and agents need no configuration at all.

The layering is done here on a plain pydantic model rather than with pydantic-settings:
three dictionaries merged in order are all Muster needs, and pydantic-settings (with
python-dotenv, asyncio and its cloud secret providers) cost the agent daemon 2.6 MiB of
its idle memory (issue #4). Environment values reach the model as strings: `MUSTER_` plus
the field name, in any case; list and map fields parse them in their own validators.
"""

import os
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import InvalidMessage

DEFAULT_BROKER_URL = "amqp://muster/"
ENV_PREFIX = "MUSTER_"


class MusterSettings(BaseModel):
    """Base of every process's settings. Subclasses point `default_file` at their own
    `/etc/muster/<process>.yaml`; `MUSTER_CONFIG` or an explicit path replace it."""

    # validate_default: computed defaults (the node id from the host name) are checked too
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    default_file: ClassVar[Path] = Path("/etc/muster/muster.yaml")

    broker_url: str = Field(
        default=DEFAULT_BROKER_URL,
        description="one AMQP URL, or several separated by ';' for failover across a cluster",
    )
    heartbeat: int = Field(default=20, ge=0, description="AMQP heartbeat in seconds")

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Build settings from flags (None means "not given"), environment and file.

        An explicitly named file must exist; the default file is optional.
        """
        path = config_file or Path(os.environ.get("MUSTER_CONFIG") or cls.default_file)
        if config_file is not None and not path.is_file():
            raise InvalidMessage(f"config file {path} does not exist")
        given = {name: value for name, value in flags.items() if value is not None}
        values = {**cls._from_file(path), **cls._from_environment(), **given}
        try:
            return cls(**values)
        except ValidationError as error:
            raise InvalidMessage.from_validation(
                f"settings (flags, MUSTER_* environment, {path})", error
            ) from None

    @classmethod
    def _from_file(cls, path: Path) -> dict[str, Any]:
        """The YAML file's mapping; nothing when it does not exist or is empty."""
        if not path.is_file():
            return {}
        with path.open(encoding="utf-8") as stream:
            data = yaml.safe_load(stream) or {}
        if not isinstance(data, dict):
            raise InvalidMessage(f"{path}: settings must be a mapping, not {type(data).__name__}")
        return data

    @classmethod
    def _from_environment(cls) -> dict[str, str]:
        """`MUSTER_<FIELD>` for each field, matched case-insensitively; other variables
        (MUSTER_CONFIG, MUSTER_LOG_LEVEL) are not settings and are left alone."""
        environment = {name.upper(): value for name, value in os.environ.items()}
        return {
            field: environment[ENV_PREFIX + field.upper()]
            for field in cls.model_fields
            if ENV_PREFIX + field.upper() in environment
        }

    @property
    def broker_urls(self) -> list[str]:
        return [url.strip() for url in self.broker_url.split(";") if url.strip()]
