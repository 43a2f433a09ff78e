"""Settings shared by every Muster process, resolved flag > environment > file > default.

Like Puppet's `puppet` host name, the broker defaults to `amqp://muster/`: an operator
points one DNS name at the RabbitMQ cluster and agents need no configuration at all.
"""

import os
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from broker.errors import InvalidMessage

DEFAULT_BROKER_URL = "amqp://muster/"


class MusterSettings(BaseSettings):
    """Base of every process's settings. Subclasses point `default_file` at their own
    `/etc/muster/<process>.yaml`; `MUSTER_CONFIG` or an explicit path replace it."""

    model_config = SettingsConfigDict(env_prefix="MUSTER_", extra="forbid", frozen=True)
    default_file: ClassVar[Path] = Path("/etc/muster/muster.yaml")

    broker_url: str = Field(
        default=DEFAULT_BROKER_URL,
        description="one AMQP URL, or several separated by ';' for failover across a cluster",
    )
    heartbeat: int = Field(default=20, ge=0, description="AMQP heartbeat in seconds")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **_: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # `load` layers the sources itself, in the documented order

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Build settings from flags (None means "not given"), environment and file.

        An explicitly named file must exist; the default file is optional.
        """
        path = config_file or Path(os.environ.get("MUSTER_CONFIG") or cls.default_file)
        if config_file is not None and not path.is_file():
            raise InvalidMessage(f"config file {path} does not exist")
        given = {name: value for name, value in flags.items() if value is not None}
        values = {**YamlConfigSettingsSource(cls, path)(), **EnvSettingsSource(cls)(), **given}
        try:
            return cls(**values)
        except ValidationError as error:
            raise InvalidMessage.from_validation(
                f"settings (flags, MUSTER_* environment, {path})", error
            ) from None

    @property
    def broker_urls(self) -> list[str]:
        return [url.strip() for url in self.broker_url.split(";") if url.strip()]
