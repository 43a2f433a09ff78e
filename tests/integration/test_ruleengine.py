"""The rule engine against a real RabbitMQ: announces and keepalives in, signed plans out,
rules reloaded (or refused) while it runs, and several engines sharing the queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Connection, Producer

from broker.codec import decode
from broker.connection import REASON_HEADER, Publisher, body_bytes, connect
from broker.messages import Announce, Facts, Keepalive
from broker.plan import Plan
from broker.signing import TrustedKeys, generate_signing_key, verify_plan
from broker.topology import (
    DEAD_QUEUE,
    EVENTS,
    REPORTER_QUEUE,
    RULEENGINE_QUEUE,
    declare,
    plan_queue,
    tail_queue,
)
from ruleengine.engine import RuleEngine, RulesWatcher
from tests.amqp import depth, drain
from tests.examples import RECIPIENT, facts

pytestmark = pytest.mark.integration

MUSTER = Path(sys.executable).parent / "muster"

RULES = """\
defaults:
  storage: {kind: local, path: /backups}
  retention: {keep_daily: 7}
rules:
  - name: everyone
    match: all
    jobs:
      etc: {sources: {paths: [/etc]}}
  - name: frontends
    match: {labels: {tier: frontend}}
    jobs:
      www: {sources: {paths: [/srv/www]}}
"""
CHANGED_RULES = RULES.replace("keep_daily: 7", "keep_daily: 9") + textwrap.indent(
    "logs: {sources: {paths: [/var/log]}}\n", " " * 6
)


def wait_for(condition: Callable[[], object], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def replace(path: Path, text: str) -> None:
    """Rewrite a rules file the way a deployment should: atomically."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    temporary.rename(path)


def node_name(prefix: str = "web") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def connection(amqp_url: str) -> Iterator[Connection]:
    """A connection on a declared topology whose shared queues are empty."""
    with connect([amqp_url]) as conn:
        declare(conn)
        for queue in (DEAD_QUEUE, RULEENGINE_QUEUE, REPORTER_QUEUE):
            queue(conn.default_channel).purge()
        yield conn
        REPORTER_QUEUE(conn.default_channel).purge()  # our announces, unread by any reporter


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
def start_engine(amqp_url: str, rules_file: Path, key: Ed25519PrivateKey):
    """Start rule engines in threads, each on its own connection; stop them all after."""
    running: list[tuple[RuleEngine, threading.Thread]] = []

    def start(
        instance: str = "engine-a", prefetch: int = 5, flush_interval: float = 0.05
    ) -> RuleEngine:
        engine = RuleEngine(
            connect([amqp_url]),
            RulesWatcher(rules_file),
            key,
            prefetch=prefetch,
            reload_interval=0.2,
            instance=instance,
            flush_interval=flush_interval,
        )
        thread = threading.Thread(target=engine.run, name=instance, daemon=True)
        thread.start()
        running.append((engine, thread))
        assert engine.ready.wait(15), f"{instance} never started consuming"
        return engine

    yield start
    for engine, _ in running:
        engine.stop()
    for engine, thread in running:
        thread.join(timeout=15)
        assert not thread.is_alive(), f"{engine.instance} did not stop"


@pytest.fixture
def make_node(connection: Connection, key: Ed25519PrivateKey) -> Iterator[Callable[..., Node]]:
    """Nodes on the test's connection and key; their plan queues are deleted after."""
    made: list[Node] = []

    def make(signing_key: Ed25519PrivateKey = key) -> Node:
        made.append(Node(connection, signing_key))
        return made[-1]

    yield make
    with connection.channel() as channel:
        for node in made:
            plan_queue(node.name)(channel).delete()


class Node:
    """What an agent does on the wire: declare its plan queue, announce, keep alive."""

    def __init__(self, connection: Connection, key: Ed25519PrivateKey) -> None:
        self.connection = connection
        self.name = node_name()
        self.facts: Facts = facts(self.name)
        self.trusted = TrustedKeys([key.public_key()])
        self.publisher = Publisher(connection)
        self.plan: Plan | None = None

    def declare(self) -> Node:
        plan_queue(self.name)(self.connection.default_channel).declare()
        return self

    def announce(self) -> None:
        self.publisher.publish(
            Announce(
                node=self.name,
                facts=self.facts,
                agent_version="0.1.0",
                recipient=RECIPIENT,
                plan_hash=self.plan_hash,
            )
        )

    def keepalive(self, with_facts: bool = True) -> None:
        self.publisher.publish(
            Keepalive(
                node=self.name,
                uptime=1,
                plan_hash=self.plan_hash,
                facts=self.facts if with_facts else None,
            )
        )

    @property
    def plan_hash(self) -> str | None:
        return self.plan.content_hash() if self.plan else None

    def receive(self, timeout: float = 10) -> Plan | None:
        """The next plan on this node's queue, verified as the agent verifies it."""
        deliveries = drain(self.connection, plan_queue(self.name), 1, timeout)
        if not deliveries:
            return None
        self.plan = verify_plan(decode(body_bytes(deliveries[0])), self.trusted, self.name)
        return self.plan


def test_an_announce_gets_a_signed_plan_that_the_node_accepts(make_node, start_engine):
    engine = start_engine()
    node = make_node().declare()
    node.announce()
    plan = node.receive()
    assert plan is not None, "no plan arrived"
    assert plan.node == node.name
    assert [job.name for job in plan.jobs] == ["etc", "www"]
    assert plan.job("www").retention.keep_daily == 7
    wait_for(lambda: engine.counts["published"] == 1, what="the count")  # counted after sending


def test_the_engine_declares_a_missing_plan_queue_so_no_plan_is_lost(make_node, start_engine):
    engine = start_engine()
    node = make_node()  # announces before declaring its queue
    node.announce()
    wait_for(lambda: engine.counts["published"] == 1, what="the plan to be published")
    assert engine.counts["queue_declared"] == 1
    assert node.receive() is not None


def test_a_plan_queue_that_expired_since_the_last_plan_still_gets_the_next_one(
    connection, make_node, start_engine, rules_file
):
    """The engine no longer declares a node's queue before every plan: it publishes as
    mandatory and declares only when RabbitMQ hands the plan back. A queue deleted in
    between (as `x-expires` does) must not swallow the next plan."""
    engine = start_engine()
    node = make_node().declare()
    node.announce()
    assert node.receive() is not None
    assert engine.counts["queue_declared"] == 0, "declared a queue that existed"
    with connection.channel() as channel:
        plan_queue(node.name)(channel).delete()
    old_revision = engine.watcher.current.revision
    replace(rules_file, CHANGED_RULES)
    wait_for(lambda: engine.watcher.current.revision != old_revision, what="the reload")
    node.keepalive()
    wait_for(lambda: engine.counts["published"] == 2, what="the second plan")
    assert engine.counts["queue_declared"] == 1
    plan = node.receive()
    assert plan is not None, "the plan for the expired queue was lost"
    assert [job.name for job in plan.jobs] == ["etc", "logs", "www"]


def test_announces_are_acknowledged_only_once_their_plans_are_confirmed(
    connection, make_node, start_engine
):
    """Plans go out at once; the announces they answer are acknowledged in a batch after
    RabbitMQ confirmed the plans, and at the latest when the engine stops."""
    engine = start_engine(prefetch=20, flush_interval=3600)  # a batch of 10: never full here
    nodes = [make_node().declare() for _ in range(3)]
    for node in nodes:
        node.announce()
    for node in nodes:
        assert node.receive() is not None, "a plan waited for its batch"
    assert engine.counts["published"] == 0, "confirmed before the batch was flushed"
    engine.stop()
    wait_for(lambda: engine.counts["published"] == 3, what="the flush on stopping")
    time.sleep(0.5)  # the engine's connection is closed: anything unacknowledged is back
    assert depth(connection, RULEENGINE_QUEUE) == 0, "announces left unacknowledged"


def test_a_keepalive_with_the_current_hash_gets_nothing(make_node, start_engine):
    engine = start_engine()
    node = make_node().declare()
    node.announce()
    assert node.receive() is not None
    node.keepalive()
    node.keepalive(with_facts=False)
    node.announce()  # a reconnect with the current plan: nothing either
    wait_for(lambda: engine.counts["unchanged"] == 2, what="two unchanged verdicts")
    wait_for(lambda: engine.counts["no_facts"] == 1, what="the keepalive without facts")
    assert node.receive(timeout=1) is None
    assert engine.counts["published"] == 1


def test_a_node_matching_no_rule_gets_an_empty_plan(make_node, start_engine, rules_file):
    rules_file.write_text(RULES.replace("match: all", "match: {hostname: 'db*'}"))
    engine = start_engine()
    node = make_node().declare()
    node.facts = facts("mail1").model_copy(update={"labels": {}})
    node.announce()
    plan = node.receive()
    assert plan is not None and plan.jobs == []
    node.keepalive()  # and, holding it, gets nothing more
    wait_for(lambda: engine.counts["unchanged"] == 1, what="the keepalive")
    assert node.receive(timeout=0.5) is None


def test_a_rules_change_reaches_the_node_with_its_next_keepalive(
    make_node, start_engine, rules_file
):
    engine = start_engine()
    node = make_node().declare()
    node.announce()
    before = node.receive()
    assert before is not None
    old_revision = engine.watcher.current.revision

    replace(rules_file, CHANGED_RULES)
    wait_for(lambda: engine.watcher.current.revision != old_revision, what="the reload")
    node.keepalive()
    after = node.receive()
    assert after is not None, "the keepalive brought no new plan"
    assert [job.name for job in after.jobs] == ["etc", "logs", "www"]
    assert after.job("etc").retention.keep_daily == 9
    assert after.issued > before.issued
    node.keepalive()
    wait_for(lambda: engine.counts["unchanged"] == 1, what="the second keepalive")
    assert node.receive(timeout=0.5) is None


def test_two_engines_share_the_load(make_node, start_engine):
    first, second = start_engine("engine-a", prefetch=2), start_engine("engine-b", prefetch=2)
    nodes = [make_node() for _ in range(40)]
    for node in nodes:
        node.announce()
    engines = (first, second)
    wait_for(
        lambda: sum(engine.counts["published"] for engine in engines) == len(nodes),
        timeout=30,
        what="40 plans",
    )
    handled = {engine.instance: engine.counts["published"] for engine in engines}
    assert all(count > 0 for count in handled.values()), handled
    for node in nodes[:5]:  # each plan went to its own node's queue
        plan = node.receive()
        assert plan is not None and plan.node == node.name


def test_an_invalid_rules_file_is_refused_with_an_alert_until_it_is_fixed(
    connection, make_node, start_engine, rules_file
):
    alerts = tail_queue(["alert", "alert.#"])
    alerts(connection.default_channel).declare()
    engine = start_engine("engine-x")
    good = engine.watcher.current.revision

    replace(rules_file, RULES.replace("match: all", "match: {hostnam: web}"))
    (opened,) = [decode(body_bytes(d)) for d in drain(connection, alerts, 1)]
    assert (opened.kind, opened.state, opened.source) == ("rules_invalid", "open", "ruleengine")
    assert opened.key == "rules_invalid:engine-x"
    assert opened.severity == "critical"
    assert opened.details["in_force"] == good
    assert opened.details["problems"] == [
        f"{rules_file}:6:13: rules[0].match.hostnam: unknown key 'hostnam'; "
        "did you mean 'hostname'?"
    ]
    assert "stays in force" in opened.summary

    node = make_node().declare()
    node.announce()
    plan = node.receive()  # the last good rules are still in force
    assert plan is not None and [job.name for job in plan.jobs] == ["etc", "www"]
    assert engine.watcher.current.revision == good

    replace(rules_file, CHANGED_RULES)
    (resolved,) = [decode(body_bytes(d)) for d in drain(connection, alerts, 1)]
    assert (resolved.key, resolved.state) == ("rules_invalid:engine-x", "resolved")
    node.keepalive()
    plan = node.receive()
    assert plan is not None and [job.name for job in plan.jobs] == ["etc", "logs", "www"]
    assert drain(connection, alerts, 1, timeout=1) == []  # one alert each way, no repeats


def test_a_malformed_announce_is_dead_lettered_and_the_engine_goes_on(
    connection, make_node, start_engine
):
    engine = start_engine()
    producer = Producer(connection.default_channel)
    junk = [b"{not json", b'{"type": "announce", "node": "web1", "facts": {}}']
    for body in junk:
        producer.publish(
            body, exchange=EVENTS, routing_key="announce.web1", content_type="application/json"
        )
    node = make_node().declare()
    node.announce()
    assert node.receive() is not None
    letters = drain(connection, DEAD_QUEUE, len(junk))
    reasons = {body_bytes(letter): letter.headers[REASON_HEADER] for letter in letters}
    assert sorted(reasons) == sorted(junk)
    assert "not UTF-8 JSON" in reasons[junk[0]]
    assert "announce.facts.hostname: Field required" in reasons[junk[1]]
    wait_for(lambda: engine.counts["published"] == 1, what="the count")  # counted after sending


def test_the_muster_command_reloads_on_sighup_and_stops_on_sigterm(
    make_node, amqp_url, rules_file, tmp_path
):
    signing_key = tmp_path / "signing.pem"
    key = generate_signing_key(signing_key)
    env = {
        **os.environ,
        "MUSTER_RELOAD_INTERVAL": "3600",  # only SIGHUP reloads during this test
        "MUSTER_CONFIG": str(tmp_path / "absent.yaml"),
    }
    command = [MUSTER, "--log-level", "info", "ruleengine", "run", "--rules", str(rules_file)]
    command += ["--signing-key", str(signing_key), "--broker-url", amqp_url]
    process = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("consuming muster.ruleengine" in line for line in log), what="start")
        node = make_node(key).declare()
        node.announce()
        assert node.receive() is not None

        replace(rules_file, CHANGED_RULES)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: any("reloaded" in line for line in log), what="the SIGHUP reload")
        node.keepalive()
        plan = node.receive()
        assert plan is not None and [job.name for job in plan.jobs] == ["etc", "logs", "www"]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    output = "".join(log)
    assert "rule engine" in output and "stopped" in output, output
