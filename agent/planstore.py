"""The node's plan on disk: only verified plans get in, and never an older one.

`<state_dir>/plan.json` holds the signed plan message as it was received (the plan object
byte for byte in its canonical form, so the signature still verifies), readable by its
owner only. It is replaced atomically (temporary file, fsync, rename, fsync of the
directory): after a crash it holds the old plan or the new one, never half of either.

On start the daemon loads it and verifies it again against the keys pinned now, so a plan
stored under a key that was since withdrawn is not run. `muster backup` and `muster restore`
read the same file (see agent/context.py), so they need no flags on a node.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.errors import ContractError, SignatureError
from broker.messages import SignedPlan
from broker.plan import Plan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"  # as agent.context.PLAN_FILE: the commands find it there


class PlanRejected(ContractError):
    """A plan that must not be run: forged, for another node, unknown key, or older."""


class PlanStore:
    """`verify` raises SignatureError unless a plan is signed by a trusted key and meant for
    this node (broker.signing.verify_plan, which the daemon calls in a child process so
    that it never loads cryptography itself). `validate` turns the stored JSON into the
    message; the daemon does that in a child process too, for the same reason: validating a
    cron schedule loads croniter."""

    def __init__(
        self,
        state_dir: Path,
        verify: Callable[[SignedPlan], object],
        validate: Callable[[Any], SignedPlan] = SignedPlan.model_validate,
    ) -> None:
        self.path = state_dir / PLAN_FILE
        self.verify = verify
        self.validate = validate
        self.current: SignedPlan | None = None

    @property
    def plan(self) -> Plan | None:
        return self.current.plan if self.current is not None else None

    def load(self) -> Plan | None:
        """The stored plan if it still verifies; None (and a log line) otherwise. Raises
        PlanRejected when a stored plan exists but fails verification, so the caller can
        raise an alert; the file is left where it is for an operator to look at."""
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise PlanRejected(f"stored plan {self.path} is unreadable: {error}") from None
        try:
            signed = self.validate(data)
            self.verify(signed)
        except (ContractError, ValueError) as error:
            raise PlanRejected(f"stored plan {self.path} no longer verifies: {error}") from None
        self.current = signed
        return signed.plan

    def offer(self, signed: SignedPlan) -> bool:
        """Verify a received plan and store it. Returns whether its content differs from
        the plan held before; raises PlanRejected with the reason when it is refused."""
        try:
            self.verify(signed)
        except SignatureError as error:
            raise PlanRejected(str(error)) from None
        plan = signed.plan
        held = self.current
        if held is not None and plan.issued < held.plan.issued:
            raise PlanRejected(
                f"plan issued {plan.issued.isoformat()} is older than the plan held, issued "
                f"{held.plan.issued.isoformat()}: a replay, or a rule engine with a slow clock"
            )
        changed = held is None or held.plan.content_hash() != plan.content_hash()
        if held is None or held.plan.issued != plan.issued or changed:
            self._write(signed)
        self.current = signed
        return changed

    def _write(self, signed: SignedPlan) -> None:
        data = signed.model_dump(mode="json")
        data["plan"] = json.loads(signed.signed_body)  # what was signed, not our re-dump
        body = json.dumps(data, indent=1, ensure_ascii=False).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            temp.rename(self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("stored plan %s issued %s", signed.plan.content_hash(), signed.plan.issued)
