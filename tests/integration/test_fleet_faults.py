"""Faults under a running fleet: real `muster agent run`, `muster ruleengine run` and
`muster reporter run` processes on the real servers, with servers and processes killed or
stopped under them and junk injected into every queue.

Each test asserts that nothing is lost and nothing is duplicated: every run an agent
reports (its log is the ground truth) is one document in MongoDB, every committed snapshot
has exactly one run, every injected message is dead-lettered exactly once.

Backups are tiny and go to a local directory every two seconds (Swift only where Swift is
the fault), and every wait is on a condition. The Swift outage must outlast the agent's
storage retries, so that test alone takes about 80 s of the module's two and a half minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kombu import Connection, Producer
from swiftclient.client import Connection as SwiftConnection

from broker.codec import decode
from broker.connection import QUEUE_HEADER, REASON_HEADER, Publisher, body_bytes
from broker.messages import Alert, Announce, Keepalive, RunResult, RunStats, RunStatus
from broker.plan import Plan
from broker.signing import sign_plan
from broker.topology import (
    DEAD_QUEUE,
    EVENTS,
    PLANS,
    REPORTER_QUEUE,
    RULEENGINE_QUEUE,
    plan_queue,
)
from tests.amqp import drain
from tests.examples import RECIPIENT, facts
from tests.fleetrun import FleetRun, connection, consuming
from tests.processes import MUSTER, Daemon, wait_for
from tests.services import ServiceSet, SwiftCredentials

pytestmark = pytest.mark.integration

JOB = "data"
RESULT_LINE = re.compile(r"\b(backup|verify|forget) of job \S+: (\w+)")


def rules(fleet: FleetRun, container: str) -> str:
    """Every node of this run backs up a small sample to a local directory every 2 s; the
    `swift` role backs up a bigger tree to Swift, paced so that an upload lasts seconds."""
    return f"""
defaults:
  storage: {{kind: local, path: {fleet.root}/repo}}
  schedule: {{every: 2s}}
  retention: {{keep_last: 1000}}
  restore_test: {{enabled: false}}
rules:
  - name: fleet
    match: {{labels: {{fleet: "{fleet.tag}"}}}}
    jobs:
      {JOB}: {{sources: {{paths: [{fleet.root}/sample]}}}}
  - name: swift
    match: {{labels: {{fleet: "{fleet.tag}", role: swift}}}}
    jobs:
      {JOB}:
        storage: {{kind: swift, container: {container}, prefix: faults}}
        sources: {{paths: [{fleet.root}/big]}}
        bandwidth_limit: 2MiB
"""


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, mongo_url: str
) -> Iterator[FleetRun]:
    run = FleetRun(tmp_path_factory.mktemp("faults"), amqp_url, mongo_url)
    sample = run.root / "sample"
    sample.mkdir()
    (sample / "a.txt").write_text("a\n")
    (sample / "b.bin").write_bytes(os.urandom(20_000))
    run.write_rules(rules(run, f"faults-{run.tag}"))
    try:
        yield run.start()
    finally:
        print(run.logs())  # shown by pytest when a test failed
        run.close()


@pytest.fixture(autouse=True)
def central_processes(fleet: FleetRun) -> Iterator[None]:
    """A test that failed half-way through a fault must not leave the next one without a
    rule engine or reporter."""
    yield
    fleet.recover()


# -- what every test checks ----------------------------------------------------------------


def node_of(daemon: Daemon) -> str:
    return daemon.env["MUSTER_NODE"]


def reported(daemon: Daemon) -> list[str]:
    """The runs the agent finished, from its own log: the ground truth."""
    return [match.group(1) for match in RESULT_LINE.finditer(daemon.log)]


def committed(fleet: FleetRun, node: str) -> set[str]:
    folder = fleet.root / "repo" / node / JOB / "snapshots"
    return {p.stem for p in folder.glob("*.json")} if folder.exists() else set()


def results_on_wire(fleet: FleetRun, node: str, **fields: Any) -> list[RunResult]:
    return fleet.listener.of(RunResult, node=node, **fields)


def wait_backups(fleet: FleetRun, daemon: Daemon, count: int, timeout: float = 45) -> None:
    node = node_of(daemon)
    fleet.listener.wait(RunResult, timeout, count, node=node, kind="backup", status="success")


def stop(*daemons: Daemon) -> None:
    """SIGTERM: each agent delivers its spool first and exits 0."""
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.log[-3000:]
        assert daemon.spooled() == [], "the spool was delivered before the exit"


def check_exactly_once(fleet: FleetRun, daemon: Daemon, snapshots: set[str]) -> None:
    """Every run the (stopped) agent logged is one final document in MongoDB, the same runs
    went over the wire, and each committed snapshot has exactly one backup run."""
    node, runs = node_of(daemon), Counter(reported(daemon))
    wait_for(
        lambda: fleet.db.runs.count_documents({"node": node, "final": True}) >= runs.total(),
        60,
        lambda: f"{runs} of {node} in MongoDB\n{fleet.logs()}",
    )
    documents = fleet.runs(node)
    assert Counter(d["kind"] for d in documents) == runs, "one document per run"
    assert all(d["final"] for d in documents), "no run is left without its result"
    assert {d["run_id"] for d in documents} == {r.run_id for r in results_on_wire(fleet, node)}
    backups = Counter(d["snapshot"] for d in documents if d["kind"] == "backup")
    assert snapshots and {s: backups[s] for s in snapshots} == dict.fromkeys(snapshots, 1)


def stop_and_check(fleet: FleetRun, *daemons: Daemon) -> None:
    """For agents backing up to the local directory."""
    stop(*daemons)
    for daemon in daemons:
        check_exactly_once(fleet, daemon, committed(fleet, node_of(daemon)))


# -- broker, reporter, storage, rule engine down --------------------------------------------


def test_the_broker_killed_during_backups_loses_and_duplicates_no_result(
    fleet: FleetRun, services: ServiceSet
) -> None:
    agents = [fleet.agent("busy"), fleet.agent("busy")]
    for daemon in agents:
        wait_backups(fleet, daemon, 2)
    services.kill("rabbitmq")
    fleet.listener.close_connection()
    try:
        for daemon in agents:  # backups go on; their results wait in the spool
            wait_for(lambda d=daemon: len(d.spooled()) >= 2, 30, "results spooled offline")
    finally:
        services.start("rabbitmq")
    for daemon in agents:
        wait_for(lambda d=daemon: not d.spooled(), 60, "the spool to drain")
    written = {node_of(d): len(fleet.runs(node_of(d))) for d in agents}
    for daemon in agents:  # the central processes reconnected and follow again
        node = node_of(daemon)
        wait_for(lambda n=node: len(fleet.runs(n)) > written[n] + 1, 60, "new runs written")
    assert fleet.engine.running and fleet.reporter.running
    stop_and_check(fleet, *agents)


def unacknowledged(services: ServiceSet, queue: str) -> int:
    listing = services.rabbitmqctl("list_queues", "-q", "name", "messages_unacknowledged")
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue and fields[1].isdigit():
            return int(fields[1])
    return 0


def test_the_reporter_killed_mid_batch_loses_and_duplicates_nothing(
    fleet: FleetRun, services: ServiceSet
) -> None:
    reporter = fleet.reporter
    assert reporter.stop() == 0
    # a batch that waits a minute: everything delivered is held, unacknowledged, unwritten
    reporter.env = {**fleet.reporter_env, "MUSTER_BATCH_SIZE": "500", "MUSTER_FLUSH_INTERVAL": "60"}
    try:
        consuming(reporter.start())
        agents = [fleet.agent("ingest"), fleet.agent("ingest")]
        for daemon in agents:
            wait_backups(fleet, daemon, 2)
        wait_for(lambda: unacknowledged(services, REPORTER_QUEUE.name) > 0, 20, "a held batch")
        reporter.kill()
        assert not any(fleet.runs(node_of(d)) for d in agents), "killed before any write"
        for daemon in agents:  # results go on while no reporter runs
            backups = len(results_on_wire(fleet, node_of(daemon), kind="backup"))
            wait_backups(fleet, daemon, backups + 1)
    finally:
        reporter.kill()
        reporter.env = dict(fleet.reporter_env)
        consuming(reporter.start())
    stop_and_check(fleet, *agents)


def snapshot_listing(daemon: Daemon) -> list[str]:
    """`muster snapshots` on the node, from its plan: what a user can see."""
    done = subprocess.run(
        [str(MUSTER), "snapshots", "--json"],
        env=daemon.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [snapshot["id"] for snapshot in json.loads(done.stdout)]


def stored_names(swift: SwiftCredentials, container: str, prefix: str) -> list[str]:
    client = SwiftConnection(swift.auth_url, swift.user, swift.key, retries=2)
    try:
        _, objects = client.get_container(container, prefix=prefix, full_listing=True)
    finally:
        client.close()
    return [item["name"] for item in objects]


def test_swift_stopped_during_an_upload_leaves_no_partial_snapshot_and_the_next_run_succeeds(
    fleet: FleetRun, services: ServiceSet, swift_credentials: SwiftCredentials
) -> None:
    """Swift stays down longer than the agent's retries last (5, backing off from 1 s to
    16 s: about half a minute per request; the failed segment PUT, then the listing that
    looks for segments to drop), so the cut run must fail rather than resume."""
    big = fleet.root / "big"
    big.mkdir()
    for index in range(8):  # 8 MiB at 2 MiB/s: an upload of 4 s to cut
        (big / f"part-{index}.bin").write_bytes(os.urandom(1 << 20))
    login = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
    }
    daemon = fleet.agent("swift", **login)
    node = node_of(daemon)
    running = fleet.listener.wait(RunStatus, 45, node=node, kind="backup", phase="running")[0]
    try:
        services.stop("swift")
        assert not results_on_wire(fleet, node, run_id=running.run_id), "not cut: too fast"
        (cut,) = fleet.listener.wait(RunResult, 180, node=node, run_id=running.run_id)
    finally:
        services.start("swift")
    assert cut.status == "failure" and cut.snapshot is None, cut
    assert snapshot_listing(daemon) == [], "nothing of the cut run is visible"
    good = fleet.listener.wait(RunResult, 60, node=node, kind="backup", status="success")[0]
    stop(daemon)
    visible = set(snapshot_listing(daemon))
    succeeded = results_on_wire(fleet, node, kind="backup", status="success")
    assert good.snapshot in visible and visible == {r.snapshot for r in succeeded}
    prefix = f"faults/{node}/{JOB}/"
    names = stored_names(swift_credentials, f"faults-{fleet.tag}", prefix)
    # every object left belongs to a committed snapshot: the cut run's were removed
    assert {name[len(prefix) :].split("/")[1].split(".")[0] for name in names} == visible
    check_exactly_once(fleet, daemon, visible)


def test_a_node_appearing_while_the_rule_engine_is_down_gets_its_plan_when_it_returns(
    fleet: FleetRun,
) -> None:
    assert fleet.engine.stop() == 0
    try:
        daemon = fleet.agent("late")
        node = node_of(daemon)
        fleet.listener.wait(Announce, 30, node=node)
        fleet.listener.wait(Keepalive, 30, count=3, node=node, plan_hash=None)
        wait_for(lambda: fleet.db.nodes.find_one({"_id": node}), 30, "the reporter to see it")
        assert daemon.running and fleet.reporter.running
        assert not (daemon.state / "plan.json").exists()
    finally:
        consuming(fleet.engine.start())
    wait_for(lambda: (daemon.state / "plan.json").exists(), 30, "the plan")
    wait_backups(fleet, daemon, 1)
    plan = json.loads((daemon.state / "plan.json").read_text())["plan"]
    assert [job["name"] for job in plan["jobs"]] == [JOB]
    stop_and_check(fleet, daemon)


# -- junk in every queue, garbage rules ------------------------------------------------------

OVERSIZED_PAD = "x" * (1 << 20)


def envelope(kind: str, node: str, /, **fields: Any) -> bytes:
    """A message with valid common fields, carrying whatever else the test wants."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    common = {"type": kind, "schema_version": 1, "id": uuid.uuid4().hex, "time": now}
    return json.dumps({**common, "node": node, **fields}).encode()


# For each event type: a body of that type whose fields have the wrong types.
WRONGLY_TYPED = {
    "announce": {"facts": ["not", "facts"], "agent_version": 1, "recipient": RECIPIENT},
    "keepalive": {"uptime": "a while", "plan_hash": 42},
    "run_status": {"job": "data", "run_id": "r", "kind": "backup", "files_done": "many"},
    "run_result": {"job": "data", "run_id": "r", "kind": "backup", "status": 42},
    "alert": {"key": "k", "kind": "keepalive", "state": ["open"], "summary": None},
}
# The central queues each event type reaches (topology: announce and keepalive go to both).
QUEUES_OF = {
    "announce": (RULEENGINE_QUEUE.name, REPORTER_QUEUE.name),
    "keepalive": (RULEENGINE_QUEUE.name, REPORTER_QUEUE.name),
    "run_status": (REPORTER_QUEUE.name,),
    "run_result": (REPORTER_QUEUE.name,),
    "alert": (REPORTER_QUEUE.name,),
}


def junk(kind: str, node: str) -> dict[str, bytes]:
    return {
        "malformed": b'{"type": "' + kind.encode() + b'", not json',
        "oversized": envelope(kind, node, pad=OVERSIZED_PAD),
        "wrongly typed": envelope(kind, node, **WRONGLY_TYPED.get(kind, {"plan": {"node": 7}})),
    }


def letters(conn: Connection, expected: int) -> Counter:
    """What reached muster.dead: (queue, routing key, body) -> copies, each with a reason."""
    found = drain(conn, DEAD_QUEUE, expected, timeout=30)
    assert all(letter.headers.get(REASON_HEADER) for letter in found)
    return Counter(
        (letter.headers[QUEUE_HEADER], letter.delivery_info["routing_key"], body_bytes(letter))
        for letter in found
    )


def test_junk_in_every_queue_is_dead_lettered_once_and_every_consumer_goes_on(
    fleet: FleetRun,
) -> None:
    daemon = fleet.agent("target")
    node = node_of(daemon)
    wait_backups(fleet, daemon, 1)
    held = (daemon.state / "plan.json").read_bytes()
    sender = f"junk-{fleet.tag}"
    with connection(fleet.amqp_url) as conn:
        DEAD_QUEUE(conn.default_channel).purge()
        producer = Producer(conn.default_channel)
        expected: Counter = Counter()
        for kind, queues in QUEUES_OF.items():
            key = f"{kind}.{sender}"
            for body in junk(kind, sender).values():
                producer.publish(body, exchange=EVENTS.name, routing_key=key)
                expected.update((queue, key, body) for queue in queues)
        assert letters(conn, sum(expected.values())) == expected
        # the node's plan queue keeps one message: one piece of junk at a time
        plan_junk = [*junk("plan", node).values(), envelope("keepalive", node, uptime=1)]
        for body in plan_junk:
            producer.publish(body, exchange=PLANS.name, routing_key=node)
            assert letters(conn, 1) == {(plan_queue(node).name, node, body): 1}
        assert drain(conn, DEAD_QUEUE, 1, timeout=1) == [], "no letter twice"
        assert (daemon.state / "plan.json").read_bytes() == held
        rejected = fleet.listener.wait(Alert, 20, count=4, node=node, kind="plan_rejected")
        assert {alert.state for alert in rejected} == {"open"}

        # every consumer still works: a new node's announce gets a plan, a result is
        # written, and the agent takes a valid plan
        assert fleet.engine.running and fleet.reporter.running and daemon.running
        newcomer = f"new-{fleet.tag}"
        newcomer_facts = facts(newcomer).model_copy(update={"labels": {"fleet": fleet.tag}})
        plan_queue(newcomer)(conn.default_channel).declare()  # as its agent would
        publisher = Publisher(conn)
        publisher.publish(
            Announce(node=newcomer, facts=newcomer_facts, agent_version="0", recipient=RECIPIENT)
        )
        plans = drain(conn, plan_queue(newcomer), 1, timeout=20)
        assert plans and decode(body_bytes(plans[0])).plan.node == newcomer
        plan_queue(newcomer)(conn.default_channel).delete()
        now = datetime.now(UTC)
        publisher.publish(
            RunResult(node=newcomer, job=JOB, run_id="after-junk", kind="backup",
                      status="success", started=now, finished=now, stats=RunStats())
        )  # fmt: skip
        wait_for(lambda: fleet.runs(newcomer, run_id="after-junk"), 20, "the valid result")
        signed = sign_plan(Plan(node=node, issued=now, jobs=[]), fleet.key)
        publisher.publish(signed)
    fleet.listener.wait(Keepalive, 20, node=node, plan_hash=signed.plan.content_hash())
    fleet.listener.wait(Alert, 20, node=node, kind="plan_rejected", state="resolved")
    stop(daemon)


def test_garbage_rules_keep_the_old_rules_in_force_and_raise_an_error_event(
    fleet: FleetRun,
) -> None:
    good = fleet.rules.read_text()
    fleet.write_rules("rules: [{name: broken, match: {hostnam: x}\n\x00garbage: [")
    try:
        (opened,) = fleet.listener.wait(Alert, 20, kind="rules_invalid", state="open")[:1]
        assert opened.source == "ruleengine" and opened.severity == "critical"
        assert "stays in force" in opened.summary
        wait_for(
            lambda: fleet.db.alerts.find_one({"_id": opened.key, "state": "open"}),
            20,
            "the error event in MongoDB",
        )
        daemon = fleet.agent("after-garbage")  # a new node, planned by the old rules
        wait_backups(fleet, daemon, 1)
        plan = json.loads((daemon.state / "plan.json").read_text())["plan"]
        assert [job["name"] for job in plan["jobs"]] == [JOB]
        assert fleet.engine.running
    finally:
        fleet.write_rules(good)
    fleet.listener.wait(Alert, 20, kind="rules_invalid", state="resolved", key=opened.key)
    stop_and_check(fleet, daemon)
