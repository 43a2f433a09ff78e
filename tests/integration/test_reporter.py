"""The reporter against the real servers: RabbitMQ and the MongoDB-protocol server.

Redelivery never adds a document; a reporter killed mid-batch, or a MongoDB stopped under
it, loses nothing; the watchdog raises and resolves every alert kind (on an injected
clock), once across instances; the operators' commands show live traffic and MongoDB's
state; /metrics parses; snapshot history is rebuilt from storage.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection, Producer
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from broker.codec import decode
from broker.connection import Publisher, body_bytes, connect
from broker.messages import (
    Alert,
    Announce,
    Keepalive,
    Message,
    RunResult,
    RunStats,
    RunStatus,
)
from broker.reporter_config import ReporterSettings
from broker.snapshot import ObjectInfo, SnapshotRecord
from broker.topology import DEAD_QUEUE, EVENTS, REPORTER_QUEUE, declare, tail_queue
from muster.cli import cli
from reporter.ingest import empty_plan_hash
from reporter.metrics import serve
from reporter.service import Held, Reporter, write_batch
from reporter.store import Store
from reporter.watchdog import Watchdog
from tests.examples import RECIPIENT, every_message, facts

pytestmark = pytest.mark.integration

MUSTER = Path(sys.executable).parent / "muster"
KINDS = ("announce", "keepalive", "run_status", "run_result", "alert")


class Clock:
    """An injectable clock for the reporter and its watchdog."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment


def wait_for(condition: Callable[[], object], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def name(prefix: str = "web") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def database(mongo_url: str) -> Iterator[str]:
    db = f"test_reporter_{uuid.uuid4().hex[:10]}"
    yield db
    with MongoClient(mongo_url, serverSelectionTimeoutMS=20000) as client:
        client.drop_database(db)


@pytest.fixture
def connection(amqp_url: str) -> Iterator[Connection]:
    """A connection on a declared topology with empty reporter and dead-letter queues."""
    with connect([amqp_url]) as conn:
        declare(conn)
        for bound in (REPORTER_QUEUE, DEAD_QUEUE):
            bound(conn.default_channel).purge()
        yield conn
        REPORTER_QUEUE(conn.default_channel).purge()


@pytest.fixture
def make_settings(amqp_url: str, mongo_url: str, database: str) -> Callable[..., ReporterSettings]:
    def make(**values: object) -> ReporterSettings:
        defaults: dict[str, object] = {
            "broker_url": amqp_url,
            "mongo_url": mongo_url,
            "database": database,
            "batch_size": 20,
            "flush_interval": 0.1,
            "watchdog_interval": 3600,
            "metrics_port": 0,
            "mongo_timeout": 2,
        }
        return ReporterSettings(**{**defaults, **values})

    return make


@pytest.fixture
def store(make_settings) -> Iterator[Store]:
    opened = Store.from_settings(make_settings(), "test")
    opened.ensure_indexes()
    yield opened
    opened.close()


@pytest.fixture
def start_reporter(make_settings, amqp_url: str, connection: Connection):
    running: list[tuple[Reporter, threading.Thread, Store]] = []

    def start(
        clock: Callable[[], datetime] | None = None,
        budget: float | None = None,
        **values: object,
    ) -> Reporter:
        """A reporter on its own thread; with a `budget`, its watchdog runs with that."""
        settings = make_settings(**values)
        own = Store.from_settings(settings, f"reporter-{len(running)}")
        own.ensure_indexes()
        reporter = Reporter(
            connect([amqp_url]),
            own,
            settings,
            clock=clock or (lambda: datetime.now(UTC)),
            instance=f"reporter-{len(running)}",
            watchdog=budget is not None,
        )
        reporter.watchdog.budget = budget or 0.0
        thread = threading.Thread(target=reporter.run, daemon=True)
        thread.start()
        running.append((reporter, thread, own))
        assert reporter.ready.wait(15), "the reporter never started consuming"
        return reporter

    yield start
    for reporter, _, _ in running:
        reporter.stop()
    for _, thread, own in running:
        thread.join(timeout=20)
        assert not thread.is_alive(), "a reporter did not stop"
        own.close()


def publish(connection: Connection, *messages: Message) -> None:
    publisher = Publisher(connection)
    for message in messages:
        publisher.publish(message)


def written(reporter: Reporter, kinds: tuple[str, ...] = KINDS) -> int:
    return sum(reporter.counts.get(kind, 0) for kind in kinds)


def data(reporter: Reporter) -> int:
    """Messages other than alerts (the watchdog's own alerts come back, too)."""
    return written(reporter, ("announce", "keepalive", "run_status", "run_result"))


class AlertTap:
    """A private queue on alert.#, as any subscriber would have."""

    def __init__(self, amqp_url: str) -> None:
        self.connection = connect([amqp_url])
        self.queue = tail_queue(["alert.#"])(self.connection.channel())
        self.queue.declare()

    def take(self, timeout: float = 1.0) -> list[Alert]:
        received, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivery = self.queue.get(no_ack=True)
            if delivery is None:
                time.sleep(0.05)
                continue
            received.append(decode(body_bytes(delivery)))
        return received

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def tap(amqp_url: str) -> Iterator[AlertTap]:
    opened = AlertTap(amqp_url)
    yield opened
    opened.close()


@pytest.fixture
def make_watchdog(store: Store, make_settings, amqp_url: str):
    """Watchdogs in the test's thread, each publishing on its own connection."""
    connections: list[Connection] = []

    def make(clock: Clock, options: dict[str, object] | None = None, **values: object) -> Watchdog:
        """`options` go to the Watchdog (backlog, watermark, budget), `values` to settings."""
        conn = connect([amqp_url])
        connections.append(conn)
        publish = Publisher(conn).publish
        return Watchdog(store, publish, make_settings(**values), clock, **(options or {}))

    yield make
    for conn in connections:
        conn.release()


def result(
    node: str,
    run_id: str,
    finished: datetime,
    kind: str = "backup",
    status: str = "success",
    job: str = "etc",
) -> RunResult:
    return RunResult(
        node=node,
        job=job,
        run_id=run_id,
        kind=kind,
        status=status,
        started=finished - timedelta(seconds=30),
        finished=finished,
        time=finished,
        snapshot="20261126T020000Z-000001",
        stats=RunStats(files=12, bytes_read=4096, bytes_stored=1024, volumes=1),
        error=None if status == "success" else "restore test: 2 files differ",
    )


def counts(store: Store) -> dict[str, int]:
    return {
        name: store.db[name].count_documents({})
        for name in ("nodes", "jobs", "runs", "alerts", "alert_history")
    }


# -- ingest -----------------------------------------------------------------------------------


def test_every_message_becomes_one_document_even_when_published_twice(
    connection, start_reporter, store
):
    node = name()
    messages = [m for m in every_message(node) if m.type != "plan"]
    agent_alert = Alert(key=f"plan_rejected:{node}", kind="plan_rejected", state="open",
                        source="agent", node=node, summary="refused")  # fmt: skip
    messages.append(agent_alert)
    reporter = start_reporter()
    publish(connection, *messages, *messages)
    wait_for(lambda: written(reporter) == 2 * len(messages), what="both copies written")
    assert counts(store) == {"nodes": 1, "jobs": 1, "runs": 1, "alerts": 1, "alert_history": 2}
    run = store.runs.find_one({"_id": f"{node}/r1"})
    assert run["state"] == "success" and run["final"] is True and run["duration"] == 30.0
    document = store.nodes.find_one({"_id": node})
    assert document["facts"]["hostname"] == node and document["keepalive_interval"] == 20
    job = store.jobs.find_one({"_id": f"{node}/etc"})
    assert job["last_success"]["bytes_stored"] == 1024 and len(job["success_times"]) == 1


def test_an_old_message_redelivered_late_never_overwrites_a_newer_state(
    connection, start_reporter, store
):
    node, now = name(), datetime.now(UTC)
    reporter = start_reporter()
    older = RunStatus(node=node, job="etc", run_id="r1", kind="backup", files_done=1,
                      time=now - timedelta(seconds=20))  # fmt: skip
    newer = RunStatus(node=node, job="etc", run_id="r1", kind="backup", files_done=9,
                      time=now - timedelta(seconds=10))  # fmt: skip
    final = result(node, "r1", now)
    publish(connection, newer)
    wait_for(lambda: written(reporter) == 1)
    publish(connection, final)
    wait_for(lambda: written(reporter) == 2)
    publish(connection, older, newer)  # requeued statuses, after the result
    publish(connection, keepalive := Keepalive(node=node, uptime=5, plan_hash="sha256:new",
                                               time=now))  # fmt: skip
    publish(connection, Keepalive(node=node, uptime=1, plan_hash="sha256:old",
                                  time=now - timedelta(minutes=5)))  # fmt: skip
    wait_for(lambda: written(reporter) == 6)
    run = store.runs.find_one({"_id": f"{node}/r1"})
    assert run["state"] == "success" and run["final"] is True
    assert run["progress"]["files_done"] == 9
    document = store.nodes.find_one({"_id": node})
    assert document["plan_hash"] == "sha256:new" and document["uptime"] == keepalive.uptime
    assert store.runs.count_documents({}) == 1


def test_a_batch_with_several_keepalives_of_one_node_keeps_the_newest_state(
    connection, start_reporter, store
):
    node, now = name(), datetime.now(UTC)
    reporter = start_reporter(batch_size=4, flush_interval=10)
    older = Keepalive(node=node, uptime=1, plan_hash="sha256:a", time=now - timedelta(seconds=40))
    newest = Keepalive(node=node, uptime=3, plan_hash="sha256:c", time=now - timedelta(seconds=10))
    middle = Keepalive(node=node, uptime=2, plan_hash="sha256:b", time=now - timedelta(seconds=20))
    other = Keepalive(node=name(), uptime=9, time=now)
    publish(connection, older, newest, middle, other)
    wait_for(lambda: written(reporter) == 4, what="the batch")
    assert reporter.counts["batches"] == 1, "the four keepalives were one batch"
    document = store.nodes.find_one({"_id": node})
    assert document["uptime"] == 3 and document["plan_hash"] == "sha256:c"
    assert document["first_seen"] == older.time.replace(
        microsecond=older.time.microsecond // 1000 * 1000
    )
    assert document["last_seen"] == document["keepalive_time"] == document["state_time"]
    assert abs(document["last_seen"] - newest.time) < timedelta(milliseconds=1)


def test_a_node_ahead_of_the_reporters_clock_is_never_seen_later_than_received(
    connection, start_reporter, store
):
    node, now = name(), datetime.now(UTC)
    clock = Clock(now)
    reporter = start_reporter(clock=clock, batch_size=2, flush_interval=10)
    ahead = Keepalive(node=node, uptime=2, time=now + timedelta(minutes=10))
    publish(connection, Keepalive(node=node, uptime=1, time=now - timedelta(minutes=1)), ahead)
    wait_for(lambda: written(reporter) == 2, what="the batch")
    document = store.nodes.find_one({"_id": node})
    assert abs(document["last_seen"] - now) < timedelta(milliseconds=1), "seen when received"
    assert document["uptime"] == 2 and document["skew"] == -600.0


def history_of_one_fleet(now: datetime) -> list[list[Message]]:
    """Batches about two nodes: in order, out of order within a batch, stale and
    redelivered messages after newer ones, older successes after newer ones."""

    def at(seconds: float) -> datetime:
        return now + timedelta(seconds=seconds)

    def status(node: str, run_id: str, seconds: float, done: int) -> RunStatus:
        return RunStatus(node=node, job="etc", run_id=run_id, kind="backup", time=at(seconds),
                         files_done=done)  # fmt: skip

    def keep(node: str, seconds: float, uptime: float) -> Keepalive:
        return Keepalive(node=node, uptime=uptime, time=at(seconds), plan_hash=f"sha256:{uptime}")

    announce = Announce(node="a", facts=facts("a"), agent_version="1", recipient=RECIPIENT,
                        time=at(0))  # fmt: skip
    r1 = result("a", "r1", at(40))
    return [
        [announce, keep("a", 1, 1), status("a", "r1", 1, 1), status("a", "r1", 2, 2)],
        [keep("a", 30, 3), keep("a", 20, 2), keep("b", 5, 5), r1, status("a", "r2", 50, 1)],
        [
            keep("a", 1, 1),
            status("a", "r1", 2, 2),
            r1,
            result("a", "r3", at(60), "verify", "failure"),
        ],
        [keep("b", 4, 4), result("a", "r2", at(70)), result("a", "r0", at(-5)), keep("a", 900, 9)],
        [result("a", "r4", at(80), status="failure"), status("a", "r2", 45, 0), announce],
        [result("a", "r5", at(90), "verify"), result("a", "r2", at(70)), keep("b", 6, 6)],
        [status("a", "r6", 91, 1), result("a", "r6", at(95)), status("a", "r2", 46, 3), r1],
        [status("a", "r6", 92, 2), result("a", "r6", at(95)), status("b", "r7", 93, 1)],
    ]


def test_the_fast_path_writes_what_the_guarded_pipelines_write(make_settings):
    """Each batch of a history goes once through the fast path (with its fallbacks on
    stale documents) and once through the guarded pipelines only: same documents."""
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    stores, history = {}, history_of_one_fleet(now)
    for fast in (True, False):
        settings = make_settings(database=f"test_fast_{fast}_{uuid.uuid4().hex[:8]}")
        stores[fast] = Store.from_settings(settings, "test")
        for index, batch in enumerate(history):
            received = now + timedelta(seconds=100 * (index + 1))
            assert write_batch(stores[fast], batch, received, settings, fast=fast) == set()
    try:
        for collection in ("nodes", "runs", "jobs"):
            fast, guarded = (list(stores[f].db[collection].find({}, sort=[("_id", 1)]))
                             for f in (True, False))  # fmt: skip
            assert fast == guarded, collection
        job = stores[True].jobs.find_one({"_id": "a/etc"})
        assert job["success_times"] == [now + timedelta(seconds=s) for s in (-5, 40, 70, 95)]
        assert job["last_success"]["run_id"] == "r6" and job["last_failure"]["run_id"] == "r4"
        assert job["last_verify"]["run_id"] == "r5"
        assert job["last_verify_success"]["run_id"] == "r5"
        node = stores[True].nodes.find_one({"_id": "a"})
        assert node["uptime"] == 9 and node["last_seen"] == now + timedelta(seconds=400)
        assert node["facts"]["hostname"] == "a" and node["first_seen"] == now
        assert stores[True].nodes.find_one({"_id": "b"})["uptime"] == 6
        r1 = stores[True].runs.find_one({"_id": "a/r1"})
        assert r1["final"] is True and r1["state"] == "success"
        assert stores[True].runs.find_one({"_id": "a/r2"})["progress"]["files_done"] == 1
        r6 = stores[True].runs.find_one({"_id": "a/r6"})
        assert r6["final"] is True and r6["first_status"] == now + timedelta(seconds=91)
    finally:
        for opened in stores.values():
            opened.client.drop_database(opened.db.name)
            opened.close()


def test_an_invalid_message_is_dead_lettered_and_the_reporter_goes_on(
    connection, start_reporter, store
):
    reporter = start_reporter()
    Producer(connection.default_channel).publish(
        b'{"type": "run_result", "node": "x"}',
        exchange=EVENTS.name,
        routing_key="run_result.x",
        content_type="application/json",
        content_encoding="utf-8",
    )
    node = name()
    publish(connection, Keepalive(node=node, uptime=1))
    wait_for(lambda: written(reporter) == 1 and reporter.counts["dead_lettered"] == 1)
    letter = DEAD_QUEUE(connection.default_channel).get(no_ack=True)
    assert letter is not None and "invalid run_result message" in letter.headers["x-muster-reason"]
    assert store.nodes.find_one({"_id": node})


def reporter_env(settings: ReporterSettings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MUSTER_BROKER_URL": settings.broker_url,
        "MUSTER_MONGO_URL": settings.mongo_url,
        "MUSTER_DATABASE": settings.database,
        "MUSTER_BATCH_SIZE": str(settings.batch_size),
        "MUSTER_FLUSH_INTERVAL": str(settings.flush_interval),
        "MUSTER_METRICS_PORT": "0",
        "MUSTER_WATCHDOG_INTERVAL": "3600",
        **extra,
    }


def queue_depth(connection: Connection) -> int:
    _, ready, _ = connection.default_channel.queue_declare(REPORTER_QUEUE.name, passive=True)
    return ready


def test_a_reporter_killed_mid_batch_loses_nothing_after_a_restart(
    connection, make_settings, store
):
    node = name("db")
    now = datetime.now(UTC)
    messages: list[Message] = []
    for index in range(150):
        run_id = f"run-{index}"
        messages.append(RunStatus(node=node, job="pg", run_id=run_id, kind="backup", time=now))
        messages.append(result(node, run_id, now + timedelta(seconds=index), job="pg"))
    publish(connection, *messages)
    env = reporter_env(make_settings(batch_size=25, flush_interval=5))
    command = [str(MUSTER), "reporter", "run"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.runs.count_documents({}) > 0, what="the first batch")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    at_kill = store.runs.count_documents({})
    assert at_kill < 150, "the reporter finished before it could be killed"
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: store.runs.count_documents({"final": True}) == 150, timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        _, errors = second.communicate(timeout=30)
    assert second.returncode == 0, errors
    assert store.runs.count_documents({}) == 150
    assert store.jobs.find_one({"_id": f"{node}/pg"})["success_times"]
    assert queue_depth(connection) == 0, "every message was acknowledged"


def test_a_batch_writing_when_the_broker_connection_drops_is_written_not_acknowledged(
    make_settings, amqp_url, store
):
    """Its deliveries came on the old connection: only RabbitMQ's redelivery settles them."""
    settings = make_settings()
    reporter = Reporter(connect([amqp_url]), store, settings, watchdog=False)
    node = name()
    reporter._held = [Held(None, Keepalive(node=node, uptime=1))]
    assert reporter.flush() and reporter.held_count() == 1
    reporter.on_connection_revived()
    reporter.flush(force=True)
    assert store.nodes.find_one({"_id": node})["uptime"] == 1
    assert reporter.counts["keepalive"] == 0 and reporter.counts["batches"] == 0
    assert reporter.held_count() == 0
    reporter._writer.shutdown()
    reporter.connection.release()


def test_mongodb_stopped_and_started_again_loses_nothing(
    connection, start_reporter, store, services
):
    node = name("app")
    now = datetime.now(UTC)
    reporter = start_reporter(mongo_timeout=1)
    publish(connection, Keepalive(node=node, uptime=1, time=now))
    wait_for(lambda: written(reporter) == 1)
    services.stop("mongo")
    try:
        batch = [result(node, f"r{i}", now + timedelta(seconds=i)) for i in range(60)]
        publish(connection, *batch)
        wait_for(lambda: reporter.counts["mongo_failures"] >= 2, what="failed writes")
        assert written(reporter) == 1 and not reporter.mongo_up
    finally:
        services.start("mongo")
    wait_for(lambda: written(reporter) == 61, timeout=90, what="the held batch, written")
    assert reporter.mongo_up
    assert store.runs.count_documents({}) == 60
    assert store.jobs.find_one({"_id": f"{node}/etc"})["last_success"]["run_id"] == "r59"
    assert queue_depth(connection) == 0


# -- watchdog ---------------------------------------------------------------------------------


def test_the_keepalive_alert_warns_escalates_and_resolves_once_published(
    connection, start_reporter, store, make_watchdog, tap
):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    watchdog = make_watchdog(clock, keepalive_warning=3, keepalive_critical=5)
    publish(connection, Keepalive(node=node, uptime=1, interval=10, plan_hash="sha256:1", time=t0))
    wait_for(lambda: data(reporter) == 1)
    clock.set(t0 + timedelta(seconds=29))
    assert watchdog.tick() == 0
    clock.set(t0 + timedelta(seconds=31))
    assert watchdog.tick() == 1
    assert watchdog.tick() == 0, "an open alert is not raised twice"
    clock.set(t0 + timedelta(seconds=51))
    assert watchdog.tick() == 1
    back = t0 + timedelta(seconds=52)
    clock.set(back)
    publish(connection, Keepalive(node=node, uptime=50, interval=10, plan_hash="sha256:1",
                                  time=back))  # fmt: skip
    wait_for(lambda: data(reporter) >= 2)
    clock.set(back + timedelta(seconds=1))
    assert watchdog.tick() == 1
    alerts = [a for a in tap.take(2) if a.key == f"keepalive:{node}"]
    assert [(a.state, a.severity) for a in alerts] == [
        ("open", "warning"),
        ("open", "critical"),
        ("resolved", "critical"),
    ]
    assert all(a.source == "reporter" and a.node == node for a in alerts)
    # the reporter's own alerts came back on alert.#: stored once, confirmed, not re-raised
    wait_for(lambda: reporter.counts["alert"] >= 3, what="the echoes")
    document = store.alerts.find_one({"_id": f"keepalive:{node}"})
    assert document["state"] == "resolved" and document["published"] is True
    assert store.alert_history.count_documents({"key": f"keepalive:{node}"}) == 3


def consumers(connection: Connection) -> int:
    _, _, consuming = connection.default_channel.queue_declare(REPORTER_QUEUE.name, passive=True)
    return consuming


def test_keepalives_waiting_in_a_backlog_are_not_silence_until_it_drains(
    connection, start_reporter, store, make_watchdog, make_settings, amqp_url
):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0)
    first = start_reporter(clock, batch_size=5)
    quiet = [name("quiet") for _ in range(4)]  # slow keepalives: never late in this test
    publish(connection, Keepalive(node=node, uptime=1, interval=10, time=t0),
            *(Keepalive(node=n, uptime=1, interval=60, time=t0) for n in quiet))  # fmt: skip
    wait_for(lambda: data(first) == 5)
    assert abs(first.watermark - t0) < timedelta(milliseconds=1)
    first.stop()
    wait_for(lambda: consumers(connection) == 0, what="the first reporter stopped")
    # the node goes on every 10 s, but nothing reads the queue for 100 s
    waiting = [t0 + timedelta(seconds=s) for s in range(10, 100, 10)]
    publish(connection, *(Keepalive(node=node, uptime=1, interval=10, time=t) for t in waiting))
    probe = Reporter(connect([amqp_url]), store, make_settings(batch_size=5), watchdog=False)
    try:
        assert probe.queue_depth() == 9
        options = {"backlog": probe.queue_depth, "watermark": lambda: first.watermark}
        watchdog = make_watchdog(
            clock, options, batch_size=5, keepalive_warning=3, keepalive_critical=5
        )
        clock.set(t0 + timedelta(seconds=100))  # 10 intervals by the wall clock
        assert watchdog.tick() == 0, "its keepalives wait in the queue: not silence"
        assert store.alerts.count_documents({}) == 0
        second = start_reporter(clock, batch_size=5)
        wait_for(lambda: data(second) == 9, what="the backlog, drained")
        assert probe.queue_depth() == 0
        assert watchdog.tick() == 0, "drained: its last keepalive is 10 s old"
        clock.set(t0 + timedelta(seconds=90 + 31))  # then it really goes silent
        assert watchdog.tick() == 1
    finally:
        probe._writer.shutdown()
        probe.connection.release()
    alert = store.alerts.find_one({"_id": f"keepalive:{node}"})
    assert alert["state"] == "open" and alert["severity"] == "warning"
    assert "silent for 31 s" in alert["summary"]


def test_an_instance_further_behind_does_not_undo_an_alert_until_the_node_is_heard_of(
    connection, start_reporter, store, make_watchdog
):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0 + timedelta(minutes=10))
    reporter = start_reporter(clock)
    publish(connection, Keepalive(node=node, uptime=1, interval=10, plan_hash="sha256:1", time=t0))
    wait_for(lambda: data(reporter) == 1)

    def behind() -> int:
        """A depth of more than a batch: both judge by their watermarks (rule under test)."""
        return 1000

    rules = {"keepalive_warning": 3, "keepalive_critical": 5}
    ahead = make_watchdog(
        clock, {"backlog": behind, "watermark": lambda: t0 + timedelta(seconds=31)}, **rules
    )
    later = make_watchdog(
        clock, {"backlog": behind, "watermark": lambda: t0 + timedelta(seconds=20)}, **rules
    )
    assert ahead.tick() == 1
    assert later.tick() == 0, "20 s of silence by its watermark, but not heard of since"
    assert store.alerts.find_one({"_id": f"keepalive:{node}"})["state"] == "open"
    publish(
        connection,
        Keepalive(
            node=node, uptime=25, interval=10, plan_hash="sha256:1", time=t0 + timedelta(seconds=25)
        ),
    )
    wait_for(lambda: data(reporter) == 2)
    assert later.tick() == 1, "heard of since: resolved"
    assert store.alerts.find_one({"_id": f"keepalive:{node}"})["state"] == "resolved"


def test_a_mass_silence_is_raised_over_several_ticks_while_ingestion_goes_on(
    connection, start_reporter, store, make_watchdog
):
    nodes, t0 = [name("split") for _ in range(6)], datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    publish(connection, *(Keepalive(node=n, uptime=1, interval=10, plan_hash="sha256:1",
                                    time=t0) for n in nodes))  # fmt: skip
    wait_for(lambda: data(reporter) == 6)
    clock.set(t0 + timedelta(seconds=31))
    watchdog = make_watchdog(clock, {"budget": 0.0}, keepalive_warning=3, keepalive_critical=5)
    assert watchdog.tick() == 1 and watchdog.unfinished, "one change, then the budget is spent"
    alerted = {doc["node"] for doc in store.alerts.find({"kind": "keepalive"})}
    back = next(n for n in nodes if n not in alerted)
    publish(connection, Keepalive(node=back, uptime=31, interval=10, plan_hash="sha256:1",
                                  time=clock.now))  # fmt: skip
    wait_for(lambda: data(reporter) == 7, what="ingestion between two ticks")
    changes = [1]
    while watchdog.unfinished:
        changes.append(watchdog.tick())
    assert changes == [1, 1, 1, 1, 1], "one change a tick; the node heard from is not raised"
    opened = {doc["node"] for doc in store.alerts.find({"kind": "keepalive", "state": "open"})}
    assert opened == set(nodes) - {back}


def test_a_reporter_whose_watchdog_is_unfinished_goes_on_before_its_interval(
    connection, start_reporter, store
):
    nodes, t0 = [name("split") for _ in range(4)], datetime.now(UTC)
    clock = Clock(t0)
    writer = start_reporter(clock)
    publish(connection, *(Keepalive(node=n, uptime=1, interval=10, plan_hash="sha256:1",
                                    time=t0) for n in nodes))  # fmt: skip
    wait_for(lambda: data(writer) == 4)
    clock.set(t0 + timedelta(seconds=31))
    # watchdog_interval is an hour: only the early ticks of an unfinished one raise all four
    busy = start_reporter(clock, budget=0.0, keepalive_warning=3, keepalive_critical=5)
    query = {"kind": "keepalive", "state": "open"}
    wait_for(lambda: store.alerts.count_documents(query) == 4, what="four ticks, one change each")
    # the alert is stored before the watchdog counts it, and its tick ends after that
    watchdog = busy.watchdog
    wait_for(lambda: watchdog.changes == 4 and not watchdog.unfinished, what="the ticks ended")


def test_an_overdue_backup_warns_escalates_and_resolves(
    connection, start_reporter, store, make_watchdog, tap
):
    node, t0 = name("db"), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    watchdog = make_watchdog(clock, overdue_margin=60, overdue_critical=2)
    hourly = [result(node, f"r{h}", t0 - timedelta(hours=2 - h)) for h in range(3)]
    publish(connection, *hourly)
    wait_for(lambda: data(reporter) == 3)
    clock.set(t0 + timedelta(seconds=3600 + 59))
    assert watchdog.tick() == 0
    clock.set(t0 + timedelta(seconds=3600 + 61))
    assert watchdog.tick() == 1
    clock.set(t0 + timedelta(seconds=2 * 3660 + 1))
    assert watchdog.tick() == 1
    publish(connection, result(node, "r3", clock.now))
    wait_for(lambda: data(reporter) == 4)
    assert watchdog.tick() == 1
    alerts = [a for a in tap.take(2) if a.kind == "overdue"]
    assert [(a.state, a.severity, a.job) for a in alerts] == [
        ("open", "warning", "etc"),
        ("open", "critical", "etc"),
        ("resolved", "critical", "etc"),
    ]
    assert "usual interval 60 min + margin 60 s" in alerts[0].summary


def test_a_failed_restore_test_raises_and_a_passing_one_resolves(
    connection, start_reporter, store, make_watchdog, tap
):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    watchdog = make_watchdog(clock)
    publish(connection, result(node, "v1", t0, kind="verify", status="failure"))
    wait_for(lambda: data(reporter) == 1)
    assert watchdog.tick() == 1
    publish(connection, result(node, "v0", t0 - timedelta(days=1), kind="verify"))  # older
    wait_for(lambda: data(reporter) == 2)
    assert watchdog.tick() == 0, "an older passing test does not resolve a newer failure"
    clock.set(t0 + timedelta(hours=1))
    publish(connection, result(node, "v2", clock.now, kind="verify"))
    wait_for(lambda: data(reporter) == 3)
    assert watchdog.tick() == 1
    alerts = [a for a in tap.take(2) if a.kind == "restore_test"]
    assert [(a.state, a.severity) for a in alerts] == [
        ("open", "critical"),
        ("resolved", "critical"),
    ]
    assert "2 files differ" in alerts[0].summary


def test_an_empty_or_missing_plan_is_unprotected_until_a_plan_arrives(
    connection, start_reporter, store, make_watchdog, tap
):
    empty, planless, t0 = name("empty"), name("none"), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    watchdog = make_watchdog(
        clock, unprotected_grace=60, keepalive_warning=100, keepalive_critical=100
    )
    publish(
        connection,
        Keepalive(node=empty, uptime=1, plan_hash=empty_plan_hash(empty), time=t0),
        Announce(node=planless, facts=facts(planless), agent_version="0.1.0",
                 recipient=RECIPIENT, time=t0),
    )  # fmt: skip
    wait_for(lambda: data(reporter) == 2)
    assert watchdog.tick() == 1  # the empty plan; the missing one is within its grace
    clock.set(t0 + timedelta(seconds=61))
    assert watchdog.tick() == 1
    later = clock.now
    publish(
        connection,
        Keepalive(node=empty, uptime=61, plan_hash="sha256:jobs", time=later),
        Keepalive(node=planless, uptime=61, plan_hash="sha256:jobs", time=later),
    )
    wait_for(lambda: data(reporter) == 4)
    assert watchdog.tick() == 2
    alerts = [a for a in tap.take(2) if a.kind == "unprotected"]
    assert sorted((a.node, a.state) for a in alerts) == sorted(
        [(empty, "open"), (planless, "open"), (empty, "resolved"), (planless, "resolved")]
    )


def test_alerts_from_agents_and_rule_engines_are_stored_with_their_history(
    connection, start_reporter, store
):
    node, t0 = name(), datetime.now(UTC)
    reporter = start_reporter()
    opened = Alert(
        key=f"plan_rejected:{node}",
        kind="plan_rejected",
        state="open",
        severity="critical",
        source="agent",
        node=node,
        summary="refused",
        time=t0,
    )
    resolved = Alert(
        key=opened.key,
        kind="plan_rejected",
        state="resolved",
        source="agent",
        node=node,
        summary="accepted again",
        time=t0 + timedelta(seconds=5),
    )
    rules = Alert(
        key="rules_invalid:engine-a",
        kind="rules_invalid",
        state="open",
        severity="critical",
        source="ruleengine",
        summary="line 3: bad",
        time=t0,
    )
    publish(connection, opened, rules)
    wait_for(lambda: written(reporter) == 2)
    assert store.alerts.find_one({"_id": opened.key})["state"] == "open"
    publish(connection, resolved, opened)  # the open one again, redelivered late
    wait_for(lambda: written(reporter) == 4)
    document = store.alerts.find_one({"_id": opened.key})
    assert document["state"] == "resolved" and document["summary"] == "accepted again"
    assert document["opened"] is not None
    assert store.alert_history.count_documents({"key": opened.key}) == 2
    fleet_wide = store.alerts.find_one({"_id": rules.key})
    assert fleet_wide["state"] == "open" and fleet_wide["node"] is None
    fixed = rules.model_copy(
        update={"id": "fixed-" + rules.id, "state": "resolved", "time": t0 + timedelta(seconds=9)}
    )
    publish(connection, fixed)
    wait_for(lambda: written(reporter) == 5)
    fleet_wide = store.alerts.find_one({"_id": rules.key})
    assert fleet_wide["state"] == "resolved" and fleet_wide["resolved_at"] is not None


def test_two_watchdogs_publish_each_change_once(
    connection, start_reporter, store, make_watchdog, tap
):
    nodes, t0 = [name() for _ in range(5)], datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    publish(connection, *(Keepalive(node=n, uptime=1, interval=10, time=t0) for n in nodes))
    wait_for(lambda: data(reporter) == 5)
    watchdogs = [make_watchdog(clock), make_watchdog(clock)]
    clock.set(t0 + timedelta(minutes=5))
    threads = [threading.Thread(target=w.tick) for w in watchdogs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(w.changes for w in watchdogs) == 5
    alerts = [a for a in tap.take(2) if a.node in nodes]
    assert sorted(a.node for a in alerts) == sorted(nodes)
    assert store.alert_history.count_documents({"node": {"$in": nodes}}) == 5


def test_an_unpublished_alert_is_published_again_with_the_same_id(
    connection, start_reporter, store, make_watchdog, tap
):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    publish(connection, Keepalive(node=node, uptime=1, interval=10, time=t0))
    wait_for(lambda: data(reporter) == 1)

    def broker_down(alert: Alert) -> None:
        raise ConnectionError("broker away")

    failing = make_watchdog(clock, republish_after=30)
    failing.publish = broker_down
    clock.set(t0 + timedelta(minutes=2))
    assert failing.tick() == 1
    assert store.alerts.find_one({"_id": f"keepalive:{node}"})["published"] is False
    assert not [a for a in tap.take(0.5) if a.node == node]
    healthy = make_watchdog(clock, republish_after=30)
    assert healthy.tick() == 0
    clock.set(t0 + timedelta(minutes=3))
    healthy.tick()
    again = [a for a in tap.take(1) if a.node == node]
    document = store.alerts.find_one({"_id": f"keepalive:{node}"})
    assert [a.id for a in again] == [document["message_id"]]
    assert document["published"] is True


# -- operators' commands ----------------------------------------------------------------------


class Lines:
    """A subprocess's stream, line by line, with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 15) -> str:
        return self.lines.get(timeout=timeout)

    def until(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.1, deadline - time.monotonic()))
            if text in line:
                return line


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_follower(args: list[str], amqp_url: str) -> tuple[subprocess.Popen, Lines, Lines]:
    """Started as from a background job, with SIGINT ignored: SIGINT must still end it."""
    env = {**os.environ, "MUSTER_BROKER_URL": amqp_url}
    process = subprocess.Popen(
        [str(MUSTER), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint,
    )
    out, err = Lines(process.stdout), Lines(process.stderr)
    err.until("following")
    return process, out, err


def test_status_follow_shows_progress_results_and_alerts_as_they_happen(connection, amqp_url):
    node, now = name(), datetime.now(UTC)
    process, out, _ = start_follower(["status", "--follow"], amqp_url)
    try:
        publish(
            connection,
            Keepalive(node=node, uptime=1),  # not shown
            RunStatus(node=node, job="etc", run_id="r1", kind="backup", files_done=3,
                      bytes_done=2048, bytes_total=8192, time=now),
            result(node, "r1", now),
            Alert(key=f"keepalive:{node}", kind="keepalive", state="open", source="reporter",
                  node=node, summary=f"{node} silent for 90 s", time=now),
        )  # fmt: skip
        lines = [out.next(), out.next(), out.next()]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    assert process.returncode == 0
    assert f"{node} etc backup running: 3 files, 2.0 KiB / 8.0 KiB (25%)" in lines[0]
    assert f"{node} etc backup success in 30.0 s, 1.0 KiB stored" in lines[1]
    assert f"ALERT open warning keepalive:{node}: {node} silent for 90 s" in lines[2]


def test_events_prints_one_json_object_per_line_filtered_by_type_and_node(connection, amqp_url):
    web, db, now = name("web"), name("db"), datetime.now(UTC)
    process, out, _ = start_follower(["events", "--type", "result", "--node", "web-*"], amqp_url)
    try:
        publish(
            connection,
            result(db, "d1", now),
            Keepalive(node=web, uptime=1),
            result(web, "w1", now),
        )
        event = json.loads(out.next())
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    assert process.returncode == 0
    assert event["type"] == "run_result" and event["node"] == web and event["run_id"] == "w1"


def test_metrics_parse_and_describe_the_fleet(connection, start_reporter, store, make_watchdog):
    node, t0 = name(), datetime.now(UTC)
    clock = Clock(t0)
    reporter = start_reporter(clock)
    publish(
        connection,
        Keepalive(node=node, uptime=1, interval=10, time=t0),
        result(node, "b1", t0),
        result(node, "v1", t0, kind="verify", status="failure"),
    )
    wait_for(lambda: data(reporter) == 3)
    clock.set(t0 + timedelta(minutes=5))
    make_watchdog(clock).tick()
    stop = serve(store, reporter, "127.0.0.1", 0, cache_seconds=0)
    try:
        url = f"http://127.0.0.1:{stop.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        stop()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    labels = (("job", "etc"), ("node", node))
    assert samples[("muster_node_last_seen_timestamp_seconds", (("node", node),))] == pytest.approx(
        t0.timestamp(), abs=0.01
    )
    success = samples[("muster_job_last_success_timestamp_seconds", labels)]
    assert success == pytest.approx(t0.timestamp(), abs=0.01)
    assert samples[("muster_job_last_backup_duration_seconds", labels)] == 30.0
    assert samples[("muster_job_last_backup_bytes_stored", labels)] == 1024
    assert samples[("muster_job_last_restore_test_success", labels)] == 0
    open_keepalive = (("kind", "keepalive"), ("severity", "critical"))
    assert samples[("muster_alerts_open", open_keepalive)] >= 1
    assert (
        samples[("muster_alerts_open", (("kind", "restore_test"), ("severity", "critical")))] >= 1
    )
    assert samples[("muster_reporter_messages_total", (("type", "run_result"),))] == 2


def test_status_and_report_read_mongodb(connection, start_reporter, store, mongo_url, database):
    node, now = name(), datetime.now(UTC)
    reporter = start_reporter()
    publish(
        connection,
        Keepalive(node=node, uptime=1, plan_hash="sha256:1"),
        result(node, "b1", now - timedelta(hours=2)),
        result(node, "b2", now - timedelta(hours=1), status="failure"),
        result(node, "v1", now, kind="verify"),
        result(node, "o1", now - timedelta(days=30)),  # outside the report's window
    )
    wait_for(lambda: data(reporter) == 5)
    runner = CliRunner()
    where = ["--mongo-url", mongo_url, "--database", database]
    shown = runner.invoke(cli, ["status", "--json", *where])
    assert shown.exit_code == 0, shown.output
    (entry,) = [n for n in json.loads(shown.output)["nodes"] if n["node"] == node]
    (job,) = entry["jobs"]
    assert job["last_backup"]["status"] == "failure"
    assert job["last_success"]["time"].startswith((now - timedelta(hours=2)).isoformat()[:16])
    assert job["last_restore_test"]["status"] == "success"
    table = runner.invoke(cli, ["status", *where])
    assert table.exit_code == 0 and node in table.output and "failure" in table.output
    reported = runner.invoke(cli, ["report", "--since", "7d", "--json", *where])
    assert reported.exit_code == 0, reported.output
    summary = json.loads(reported.output)
    (row,) = [r for r in summary["jobs"] if r["node"] == node]
    assert row["backup"]["runs"] == 2 and row["backup"]["success_rate"] == 0.5
    assert row["backup"]["bytes_stored"] == 2048 and row["restore_tested"] is True
    assert summary["fleet"]["restore_test_coverage"] == 1.0
    text = runner.invoke(cli, ["report", *where])
    assert text.exit_code == 0 and "restore-test coverage 100.0%" in text.output


def write_record(root: Path, node: str, job: str, when: datetime) -> Path:
    snapshot = when.strftime("%Y%m%dT%H%M%SZ") + f"-{when.microsecond:06d}"
    record = SnapshotRecord(
        id=snapshot,
        node=node,
        job=job,
        started=when,
        finished=when + timedelta(seconds=40),
        full=True,
        paths=["/etc"],
        catalog=ObjectInfo(name=f"catalogs/{snapshot}.jsonl.zst.age", size=300, sha256="0" * 64),
        recipients=[RECIPIENT],
        agent_version="0.1.0",
    )
    path = root / node / job / "snapshots" / f"{snapshot}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.model_dump_json(indent=2))
    (root / node / job / "catalogs").mkdir(exist_ok=True)
    (root / node / job / "catalogs" / f"{snapshot}.jsonl.zst.age").write_bytes(b"x" * 300)
    return path


def test_reindex_rebuilds_snapshot_history_from_storage(tmp_path, store, mongo_url, database):
    repo = tmp_path / "repo"
    now = datetime.now(UTC).replace(microsecond=123456)
    first = write_record(repo, "web1", "etc", now - timedelta(days=1))
    write_record(repo, "web1", "etc", now)
    write_record(repo, "db1", "pg", now)
    runner = CliRunner()
    where = ["--mongo-url", mongo_url, "--database", database]
    url = f"file://{repo}"
    done = runner.invoke(cli, ["reporter", "reindex", "--repo", url, *where])
    assert done.exit_code == 0, done.output
    assert "3 snapshot records found, 3 written, 0 removed" in done.output
    assert store.snapshots.count_documents({"node": "web1"}) == 2
    document = store.snapshots.find_one({"node": "db1"})
    assert document["repo"] == url and document["bytes_stored"] == 300
    first.unlink()
    again = runner.invoke(cli, ["reporter", "reindex", "--repo", url, "--node", "web*", *where])
    assert again.exit_code == 0, again.output
    assert "1 snapshot records found, 1 written, 1 removed" in again.output
    assert store.snapshots.count_documents({}) == 2
