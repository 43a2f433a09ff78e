"""The reporter's settings: flag > `MUSTER_*` environment > /etc/muster/reporter.yaml > default.

MongoDB is named by `mongo_url` (`MUSTER_MONGO_URL`); it holds history only, never the
ability to restore, so losing it costs reports, not backups (`muster reporter reindex`
rebuilds snapshot history from storage).

Thresholds follow Sensu's keepalive model: a node is late when it has been silent for a
number of its own announced keepalive intervals (a warning after `keepalive_warning`,
critical after `keepalive_critical`). A backup is overdue when its last success is older
than the job allows: a configured `max_age` for the job, or else the usual interval between
its recent successful runs plus `overdue_margin` (see docs/REPORTER.md).

`max_age` maps a glob over `node/job` (or just `job`) to a duration, e.g.
`MUSTER_MAX_AGE='{"*/etc": "26h", "db*/pg": "2h"}'` or, in the YAML file, a mapping.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from broker.config import MusterSettings
from broker.types import Duration


class ReporterSettings(MusterSettings):
    """What `muster reporter run`, `muster status` and `muster report` read."""

    default_file: ClassVar[Path] = Path("/etc/muster/reporter.yaml")

    mongo_url: str = Field(
        default="mongodb://localhost:27017/",
        description="MongoDB URI (a replica set for majority writes) [env MUSTER_MONGO_URL]",
    )
    database: str = Field(
        default="muster",
        pattern=r"^[A-Za-z0-9_-]{1,63}$",
        description="MongoDB database name [env MUSTER_DATABASE]",
    )
    mongo_timeout: float = Field(
        default=5.0, gt=0, description="seconds to find a usable MongoDB server per operation"
    )
    write_concern: str = Field(
        default="majority", description="w of every write: majority (default), or a number"
    )
    journal: bool = Field(
        default=True,
        description="end every batch with one journaled (j: true) write, so that the batch "
        "is on disk before its messages are acknowledged",
    )

    @property
    def mongo_location(self) -> str:
        """The MongoDB address without the user and password, for messages and logs."""
        return self.mongo_url.split("@")[-1]

    # -- batching ------------------------------------------------------------------------
    batch_size: int = Field(default=1000, ge=1, le=10_000, description="deliveries per write")
    flush_interval: float = Field(
        default=0.5, gt=0, le=60, description="seconds a partial batch may wait before its write"
    )
    prefetch: int | None = Field(
        default=None, ge=1, description="unacknowledged deliveries [default: 2 x batch_size]"
    )
    retry_max: float = Field(
        default=30.0, gt=0, description="longest wait, in seconds, between MongoDB retries"
    )

    # -- watchdog ------------------------------------------------------------------------
    watchdog_interval: float = Field(
        default=10.0, gt=0, description="seconds between two checks of the whole fleet"
    )
    keepalive_warning: float = Field(
        default=3.0, gt=0, description="warning after this many missed keepalive intervals"
    )
    keepalive_critical: float = Field(
        default=6.0, gt=0, description="critical after this many missed keepalive intervals"
    )
    default_keepalive_interval: Duration = Field(
        default=20, gt=0, description="seconds, for a node that announced but never kept alive"
    )
    overdue_margin: Duration = Field(
        default=3600,
        ge=0,
        description="seconds added to a job's usual interval between successful backups "
        "(splay, run time) before it is overdue",
    )
    overdue_history: int = Field(
        default=5,
        ge=2,
        description="recent successful backups whose spacing gives a job's usual interval",
    )
    overdue_critical: float = Field(
        default=2.0, ge=1, description="critical once the allowed age is exceeded this many times"
    )
    max_age: dict[str, Duration] = Field(
        default={},
        description="glob over 'node/job' (or 'job') -> the oldest a last success may be; "
        "overrides the learned interval",
    )
    default_max_age: Duration | None = Field(
        default=None,
        gt=0,
        description="for jobs with too little history to learn an interval; unset: wait",
    )
    unprotected_grace: Duration = Field(
        default=300,
        ge=0,
        description="seconds a node may hold no plan at all before it is called unprotected",
    )
    republish_after: float = Field(
        default=30.0, gt=0, description="seconds before an unconfirmed alert is published again"
    )

    # -- metrics -------------------------------------------------------------------------
    metrics_port: int = Field(
        default=9467, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it"
    )
    metrics_host: str = Field(default="0.0.0.0", description="address /metrics listens on")
    metrics_cache: float = Field(
        default=5.0, ge=0, description="seconds a scrape's MongoDB reads are reused"
    )

    @field_validator("max_age", mode="before")
    @classmethod
    def _max_age_from_text(cls, value: Any) -> Any:
        """JSON, or `GLOB=DURATION,GLOB=DURATION` as in the other comma-separated maps."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, duration = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"max_age entry {item!r} is not GLOB=DURATION")
            pairs[key.strip()] = duration.strip()
        return pairs

    @field_validator("write_concern")
    @classmethod
    def _valid_w(cls, value: str) -> str:
        if value != "majority" and not value.isdigit():
            raise ValueError("write_concern is 'majority' or a number of members")
        return value

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> ReporterSettings:
        if self.keepalive_critical < self.keepalive_warning:
            raise ValueError("keepalive_critical must not be below keepalive_warning")
        return self

    @property
    def w(self) -> int | str:
        return int(self.write_concern) if self.write_concern.isdigit() else self.write_concern

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or 2 * self.batch_size

    def max_age_for(self, node: str, job: str) -> int | None:
        """The configured maximum age for a job: the first glob that matches `node/job`
        (or the bare job name), in the order given."""
        for pattern, seconds in self.max_age.items():
            if fnmatch.fnmatchcase(f"{node}/{job}", pattern) or fnmatch.fnmatchcase(job, pattern):
                return seconds
        return None
