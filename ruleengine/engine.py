"""The rule engine process: announces and keepalives in, signed plans out.

It keeps no state about nodes. Each announce, and each keepalive that carries the
node's facts, is answered from the message alone: compute the node's plan from its
facts and the rules in force, compare its content hash with the hash the node reported,
and publish a freshly signed plan (`issued` = now) only when they differ. A keepalive
without facts is acknowledged and otherwise ignored: nothing can be decided without
them. Because every agent sends its facts with each keepalive, a rules change reaches
every node within one keepalive interval, and any number of engines can share the
`muster.ruleengine` queue as competing consumers.

The rules file is re-read when it changes (its mtime, size or inode, checked every
`reload_interval` seconds) and on SIGHUP. An invalid file is refused: the last good
rules stay in force and a `rules_invalid` alert is published; a valid file resolves it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Connection
from kombu.message import Message as Delivery

from broker.connection import RETRY_POLICY, BatchPublisher, ContractConsumer, acknowledge
from broker.messages import Alert, Announce, AnyMessage, Keepalive, SignedPlan
from broker.rules import Problem, RulesError, RuleSet, load_rules, parse_rules, revision_of
from broker.signing import key_id, sign_plan
from broker.topology import RULEENGINE_QUEUE, plan_queue
from ruleengine.compile import plan_for

log = logging.getLogger(__name__)

ALERT_KIND = "rules_invalid"


@dataclass(frozen=True)
class Reload:
    """What a check of the rules file found: new rules in force, or an invalid file."""

    rules: RuleSet | None = None
    error: RulesError | None = None


class RulesWatcher:
    """The rules in force, and the file they come from."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.current = load_rules(self.path)  # no good rules yet: fail, do not start
        self.failing: RulesError | None = None
        self._failed_revision: str | None = None

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def check(self, force: bool = False) -> Reload | None:
        """Reload if the file changed (or `force`). None when nothing changed: an unchanged
        file, a touched one with the same bytes, or the same invalid bytes again."""
        stamp = self._stat()
        if stamp == self._stamp and not force:
            return None
        self._stamp = stamp
        source = str(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as error:
            revision = "unreadable"
            problem = Problem(0, 0, "", f"cannot read: {error.strerror}", source)
            failure: RulesError | None = RulesError(source, [problem])
        else:
            revision, failure = revision_of(data), None
        if revision == self._failed_revision or (
            revision == self.current.revision and self.failing is None
        ):
            return None
        if failure is None:
            try:
                rules = parse_rules(data, source)
            except RulesError as error:
                failure = error
        if failure is not None:
            self.failing, self._failed_revision = failure, revision
            return Reload(error=failure)
        self.current, self.failing, self._failed_revision = rules, None, None
        return Reload(rules=rules)


class RuleEngine(ContractConsumer):
    """One rule engine instance: a `ContractConsumer` on `muster.ruleengine`.

    Plans, alerts and dead letters are published on connections of their own: waiting
    for a publisher confirm on the consuming connection would deliver further messages
    in the middle of handling one. `counts` tallies what this instance did (by outcome).

    Deliveries are answered in batches: each plan is published at once (the node has it
    without delay), the delivery is held, and when half the prefetch is held or the
    oldest has waited `flush_interval` seconds, the engine waits for all the plans'
    confirms together, then acknowledges the held deliveries together (`acknowledge`).
    An announce is therefore acknowledged only once its plan is stored by RabbitMQ; if
    the confirms fail, the held deliveries are requeued and answered again.
    """

    def __init__(
        self,
        connection: Connection,
        watcher: RulesWatcher,
        signing_key: Ed25519PrivateKey,
        *,
        prefetch: int = 100,
        reload_interval: float = 3.0,
        instance: str | None = None,
        flush_interval: float = 0.05,
    ) -> None:
        super().__init__(connection, [RULEENGINE_QUEUE], self.handle, prefetch)
        self.plans = BatchPublisher(connection)
        self._batch = max(1, prefetch // 2)
        self._flush_interval = flush_interval
        self._held: list[Delivery] = []
        self._oldest = 0.0
        self._unconfirmed: dict[str, SignedPlan] = {}
        self.watcher = watcher
        self.instance = instance or socket.gethostname()
        self.counts: Counter[str] = Counter()
        self.ready = threading.Event()
        self._key = signing_key
        self._reload_interval = reload_interval
        self._next_check = time.monotonic() + reload_interval
        self._reload_requested = False
        self._alerts: list[Alert] = []
        self._alert_open = False

    # -- messages ---------------------------------------------------------------------------

    def handle(self, message: AnyMessage) -> None:
        if not isinstance(message, Announce | Keepalive):
            self.counts["ignored"] += 1  # the queue is bound to nothing else
            return
        facts, reported = message.facts, message.plan_hash
        if facts is None:
            self.counts["no_facts"] += 1
            log.debug("keepalive from %s carries no facts: nothing to decide", message.node)
            return
        rules = self.watcher.current
        plan = plan_for(rules, message.node, facts)
        digest = plan.content_hash()
        if digest == reported:
            self.counts["unchanged"] += 1
            log.debug("%s %s: plan %s unchanged", message.type, message.node, digest)
            return
        signed = sign_plan(plan, self._key)
        self.plans.publish(signed)
        self._unconfirmed[signed.id] = signed
        log.info(
            "%s %s: sent plan %s (%d jobs; node had %s; rules %s)",
            message.type,
            message.node,
            digest,
            len(plan.jobs),
            reported or "none",
            rules.revision[:19],
        )

    # -- batches ----------------------------------------------------------------------------

    def answered(self, delivery: Delivery) -> None:
        """Hold the delivery until the plans of its batch are confirmed."""
        if not self._held:
            self._oldest = time.monotonic()
        self._held.append(delivery)
        if len(self._held) >= self._batch:
            self.flush()

    def flush(self) -> None:
        """Wait for the confirms of the plans sent, then acknowledge what they answer.

        Plans are mandatory: a node's queue nearly always exists (its agent declares it
        before announcing and keeps consuming), so declaring it for every plan cost three
        round trips for nothing. When it does not exist (an agent that announces before it
        declares, or a queue expired since), RabbitMQ returns the plan; then the queue is
        declared and the plan sent again, so no plan is silently lost."""
        held, self._held = self._held, []
        plans, self._unconfirmed = self._unconfirmed, {}
        try:
            for returned in self.plans.confirm():
                if returned in plans:  # not one sent before a reconnection cleared them
                    self._declare_and_send(plans[returned])
        except Exception:
            log.exception("%d plans not confirmed; %d messages requeued", len(plans), len(held))
            for delivery in held:
                delivery.requeue()
            return
        self.counts["published"] += len(plans)
        acknowledge(held)

    def _declare_and_send(self, signed: SignedPlan) -> None:
        node = signed.plan.node
        queue = plan_queue(node)(self.output.default_channel)
        self.output.ensure(queue, queue.declare, **RETRY_POLICY)()
        self.counts["queue_declared"] += 1
        if not self.publisher.publish(signed, mandatory=True):
            raise RuntimeError(f"plan for {node} unroutable even after declaring its queue")

    # -- reloading --------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the rules at the next turn of the loop (safe in a signal handler)."""
        self._reload_requested = True

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Sequence[Any]) -> None:
        log.info(
            "rule engine %s consuming %s; rules %s, revision %s, signing key %s",
            self.instance,
            RULEENGINE_QUEUE.name,
            self.watcher.path,
            self.watcher.current.revision[:19],
            key_id(self._key.public_key()),
        )
        self.ready.set()

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("safety_interval", min(1.0, self._flush_interval))  # for stop()
        try:
            super().run(_tokens, **kwargs)
        finally:
            self.plans.reset()

    def on_connection_revived(self) -> None:
        """A new connection: held deliveries come again (with new tags), so do their plans."""
        self._held, self._unconfirmed = [], {}

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        """Stopping: confirm and acknowledge what is held while the channel is open."""
        if self._held:
            self.flush()

    def on_iteration(self) -> None:
        """Called by kombu between deliveries, and every `flush_interval` seconds (at
        least once a second) without them."""
        now = time.monotonic()
        if self._held and now - self._oldest >= self._flush_interval:
            self.flush()
        if self._reload_requested or now >= self._next_check:
            force, self._reload_requested = self._reload_requested, False
            self._next_check = now + self._reload_interval
            self.reload(force)
        self._flush_alerts()
        super().on_iteration()

    def reload(self, force: bool = False) -> Reload | None:
        outcome = self.watcher.check(force)
        if outcome is None:
            if force:
                log.info("rules %s unchanged", self.watcher.path)
            return None
        if outcome.error is not None:
            log.error(
                "refusing invalid rules; revision %s stays in force:\n%s",
                self.watcher.current.revision[:19],
                outcome.error,
            )
            self._alerts.append(self._alert("open", outcome.error))
            self._alert_open = True
        elif outcome.rules is not None:
            log.info(
                "rules %s reloaded: revision %s, %d rules, %d jobs",
                self.watcher.path,
                outcome.rules.revision[:19],
                len(outcome.rules.rules),
                outcome.rules.job_count,
            )
            if self._alert_open:
                self._alerts.append(self._alert("resolved", None))
                self._alert_open = False
        self._flush_alerts()
        return outcome

    def _alert(self, state: str, error: RulesError | None) -> Alert:
        in_force = self.watcher.current.revision
        if error is None:
            summary = f"rules {self.watcher.path} valid again on {self.instance}: {in_force[:19]}"
            details: dict[str, Any] = {}
        else:
            count = len(error.problems)
            first = str(error.problems[0]) if error.problems else str(error)
            summary = (
                f"rule engine {self.instance} refuses {self.watcher.path} ({count} problem"
                f"{'s' * (count != 1)}, first: {first}); revision {in_force[:19]} stays in force"
            )
            details = {"problems": [str(problem) for problem in error.problems]}
        return Alert(
            key=f"{ALERT_KIND}:{self.instance}",
            kind=ALERT_KIND,
            state=state,
            severity="critical",
            source="ruleengine",
            summary=summary,
            details={
                "file": str(self.watcher.path),
                "engine": self.instance,
                "in_force": in_force,
                **details,
            },
        )

    def _flush_alerts(self) -> None:
        """Publish pending alerts in order; on a broker failure, retry next time round."""
        while self._alerts:
            try:
                self.publisher.publish(self._alerts[0])
            except Exception as error:  # the broker is away; the consumer reconnects too
                log.warning("cannot publish a %s alert yet: %s", ALERT_KIND, error)
                return
            self._alerts.pop(0)

    # -- lifetime ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.should_stop = True
