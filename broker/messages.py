"""Every message that crosses RabbitMQ, as pydantic models serialised to plain JSON.

Each message carries `type` (the discriminator), `schema_version`, a unique `id` (for
at-most-once processing under redelivery) and a UTC `time`. Receivers ignore fields they
do not know, so a newer sender never breaks an older receiver.
"""

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidatorFunctionWrapHandler, model_validator

from broker.canonical import canonical_json
from broker.plan import ContractModel, Plan
from broker.types import AgeRecipient, JobName, NodeId, UtcDatetime, utcnow

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


class Message(ContractModel):
    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    time: UtcDatetime = Field(default_factory=utcnow)


class OsFacts(ContractModel):
    family: str = ""  # "debian", "rhel", ...
    name: str = ""
    version: str = ""
    kernel: str = ""


class CloudFacts(ContractModel):
    """OpenStack-flavoured metadata; `metadata` holds the instance's own key/values
    (e.g. role: db), which rules match on as readily as on the fixed keys."""

    provider: str | None = None
    project: str | None = None
    availability_zone: str | None = None
    instance_id: str | None = None
    image: str | None = None
    flavor: str | None = None
    metadata: dict[str, str] = {}


class Facts(ContractModel):
    hostname: str
    fqdn: str
    addresses: list[str] = Field(default=[], description="interface addresses in CIDR form")
    os: OsFacts = OsFacts()
    cloud: CloudFacts = CloudFacts()
    labels: dict[str, str] = {}


class Announce(Message):
    type: Literal["announce"] = "announce"
    node: NodeId
    facts: Facts
    agent_version: str
    recipient: AgeRecipient
    plan_hash: str | None = None


class Keepalive(Message):
    type: Literal["keepalive"] = "keepalive"
    node: NodeId
    plan_hash: str | None = None
    uptime: float = Field(ge=0, description="seconds since the agent started")
    interval: int = Field(default=20, gt=0, description="seconds until the next keepalive")
    running: list[JobName] = []
    facts: Facts | None = Field(
        default=None,
        description="the node's current facts, so that a stateless rule engine can recompute "
        "its plan on every keepalive; without them the rule engine sends nothing",
    )


class PlanSignature(ContractModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str = Field(description="base64 signature over the canonical JSON of `plan`")


class SignedPlan(Message):
    """A plan and its signature. The exact bytes that were signed are kept from the
    received JSON, so a plan with fields (or defaults) this version does not know still
    verifies: the contract signs what was sent, not our re-serialisation of it."""

    type: Literal["plan"] = "plan"
    plan: Plan
    signature: PlanSignature
    _signed_body: bytes = PrivateAttr(default=b"")

    @model_validator(mode="wrap")
    @classmethod
    def _keep_signed_body(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> "SignedPlan":
        model = handler(data)
        raw = data.get("plan") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            raw = model.plan.model_dump(mode="json")
        model._signed_body = canonical_json(raw)
        return model

    @property
    def signed_body(self) -> bytes:
        return self._signed_body

    @classmethod
    def of(cls, plan: Plan, signature: PlanSignature, signed_body: bytes) -> "SignedPlan":
        """The message for a plan this process just built and signed. The plan is already
        a validated model: validating it again from its dump cost the rule engine 0.7 ms
        per plan, more than half of signing it."""
        # id and time given: pydantic's default factories cost more than the rest of it
        model = cls.model_construct(plan=plan, signature=signature, id=new_id(), time=utcnow())
        model._signed_body = signed_body
        return model


RunKind = Literal["backup", "verify", "forget", "restore"]


class RunStatus(Message):
    """Progress of a running job; frequent and disposable, unlike RunResult."""

    type: Literal["run_status"] = "run_status"
    node: NodeId
    job: JobName
    run_id: str
    kind: RunKind
    phase: str = "running"
    files_done: int = Field(default=0, ge=0)
    bytes_done: int = Field(default=0, ge=0)
    files_total: int | None = None
    bytes_total: int | None = None


class RunStats(ContractModel):
    files: int = 0
    files_new: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    volumes: int = 0
    files_checked: int = 0
    files_failed: int = 0
    volumes_tested: int = 0
    coverage: float | None = Field(default=None, ge=0, le=1)


class HookResult(ContractModel):
    command: str | list[str]
    exit_code: int | None = Field(description="None when the hook timed out")
    duration: float
    output: str = Field(default="", description="combined output, truncated")


class RunResult(Message):
    type: Literal["run_result"] = "run_result"
    node: NodeId
    job: JobName
    run_id: str
    kind: RunKind
    status: Literal["success", "warning", "failure", "interrupted"]
    started: UtcDatetime
    finished: UtcDatetime
    snapshot: str | None = None
    full: bool | None = None
    stats: RunStats = RunStats()
    warnings: list[str] = []
    error: str | None = None
    hooks: list[HookResult] = []


class Alert(Message):
    """An alert changed state. `key` identifies the condition (kind + node + job), so
    the raise and the resolution of one condition share it."""

    type: Literal["alert"] = "alert"
    key: str
    kind: str = Field(
        description="keepalive, overdue, restore_test, unprotected, plan_rejected, "
        "rules_invalid, ..."
    )
    state: Literal["open", "resolved"]
    severity: Literal["warning", "critical"] = "warning"
    source: str = Field(description="the process that raised it: agent, ruleengine, reporter")
    node: NodeId | None = None
    job: JobName | None = None
    summary: str
    details: dict[str, Any] = {}


AnyMessage = Annotated[
    Announce | Keepalive | SignedPlan | RunStatus | RunResult | Alert,
    Field(discriminator="type"),
]
