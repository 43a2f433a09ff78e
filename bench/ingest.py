"""Reporter ingest rate: events per second from `muster.reporter` into MongoDB, durably.

    python -m bench.ingest [--events 20000] [--batch-sizes 100,250,500,1000,2000]
                           [--fleets 200,2000,20000] [--out docs/benchmarks-reporter.md]

Against the real servers: RabbitMQ and the MongoDB-protocol server from tests/services,
started here on 127.0.0.1 in a private state directory and stopped at the end (or the
ones named by MUSTER_TEST_AMQP_URL and MUSTER_TEST_MONGO_URL, left running).

Each measurement: purge the queue, publish `--events` messages of a simulated fleet into
`muster.reporter` (untimed), then start one reporter (`reporter.service.Reporter`, the
class behind `muster reporter run`, watchdog and metrics off) on an empty database and
time it from its first delivery until every message is written and acknowledged. The
reporter's writes use its defaults: w majority and one journaled barrier per batch.
After each run the documents are counted: every node, run and alert is there once.

Beside each reporter run, in the same run of this script: the *raw* rate, the same
messages (already decoded) written in the same batches straight into the MongoDB-protocol
server with `reporter.service.write_batch` (no RabbitMQ, no decoding, one thread), once
with the fast path and once with guarded pipelines only. The raw rate is what the server
itself accepts for these documents: the reporter's rate is shown as a share of it. The CPU
seconds the server process (and RabbitMQ, and this process) spend per event are read from
/proc: on a shared machine they vary far less than rates do.

The simulated fleet: each node loops over one job; per cycle it sends 6 keepalives, 3
run_status and 1 run_result (every 4th cycle a restore test instead of a backup), and an
alert every 20 cycles, interleaved across nodes in time order. `--fleets`
is the number of nodes: with few nodes a batch holds several messages about one node or
run (which the reporter merges into one write); with many, every message is a different
document (the worst case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from amqp import Connection as AmqpConnection
from amqp import basic_message

from bench.convergence import cpu_seconds, services
from broker.codec import decode, encode
from broker.connection import connect
from broker.messages import Alert, Keepalive, Message, RunResult, RunStats, RunStatus
from broker.reporter_config import ReporterSettings
from broker.topology import EVENTS, PERSISTENT_TYPES, REPORTER_QUEUE, declare, routing_key
from reporter.ingest import build_writes
from reporter.service import Reporter, write_batch
from reporter.store import Store

CYCLE = 10  # per node and job: 6 keepalives, 3 run_status, 1 run_result


def node_event(node: str, index: int, cycle: int, step: int, moment: datetime) -> list[Message]:
    """Event `step` of a node's `cycle`: keepalives, then a run's progress and result."""
    kind = "verify" if cycle % 4 == 3 else "backup"
    run_id = f"{index}-{cycle}"
    if step < 6:
        return [Keepalive(node=node, uptime=cycle, time=moment, plan_hash="sha256:x")]
    if step < 9:
        done = step - 6
        return [
            RunStatus(
                node=node,
                job="etc",
                run_id=run_id,
                kind=kind,
                time=moment,
                files_done=done * 10,
                bytes_done=done * 4096,
                files_total=30,
                bytes_total=12288,
            )
        ]
    events: list[Message] = [
        RunResult(
            node=node,
            job="etc",
            run_id=run_id,
            kind=kind,
            status="success",
            started=moment - timedelta(seconds=30),
            finished=moment,
            time=moment,
            snapshot="20261126T020000Z-000000",
            stats=RunStats(files=30, bytes_read=12288, bytes_stored=4096, volumes=1),
        )
    ]
    if cycle % 20 == 0:
        events.append(
            Alert(
                key=f"plan_rejected:{node}",
                kind="plan_rejected",
                state="open",
                source="agent",
                node=node,
                summary="bench",
                time=moment,
            )
        )
    return events


def fleet_events(nodes: int, count: int, start: datetime) -> list[Message]:
    """`count` messages of a fleet of `nodes` nodes, in time order: every node takes one
    step per round, each at its own place in its cycle, so any stretch of the stream
    holds every kind of message, and one node's messages are `nodes` apart."""
    events: list[Message] = []
    names = [f"node{i:05d}.bench.example.org" for i in range(nodes)]
    moment = start
    round_ = 0
    while len(events) < count:
        for index, node in enumerate(names):
            moment += timedelta(microseconds=50)
            position = round_ + index
            events += node_event(node, index, position // CYCLE, position % CYCLE, moment)
            if len(events) >= count:
                break
        round_ += 1
    return events[:count]


def publish_raw(amqp_url: str, events: list[Message]) -> None:
    """Publish without waiting for a confirm per message (untimed setup), then wait until
    the queue holds them all."""
    parts = amqp_url.split("//", 1)[1].rstrip("/").split("@")
    user, password = parts[0].split(":")
    host = parts[1].split("/")[0]
    with contextlib.closing(AmqpConnection(host=host, userid=user, password=password)) as conn:
        conn.connect()
        channel = conn.channel()
        for message in events:
            channel.basic_publish(
                basic_message.Message(
                    encode(message),
                    content_type="application/json",
                    content_encoding="utf-8",
                    message_id=message.id,
                    delivery_mode=2 if message.type in PERSISTENT_TYPES else 1,
                ),
                exchange=EVENTS.name,
                routing_key=routing_key(message),
            )
        deadline = time.monotonic() + 120
        while True:
            _, ready, _ = channel.queue_declare(REPORTER_QUEUE.name, passive=True)
            if ready >= len(events) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if ready < len(events):
            raise SystemExit(f"only {ready} of {len(events)} messages reached the queue")


class CpuMeter:
    """CPU seconds of the servers and of this process over a stretch of time."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = self.read()

    def read(self) -> dict[str, float]:
        values = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return {**values, "bench": time.process_time()}

    def used(self) -> dict[str, float]:
        return {name: value - self.start[name] for name, value in self.read().items()}


def measure(
    amqp_url: str, mongo_url: str, events: list[Message], batch: int, pids: dict[str, int | None]
) -> dict:
    database = f"bench_ingest_{uuid.uuid4().hex[:8]}"
    with connect([amqp_url]) as connection:
        declare(connection)
        REPORTER_QUEUE(connection.default_channel).purge()
    publish_raw(amqp_url, events)
    settings = ReporterSettings(
        broker_url=amqp_url,
        mongo_url=mongo_url,
        database=database,
        batch_size=batch,
        flush_interval=0.2,
        metrics_port=0,
    )
    store = Store.from_settings(settings, "bench")
    store.ensure_indexes()
    reporter = Reporter(connect([amqp_url]), store, settings, watchdog=False, instance="bench")
    first: list[float] = []
    original = reporter._on_message

    def timed(queue: str, delivery) -> None:
        if not first:
            first.append(time.perf_counter())
        original(queue, delivery)

    reporter._on_message = timed  # type: ignore[method-assign]
    thread = threading.Thread(target=reporter.run, daemon=True)
    meter = CpuMeter(pids)
    thread.start()
    written = 0
    deadline = time.monotonic() + 600
    kinds = ("announce", "keepalive", "run_status", "run_result", "alert")
    while written < len(events) and time.monotonic() < deadline:
        time.sleep(0.02)
        written = sum(reporter.counts.get(kind, 0) for kind in kinds)
    finished = time.perf_counter()
    cpu = meter.used()
    reporter.stop()
    thread.join(timeout=30)
    elapsed = finished - (first[0] if first else finished)
    counts = {name: store.db[name].estimated_document_count() for name in ("nodes", "runs")}
    runs = [m for m in events if isinstance(m, RunStatus | RunResult)]
    expected_runs = len({(m.node, m.run_id) for m in runs})
    expected_nodes = len({m.node for m in events if isinstance(m, Keepalive)})
    history = store.db.alert_history.estimated_document_count()
    store.client.drop_database(database)
    store.close()
    ok = (
        written == len(events)
        and counts["runs"] == expected_runs
        and counts["nodes"] == expected_nodes
        and history == sum(isinstance(m, Alert) for m in events)
    )
    return {
        "batch": batch,
        "events": len(events),
        "seconds": elapsed,
        "rate": len(events) / elapsed if elapsed else 0.0,
        "batches": reporter.counts.get("batches", 0),
        "checked": ok,
        "documents": counts,
        "cpu": {name: value / len(events) for name, value in cpu.items()},
    }


def measure_raw(
    mongo_url: str, events: list[Message], batch: int, pids: dict[str, int | None], fast: bool
) -> dict:
    """The same messages, in the same batches, written straight by `write_batch`."""
    settings = ReporterSettings(
        mongo_url=mongo_url, database=f"bench_raw_{uuid.uuid4().hex[:8]}", metrics_port=0
    )
    store = Store.from_settings(settings, "bench-raw")
    store.ensure_indexes()
    meter = CpuMeter(pids)
    began = time.perf_counter()
    for start in range(0, len(events), batch):
        write_batch(store, events[start : start + batch], datetime.now(UTC), settings, fast=fast)
    elapsed = time.perf_counter() - began
    cpu = meter.used()
    store.client.drop_database(settings.database)
    store.close()
    return {
        "rate": len(events) / elapsed,
        "cpu": {name: value / len(events) for name, value in cpu.items()},
    }


def client_cost(events: list[Message], batch: int) -> float:
    """Seconds per event the reporter itself spends (decode, then build the writes), with
    no server at all: its ceiling against a MongoDB that costs nothing."""
    bodies = [encode(message) for message in events]
    began = time.perf_counter()
    for start in range(0, len(bodies), batch):
        decoded = [decode(body) for body in bodies[start : start + batch]]
        build_writes(decoded, datetime.now(UTC))
    return (time.perf_counter() - began) / len(bodies)


def server_pids(values: dict[str, str]) -> dict[str, int | None]:
    """The PIDs of the MongoDB-protocol server and of RabbitMQ, from tests/services."""
    pids: dict[str, int | None] = {}
    for name, variable in (("mongo", "MONGO"), ("rabbitmq", "RABBITMQ")):
        path = values.get(f"MUSTER_TEST_{variable}_PID_FILE")
        pids[name] = int(Path(path).read_text()) if path and Path(path).exists() else None
    return pids


@contextlib.contextmanager
def servers(directory: Path) -> Iterator[tuple[str, str, dict[str, int | None]]]:
    """RabbitMQ and the MongoDB-protocol server (bench.convergence.services), with PIDs."""
    with services(directory, ("rabbitmq", "mongo")) as values:
        yield values["MUSTER_TEST_AMQP_URL"], values["MUSTER_TEST_MONGO_URL"], server_pids(values)


def us(seconds: float) -> str:
    return f"{1e6 * seconds:,.0f}"


def render(
    results: list[dict], args: argparse.Namespace, elapsed: float, client: dict[int, float]
) -> str:
    best = max(results, key=lambda row: row["rate"])
    lines = [
        "# Reporter ingest rate",
        "",
        "Generated by `python -m bench.ingest` "
        f"(`--events {args.events} --batch-sizes {args.batch_sizes} --fleets {args.fleets}`) "
        f"on {datetime.now(UTC):%Y-%m-%d}, in {elapsed:.0f} s.",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; RabbitMQ and the MongoDB-protocol server "
        "(SecantusDB, tests/services) on 127.0.0.1, sharing the cores with the reporter "
        f"(and with other work: load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "**reporter**: events per second from `muster.reporter` into MongoDB, written (w "
        "majority, one journaled barrier per batch) and acknowledged, from the reporter's "
        "first delivery to its last acknowledgement; every run checks afterwards that each "
        "node, run and alert is in MongoDB exactly once. **raw**: the same messages, already "
        "decoded, in the same batches, written by `write_batch` straight into the server "
        "(fast path, and guarded pipelines only), measured right after. **share**: reporter "
        "/ raw (fast). CPU columns: CPU microseconds per event of the MongoDB-protocol "
        "server process, of RabbitMQ and of the reporter's process, during the reporter run "
        "(server CPU also during the raw run).",
        "",
        "| nodes | batch | reporter ev/s | raw ev/s | raw guarded ev/s | share "
        "| batches | server µs/ev | raw server µs/ev | raw guarded server µs/ev "
        "| RabbitMQ µs/ev | reporter µs/ev | checked |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| :---: |",
    ]
    for row in results:
        cpu, raw = row["cpu"], row["raw"]
        lines.append(
            f"| {row['nodes']} | {row['batch']} | {row['rate']:,.0f} | {raw['rate']:,.0f} "
            f"| {row['guarded']['rate']:,.0f} | {row['rate'] / raw['rate']:.0%} "
            f"| {row['batches']} | {us(cpu['mongo'])} | {us(raw['cpu']['mongo'])} "
            f"| {us(row['guarded']['cpu']['mongo'])} | {us(cpu['rabbitmq'])} | {us(cpu['bench'])} "
            f"| {'yes' if row['checked'] else 'NO'} |"
        )
    lines += [
        "",
        f"Best: **{best['rate']:,.0f} events/s** with batches of {best['batch']} "
        f"({best['nodes']} nodes).",
        "",
    ]
    for nodes in sorted({row["nodes"] for row in results}):
        rows = [row for row in results if row["nodes"] == nodes]
        top = max(rows, key=lambda row: row["rate"])
        raw = max(rows, key=lambda row: row["raw"]["rate"])
        server = min(row["raw"]["cpu"]["mongo"] for row in rows)
        lines.append(
            f"- {nodes} nodes: reporter {top['rate']:,.0f} events/s with batches of "
            f"{top['batch']}; raw {raw['raw']['rate']:,.0f} events/s (batches of "
            f"{raw['batch']}); the server's own CPU, {us(server)} µs per event at best, "
            f"caps it at {1 / server:,.0f} events/s on a core of its own."
        )
    ceiling = ", ".join(
        f"{nodes} nodes {1e6 * cost:.0f} µs ({1 / cost:,.0f} events/s)"
        for nodes, cost in sorted(client.items())
    )
    lines += [
        "",
        "The reporter's own CPU per event (decode and validate, then build the merged "
        f"writes; no server, batches of 1000): {ceiling}.",
        "",
        READING,
    ]
    return "\n".join(lines) + "\n"


READING = """Reading these numbers. *server µs/ev* is the MongoDB-protocol server's CPU per
event; its inverse is the rate that server could take on a core of its own, and it is what
the batch size changes: messages about one node or run in a batch become one write (200
nodes), while with every message about another document (20,000 nodes) it is the server's
cost per written document. *raw guarded* next to *raw* shows what the fast path saves
(operators instead of pipelines, inserts for new runs). *share* is the reporter's rate as a
part of the raw rate, the same documents written with nothing else to do: below 100% is
RabbitMQ, decoding and acknowledging sharing the cores with the server (and here with
whatever else runs on the machine: see the load average). Rates vary a lot from run to run
on a shared machine, CPU per event much less. What limits the rate, what was tried and
what it gave: docs/REPORTER.md, "Ingest rate"."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="1000,2000,5000")
    parser.add_argument("--fleets", default="200,2000,20000", help="numbers of nodes")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, help="write the measurements here, as JSON")
    parser.add_argument("--services-dir", type=Path, default=Path("/tmp/ingest-bench-services"))
    args = parser.parse_args(argv)
    began = time.monotonic()
    start = datetime.now(UTC) - timedelta(hours=1)
    results = []
    client: dict[int, float] = {}
    with servers(args.services_dir) as (amqp_url, mongo_url, pids):
        for nodes in (int(n) for n in args.fleets.split(",")):
            events = fleet_events(nodes, args.events, start)
            client[nodes] = client_cost(events, 1000)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                row = measure(amqp_url, mongo_url, events, batch, pids)
                row["raw"] = measure_raw(mongo_url, events, batch, pids, fast=True)
                row["guarded"] = measure_raw(mongo_url, events, batch, pids, fast=False)
                row["nodes"] = nodes
                results.append(row)
                print(
                    f"{nodes:>6} nodes  batch {batch:>5}: {row['rate']:>8,.0f} events/s, raw "
                    f"{row['raw']['rate']:,.0f} (guarded {row['guarded']['rate']:,.0f}); "
                    f"server {us(row['cpu']['mongo'])} µs/event ({row['events']} in "
                    f"{row['seconds']:.2f} s, {row['batches']} batches, "
                    f"checked: {row['checked']})",
                    flush=True,
                )
    text = render(results, args, time.monotonic() - began, client)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "client": client}, indent=1))
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0 if all(row["checked"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
