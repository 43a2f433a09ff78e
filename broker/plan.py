"""The backup plan: the contract between the rule engine, which writes it, and the agent.

A plan says what to back up, where, when, how long to keep it and how to test restores.
It never holds a secret: storage credentials are named by reference and resolved on the
node, so a plan can be logged, stored and diffed freely.
"""

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.canonical import canonical_json
from broker.types import AgeRecipient, Duration, JobName, NodeId, Size, UtcDatetime


class ContractModel(BaseModel):
    """Tolerates (and keeps) fields from newer senders, so that a re-dumped plan still
    carries everything that was signed and hashed."""

    model_config = ConfigDict(extra="allow", frozen=True)


class CredentialRef(ContractModel):
    """Where the node finds the secret for a target: a local file, or environment
    variables with a prefix. Unset means the tool's usual environment (OS_*, AWS_*)."""

    file: str | None = None
    env_prefix: str | None = Field(default=None, pattern=r"^[A-Z][A-Z0-9_]*$")


class _Target(ContractModel):
    prefix: str = ""
    credentials: CredentialRef = CredentialRef()
    endpoint: str | None = None
    proxy: str | None = None

    @field_validator("prefix")
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        return value.strip("/")


class SwiftTarget(_Target):
    kind: Literal["swift"] = "swift"
    container: str = Field(min_length=1)
    region: str | None = None


class S3Target(_Target):
    kind: Literal["s3"] = "s3"
    bucket: str = Field(min_length=1)
    region: str | None = None


class LocalTarget(_Target):
    kind: Literal["local"] = "local"
    path: str = Field(pattern=r"^/")


StorageTarget = Annotated[SwiftTarget | S3Target | LocalTarget, Field(discriminator="kind")]


class Sources(ContractModel):
    paths: list[Annotated[str, Field(pattern=r"^/")]] = Field(min_length=1)
    excludes: list[str] = []
    one_file_system: bool = False


class Schedule(ContractModel):
    """Exactly one of `cron` or `every`; `splay` spreads a fleet's runs over a window."""

    cron: str | None = None
    every: Duration | None = Field(default=None, gt=0)
    splay: Duration = 0

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from croniter import croniter  # here: 50 ms of every command's start-up otherwise

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"not a five-field cron expression: {value!r}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "Schedule":
        if (self.cron is None) == (self.every is None):
            raise ValueError("set exactly one of 'cron' or 'every'")
        return self


class Retention(ContractModel):
    """Restic-style keep rules; all zero keeps every snapshot."""

    keep_last: int = Field(default=0, ge=0)
    keep_hourly: int = Field(default=0, ge=0)
    keep_daily: int = Field(default=0, ge=0)
    keep_weekly: int = Field(default=0, ge=0)
    keep_monthly: int = Field(default=0, ge=0)
    keep_yearly: int = Field(default=0, ge=0)


class Hook(ContractModel):
    """A command run before or after a backup. A string runs through /bin/sh, a list is
    run as argv. Hooks only ever come from signed plans."""

    command: str | list[str] = Field(min_length=1)
    timeout: Duration = Field(default=300, gt=0)


class Hooks(ContractModel):
    pre: list[Hook] = []
    post: list[Hook] = []


class RestoreTest(ContractModel):
    enabled: bool = True
    every: Duration = Field(default=7 * 86400, gt=0)
    sample: int = Field(default=20, ge=1)
    max_duration: Duration | None = None


class Job(ContractModel):
    name: JobName
    storage: StorageTarget
    sources: Sources
    schedule: Schedule | None = Field(default=None, description="unset: run only on demand")
    retention: Retention = Retention()
    full_every: int = Field(default=7, ge=1, description="every Nth snapshot is a full one")
    compression_level: int = Field(default=3, ge=1, le=19)
    recipients: list[AgeRecipient] = Field(
        default=[], description="escrow holders; the node's own key is always added"
    )
    hooks: Hooks = Hooks()
    restore_test: RestoreTest = RestoreTest()
    bandwidth_limit: Size | None = Field(default=None, description="bytes per second")
    volume_size: Size = Field(default=Size(128 * 1024 * 1024), gt=0)


class Plan(ContractModel):
    """Everything one node must do. `issued` lets a node refuse an older plan replayed
    to it; it is left out of the content hash so that recomputing an unchanged plan
    does not look like a change."""

    node: NodeId
    issued: UtcDatetime
    jobs: list[Job] = []

    @field_validator("jobs")
    @classmethod
    def _unique_names(cls, jobs: list[Job]) -> list[Job]:
        names = [job.name for job in jobs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate job names: {', '.join(duplicates)}")
        return jobs

    def content_hash(self) -> str:
        body = self.model_dump(mode="json", exclude={"issued"})
        return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(f"plan for {self.node} has no job {name!r}")
