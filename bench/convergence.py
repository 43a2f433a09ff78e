"""Fleet convergence: how fast rule engines give every node of a booting fleet its plan.

    python -m bench.convergence --nodes 1000,10000 [--engines 2] [--steady 60]
                                [--interval 20] [--profile DIR] [--json FILE]

Against the real RabbitMQ from tests/services (started here in a private state directory
and stopped at the end, or the one named by MUSTER_TEST_AMQP_URL, left running) and
`--engines` real `muster ruleengine run` subprocesses sharing `muster.ruleengine`, with
examples/rules.yaml (host name globs and regexes, labels, subnets, OS and cloud facts:
the simulated fleet gets five different sets of jobs).

The fleet is simulated, not run: one process declares every node's plan queue and
consumes from all of them on one connection (an agent declares its queue before it
announces), then publishes every node's announce as fast as the broker confirms them,
in batches of `--batch` with publisher confirms, like a fleet booting at once. Measured:

- convergence: from the first announce published until every node's queue delivered
  its plan (each node counted once; plans are decoded, `--verify` of them, spread over
  the fleet, are checked with `verify_plan` and the signing key's public half, and every
  node must get a plan for itself);
- plans/s; `muster.ruleengine` depth over time (passive queue_declare every 0.5 s);
  each engine's CPU seconds and peak RSS (VmHWM); RabbitMQ's CPU;
- then a steady state: every node sends a keepalive with its facts and the hash of the
  plan it got, every `--interval` seconds, spread evenly, for `--steady` seconds; the
  engines should answer none of them (same hash) and keep the queue near empty.

`--cold` simulates a first boot instead: the clock starts before the plan queues exist,
and they are declared while the announces go out, by `DECLARERS` connections at once (a
booting fleet declares on as many connections as it has nodes; one connection would
measure the simulator), each node's queue consumed as soon as it is declared; a plan for
a queue the engine declared first waits in it until the node consumes.

`--profile DIR` runs each engine under cProfile (`python -m cProfile -o`), which slows
it down: use it to see where the time goes, not for the headline numbers.

`muster.reporter` is bound to announces and keepalives too; no reporter runs here, so it
fills up during a run and is purged afterwards (RabbitMQ stores those copies as well).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Queue
from typing import Any
from urllib.parse import unquote, urlparse

from amqp import Connection as AmqpConnection
from amqp import basic_message

from broker.codec import decode, encode
from broker.messages import Announce, CloudFacts, Facts, Keepalive, OsFacts, SignedPlan
from broker.signing import TrustedKeys, generate_signing_key, verify_plan
from broker.topology import (
    EVENTS,
    PLAN_QUEUE_EXPIRES_MS,
    PLANS,
    REPORTER_QUEUE,
    RULEENGINE_QUEUE,
    routing_key,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RULES = REPO_ROOT / "examples" / "rules.yaml"
RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENVELOPE_TIME = re.compile(rb'"time":"[^"]*"')  # a message's own time comes first
DECLARERS = 8  # connections that declare plan queues at once in a cold boot
DECLARE_CHUNK = 100  # queues declared before the node consumes them
PLAN_QUEUE_ARGS = {"x-expires": PLAN_QUEUE_EXPIRES_MS, "x-max-length": 1, "x-overflow": "drop-head"}


# -- the simulated fleet -----------------------------------------------------------------------


def node_facts(index: int, run: str) -> tuple[str, Facts]:
    """Node `index`'s id and facts: ten kinds of node that examples/rules.yaml tells apart."""
    kind = index % 10
    os_facts = OsFacts(family="debian", name="Debian GNU/Linux", version="12", kernel="6.1.0")
    cloud = CloudFacts(provider="openstack", project="web", instance_id=f"i-{index:06d}")
    labels: dict[str, str] = {}
    addresses = [f"10.{2 + index // 65000}.{index // 250 % 250}.{index % 250 + 1}/16"]
    if kind <= 2:  # web servers, by name
        host = f"web-{index:05d}"
    elif kind == 3:  # web servers, by label
        host, labels = f"node-{index:05d}", {"tier": "frontend"}
    elif kind == 4:  # databases: name regex and subnet
        host, addresses = f"db{index}", [f"10.1.{index // 250 % 250}.{index % 250 + 1}/16"]
    elif kind == 5:  # OpenStack databases in a production project
        host = f"pg-{index:05d}"
        cloud = CloudFacts(provider="openstack", project="prod-data", metadata={"role": "db"})
    elif kind == 6:  # old Debian: /etc to S3
        host = f"legacy-{index:05d}"
        os_facts = OsFacts(family="debian", name="Debian GNU/Linux", version="11", kernel="5.10")
    elif kind == 7:  # old Debian that opted out of the S3 move
        host, labels = f"legacy-{index:05d}", {"backup": "off"}
        os_facts = OsFacts(family="debian", name="Debian GNU/Linux", version="11", kernel="5.10")
    else:  # everything else: /etc only
        host = f"app-{index:05d}"
    node = f"{host}.{run}.bench.example.org"
    facts = Facts(
        hostname=host,
        fqdn=node,
        addresses=addresses,
        os=os_facts,
        cloud=cloud,
        labels=labels,
    )
    return node, facts


@dataclass
class Node:
    index: int
    node: str
    facts: Facts
    plan_hash: str | None = None


def restamp(body: bytes, when: bytes | None = None) -> bytes:
    """The message sent again now: the reporter takes a node's last sign of life from
    the message's own time, so a message built before a long setup must not look old."""
    when = when or now_stamp()
    return ENVELOPE_TIME.sub(b'"time":"' + when + b'"', body, count=1)


def now_stamp() -> bytes:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


# -- AMQP helpers ------------------------------------------------------------------------------


def amqp_connection(url: str) -> AmqpConnection:
    parsed = urlparse(url)
    vhost = unquote(parsed.path[1:]) if len(parsed.path) > 1 else "/"
    connection = AmqpConnection(
        host=f"{parsed.hostname}:{parsed.port or 5672}",
        userid=unquote(parsed.username or "guest"),
        password=unquote(parsed.password or "guest"),
        virtual_host=vhost or "/",
        heartbeat=0,
    )
    connection.connect()
    return connection


class ConfirmingPublisher:
    """Publishes batches on one channel in confirm mode: a batch is sent without waiting,
    then its confirms are awaited together (what a booting fleet does in parallel)."""

    def __init__(self, url: str) -> None:
        self.connection = amqp_connection(url)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self._sent = 0
        self._acked = 0
        self._nacked = 0
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)

    @property
    def sent(self) -> int:
        return self._sent

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._acked = delivery_tag if multiple else self._acked + 1

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked += 1

    def publish_batch(self, items: list[tuple[bytes, str, str, int]]) -> None:
        """items: (body, routing key, message id, delivery mode)."""
        for body, key, message_id, mode in items:
            self.channel.basic_publish(
                basic_message.Message(
                    body,
                    content_type="application/json",
                    content_encoding="utf-8",
                    message_id=message_id,
                    delivery_mode=mode,
                ),
                exchange=EVENTS.name,
                routing_key=key,
            )
            self._sent += 1
        while self._acked < self._sent:
            self.connection.drain_events(timeout=30)
        if self._nacked:
            raise RuntimeError(f"RabbitMQ refused {self._nacked} messages")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def declare_queues(channel: Any, nodes: list[Node]) -> None:
    """Declare and bind the nodes' plan queues as `broker.topology.plan_queue` does,
    pipelined; returns once RabbitMQ has done them all."""
    for node in nodes:
        name = f"muster.plan.{node.node}"
        channel.queue_declare(
            name, durable=True, auto_delete=False, arguments=PLAN_QUEUE_ARGS, nowait=True
        )
        channel.queue_bind(name, PLANS.name, routing_key=node.node, nowait=True)
    channel.basic_qos(0, 0, False)  # a synchronous call: every declare above is done


class PlanReceiver:
    """Every node's plan queue, consumed on one connection, on a thread of its own."""

    def __init__(self, url: str, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.url = url
        self.connection = amqp_connection(url)
        self.channel = self.connection.channel()
        self.bodies: dict[int, bytes] = {}
        self.arrival: dict[int, float] = {}
        self.deliveries = 0
        self.after_converged = 0
        self.all_in = threading.Event()
        self.declared_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def declare(self) -> float:
        """Declare and consume every node's plan queue; returns the seconds it took."""
        started = time.monotonic()
        declare_queues(self.channel, self.nodes)
        self._consume(self.nodes)
        return time.monotonic() - started

    def _consume(self, nodes: list[Node]) -> None:
        for node in nodes:
            self.channel.basic_consume(
                f"muster.plan.{node.node}",
                consumer_tag=str(node.index),
                no_ack=True,
                callback=self._on_plan,
                nowait=True,
            )
        self.channel.basic_qos(0, 0, False)  # a synchronous call: the consumers are set

    def _declare_in_parallel(self) -> None:
        """Cold boot: `DECLARERS` connections declare chunks of queues at once; this
        thread consumes each chunk once it is declared, and takes plans meanwhile."""
        started = time.monotonic()
        chunks = [
            self.nodes[i : i + DECLARE_CHUNK] for i in range(0, len(self.nodes), DECLARE_CHUNK)
        ]
        todo: Queue[list[Node]] = Queue()
        for chunk in chunks:
            todo.put(chunk)
        declared: Queue[list[Node]] = Queue()
        workers = [
            threading.Thread(target=self._declarer, args=(todo, declared), daemon=True)
            for _ in range(DECLARERS)
        ]
        for worker in workers:
            worker.start()
        for _ in chunks:
            while True:
                with contextlib.suppress(TimeoutError, OSError):
                    self.connection.drain_events(timeout=0.01)
                with contextlib.suppress(Empty):
                    self._consume(declared.get_nowait())
                    break
        self.declared_s = time.monotonic() - started

    def _declarer(self, todo: Queue, declared: Queue) -> None:
        with contextlib.closing(amqp_connection(self.url)) as connection:
            channel = connection.channel()
            while True:
                try:
                    chunk = todo.get_nowait()
                except Empty:
                    return
                declare_queues(channel, chunk)
                declared.put(chunk)

    def _on_plan(self, message: Any) -> None:
        index = int(message.delivery_info["consumer_tag"])
        self.deliveries += 1
        if self.all_in.is_set():
            self.after_converged += 1
        if index not in self.arrival:
            self.arrival[index] = time.monotonic()
        self.bodies[index] = message.body
        if len(self.arrival) == len(self.nodes):
            self.all_in.set()

    def start(self, declare: bool = False) -> None:
        """Consume on a thread; with `declare`, declare every queue there first (cold)."""
        self._thread = threading.Thread(
            target=self._loop, args=(declare,), name="plans", daemon=True
        )
        self._thread.start()

    def _loop(self, declare: bool) -> None:
        if declare:
            self._declare_in_parallel()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.connection.drain_events(timeout=0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def delete_queues(self, url: str) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()  # its consumers go with it
        with contextlib.closing(amqp_connection(url)) as connection:
            channel = connection.channel()
            for node in self.nodes:
                channel.queue_delete(f"muster.plan.{node.node}", nowait=True)
            channel.basic_qos(0, 0, False)


# -- processes -------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in bytes (0 when the process is gone)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) * 1024
    return values


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds a process has used so far (0 when it is not known)."""
    if not pid:
        return 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Engine:
    process: subprocess.Popen[bytes]
    log: Path


def start_engines(
    count: int,
    url: str,
    rules: Path,
    key: Path,
    work: Path,
    profile: Path | None,
    tag: str,
    heartbeat: int | None = None,
) -> list[Engine]:
    engines = []
    env = {**os.environ, "MUSTER_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    if heartbeat is not None:
        env["MUSTER_HEARTBEAT"] = str(heartbeat)
    env.pop("MUSTER_CONFIG", None)
    for number in range(count):
        python = [sys.executable]
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            python += ["-m", "cProfile", "-o", str(profile / f"engine-{tag}-{number}.prof")]
        command = [
            *python,
            *("-m", "muster", "ruleengine", "run"),
            *("--rules", str(rules), "--signing-key", str(key), "--broker-url", url),
        ]
        log = work / f"engine-{tag}-{number}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        engines.append(Engine(process, log))
    return engines


def stop_engines(engines: list[Engine]) -> list[str]:
    for engine in engines:
        if engine.process.poll() is None:
            engine.process.send_signal(signal.SIGTERM)
    lasts = []
    for engine in engines:
        try:
            engine.process.wait(30)
        except subprocess.TimeoutExpired:
            engine.process.kill()
            engine.process.wait()
        text = engine.log.read_text(errors="replace")
        lines = text.strip().splitlines()
        lost = text.count("Connection to broker lost")
        errors = text.count(" ERROR ")
        lasts.append(f"{lines[-1] if lines else ''} ({errors} errors, {lost} reconnects)")
    return lasts


# -- sampling ----------------------------------------------------------------------------------


class Sampler:
    """Every 0.5 s: the depth of `queues` (the first one also as `depth`, with its
    consumers), the CPU and memory of `pids` and RabbitMQ's CPU, and what `probe` says."""

    def __init__(
        self,
        url: str,
        pids: list[int],
        broker_pid: int | None,
        queues: tuple[str, ...] = (RULEENGINE_QUEUE.name,),
        probe: Callable[[], Any] | None = None,
    ) -> None:
        self.connection = amqp_connection(url)
        self.channel = self.connection.channel()
        self.pids = pids
        self.broker_pid = broker_pid
        self.queues = queues
        self.probe = probe
        self.samples: list[dict[str, Any]] = []
        self.hwm = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.monotonic(), "depths": {}}
        for queue in self.queues:
            _, ready, consumers = self.channel.queue_declare(queue, passive=True)
            row["depths"][queue] = ready
            row.setdefault("depth", ready)
            row.setdefault("consumers", consumers)
        if self.probe is not None:
            row["probe"] = self.probe()
        row["cpu"] = [cpu_seconds(pid) for pid in self.pids]
        row["rss"] = [proc_status(pid)["VmRSS"] for pid in self.pids]
        for pid in self.pids:
            self.hwm[pid] = max(self.hwm[pid], proc_status(pid)["VmHWM"])
        row["broker_cpu"] = cpu_seconds(self.broker_pid)
        return row

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.connection.close()


def window(samples: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    return [s for s in samples if start <= s["t"] <= end]


def cpu_share(samples: list[dict[str, Any]], key: str = "cpu") -> list[float]:
    """CPU use in the window, as a share of one core, per process."""
    if len(samples) < 2:
        return []
    first, last = samples[0], samples[-1]
    wall = last["t"] - first["t"]
    if key == "broker_cpu":
        return [round((last[key] - first[key]) / wall, 3)]
    return [round((b - a) / wall, 3) for a, b in zip(first[key], last[key], strict=True)]


# -- one measurement ---------------------------------------------------------------------------


@dataclass
class Result:
    nodes: int
    engines: int
    load_before: str
    declare_s: float = 0.0
    publish_s: float = 0.0
    converge_s: float | None = None
    plans_per_s: float = 0.0
    arrivals: dict[str, float] = field(default_factory=dict)
    distinct_plans: int = 0
    verified: int = 0
    depth_max: int = 0
    depth_series: list[tuple[float, int]] = field(default_factory=list)
    engine_cpu_s: list[float] = field(default_factory=list)
    engine_cpu_share: list[float] = field(default_factory=list)
    broker_cpu_share: list[float] = field(default_factory=list)
    engine_hwm_mib: list[float] = field(default_factory=list)
    steady: dict[str, Any] = field(default_factory=dict)
    engine_exit: list[str] = field(default_factory=list)
    load_after: str = ""


def make_fleet(nodes_count: int, work: Path) -> tuple[str, Path, TrustedKeys, list[Node], list]:
    """A run id, a fresh signing key (its path, and the public half as trusted keys), the
    simulated nodes and their announces (body, routing key, message id, delivery mode)."""
    run = uuid.uuid4().hex[:6]
    key = work / f"signing-{run}.pem"
    public = TrustedKeys([generate_signing_key(key).public_key()])
    nodes = [Node(i, *node_facts(i, run)) for i in range(nodes_count)]
    announces = []
    for node in nodes:
        message = Announce(
            node=node.node, facts=node.facts, agent_version="0.1.0", recipient=RECIPIENT
        )
        announces.append((encode(message), routing_key(message), message.id, 2))
    return run, key, public, nodes, announces


def purge(admin: AmqpConnection, queues: tuple[str, ...]) -> None:
    """Empty shared queues (leftovers of a killed run); a missing one is not an error."""
    for queue in queues:
        channel = admin.channel()
        with contextlib.suppress(Exception):
            channel.queue_purge(queue)
        with contextlib.suppress(Exception):
            channel.close()


def wait_consuming(
    admin: AmqpConnection,
    queue: str,
    count: int,
    processes: list[subprocess.Popen[bytes]],
    work: Path,
) -> None:
    """Wait until `count` consumers read `queue` (the processes declare it)."""
    deadline = time.monotonic() + 60
    while True:
        channel = admin.channel()
        with contextlib.suppress(Exception):
            _, _, consumers = channel.queue_declare(queue, passive=True)
            if consumers >= count:
                channel.close()
                return
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise SystemExit(f"no {count} consumers on {queue}; see the logs in {work}")
        time.sleep(0.2)


def converge(
    args: argparse.Namespace,
    announces: list,
    publisher: ConfirmingPublisher,
    receiver: PlanReceiver,
    sampler: Sampler,
    result: Result,
) -> float:
    """Publish every announce and wait until every node holds its plan; fills `result`
    and returns the monotonic time of the first announce."""
    nodes_count = len(announces)
    stamp = now_stamp()
    announces = [(restamp(body, stamp), *rest) for body, *rest in announces]
    started = time.monotonic()
    receiver.start(declare=args.cold)  # cold: the queues are created meanwhile
    for offset in range(0, nodes_count, args.batch):
        publisher.publish_batch(announces[offset : offset + args.batch])
    result.publish_s = round(time.monotonic() - started, 2)
    log(f"  {nodes_count} announces published and confirmed in {result.publish_s} s")
    if receiver.all_in.wait(args.timeout):
        finished = max(receiver.arrival.values())
        result.converge_s = round(finished - started, 2)
        result.plans_per_s = round(nodes_count / result.converge_s)
    else:
        finished = time.monotonic()
        log(f"  TIMEOUT: {len(receiver.arrival)} of {nodes_count} nodes have a plan")
    if args.cold:
        result.declare_s = round(receiver.declared_s, 2)
        log(f"  cold: declared and consuming the plan queues took {result.declare_s} s")
    times = sorted(t - started for t in receiver.arrival.values())
    for share in (0.5, 0.9, 0.99, 1.0):
        if times:
            position = min(len(times) - 1, int(share * nodes_count) - 1)
            result.arrivals[f"p{int(share * 100)}"] = round(times[position], 2)
    time.sleep(0.6)
    converge_samples = window(sampler.samples, started - 1, finished + 0.6)
    result.depth_series = [(round(s["t"] - started, 1), s["depth"]) for s in converge_samples]
    result.depth_max = max((s["depth"] for s in converge_samples), default=0)
    result.engine_cpu_share = cpu_share(converge_samples)
    result.broker_cpu_share = cpu_share(converge_samples, "broker_cpu")
    return started


def measure(args: argparse.Namespace, url: str, nodes_count: int, work: Path) -> Result:
    result = Result(nodes=nodes_count, engines=args.engines, load_before=loadavg())
    log(f"{nodes_count} nodes, {args.engines} engines (load {result.load_before})")
    run, key, public, nodes, announces = make_fleet(nodes_count, work)
    admin = amqp_connection(url)
    purge(admin, (RULEENGINE_QUEUE.name, REPORTER_QUEUE.name))
    receiver = PlanReceiver(url, nodes)
    engines = start_engines(
        args.engines,
        url,
        args.rules,
        key,
        work,
        args.profile,
        f"{nodes_count}-{run}",
        args.engine_heartbeat,
    )
    sampler: Sampler | None = None
    publisher = ConfirmingPublisher(url)
    try:
        wait_consuming(
            admin, RULEENGINE_QUEUE.name, args.engines, [e.process for e in engines], work
        )
        purge(admin, (RULEENGINE_QUEUE.name, REPORTER_QUEUE.name))
        if not args.cold:
            result.declare_s = round(receiver.declare(), 2)
            log(f"  declared and consuming {nodes_count} plan queues in {result.declare_s} s")
        sampler = Sampler(url, [e.process.pid for e in engines], broker_process())
        sampler.start()
        cpu_before = [cpu_seconds(e.process.pid) for e in engines]
        converge(args, announces, publisher, receiver, sampler, result)
        result.engine_cpu_s = [
            round(cpu_seconds(e.process.pid) - before, 2)
            for e, before in zip(engines, cpu_before, strict=True)
        ]
        log(
            f"  converged in {result.converge_s} s ({result.plans_per_s} plans/s), arrivals "
            f"{result.arrivals}, max depth {result.depth_max}, engine CPU {result.engine_cpu_s} s"
        )
        check_plans(receiver, nodes, public, args.verify, result)
        log(f"  {result.distinct_plans} distinct job sets; {result.verified} signatures verified")
        if args.steady > 0:
            result.steady = steady_state(args, publisher, receiver, sampler, nodes)
            log(f"  steady state: {result.steady}")
        result.engine_hwm_mib = [round(sampler.hwm[e.process.pid] / 2**20, 1) for e in engines]
    finally:
        if sampler is not None:
            sampler.stop()
        receiver.stop()
        publisher.close()
        result.engine_exit = stop_engines(engines)
        receiver.delete_queues(url)
        purge(admin, (REPORTER_QUEUE.name,))
        with contextlib.suppress(Exception):
            admin.close()
    result.load_after = loadavg()
    log(f"  engines: peak RSS {result.engine_hwm_mib} MiB; {result.engine_exit}")
    return result


def check_plans(
    receiver: PlanReceiver, nodes: list[Node], trusted: TrustedKeys, sample: int, result: Result
) -> None:
    """Every plan is for its node; `sample` of them, spread evenly, pass `verify_plan`."""
    step = max(1, len(nodes) // max(1, sample))
    hashes = set()
    for index, body in receiver.bodies.items():
        signed = decode(body)
        node = nodes[index]
        if not isinstance(signed, SignedPlan) or signed.plan.node != node.node:
            raise SystemExit(f"{node.node} got something else than its plan: {body[:200]!r}")
        if index % step == 0:
            verify_plan(signed, trusted, node.node)
            result.verified += 1
        node.plan_hash = signed.plan.content_hash()
        jobs = signed.plan.model_dump(mode="json")["jobs"]
        hashes.add(json.dumps(jobs, sort_keys=True))  # the plan without its node and time
    result.distinct_plans = len(hashes)


def steady_state(
    args: argparse.Namespace,
    publisher: ConfirmingPublisher,
    receiver: PlanReceiver,
    sampler: Sampler,
    nodes: list[Node],
    extra: Callable[[float], list[tuple[bytes, str, str, int]]] | None = None,
    settled: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Each node sends a keepalive with its facts and plan hash every `interval` seconds,
    node i at offset i/N of the interval; sent in 0.1 s ticks with confirms, with what
    `extra(seconds since the start)` adds to each tick. Afterwards, waits up to `--drain`
    seconds until `settled()` (default: `muster.ruleengine` is empty)."""
    settled = settled or (lambda: sampler.samples[-1]["depth"] == 0)
    count = len(nodes)
    templates = []
    for node in nodes:
        message = Keepalive(node=node.node, plan_hash=node.plan_hash, uptime=30.0, facts=node.facts)
        templates.append((encode(message), routing_key(message), message.id))
    plans_before = receiver.deliveries
    started = time.monotonic()
    sent, extras, late = 0, 0, 0.0
    total = int(args.steady / args.interval * count)
    while sent < total:
        now = time.monotonic() - started
        due = min(total, int(now / args.interval * count) + 1)
        batch = extra(now) if extra else []
        extras += len(batch)
        stamp = now_stamp()
        for number in range(sent, due):
            body, key, old_id = templates[number % count]
            new_id = uuid.uuid4().hex
            body = restamp(body.replace(old_id.encode(), new_id.encode(), 1), stamp)
            batch.append((body, key, new_id, 1))
        if batch:
            publisher.publish_batch(batch)
        if due > sent:
            late = max(late, time.monotonic() - started - (due - 1) * args.interval / count)
            sent = due
        time.sleep(0.1)
    ended = time.monotonic()
    while not settled() and time.monotonic() - ended < args.drain:
        time.sleep(0.2)
    drained = time.monotonic()
    samples = window(sampler.samples, started, ended)
    depths = [s["depth"] for s in samples]
    return {
        "keepalives": sent,
        "rate_per_s": round(sent / (ended - started)),
        "other_events": extras,
        "seconds": round(ended - started, 1),
        "depth_max": max(depths, default=0),
        "depth_mean": round(sum(depths) / len(depths), 1) if depths else 0,
        "drain_after_s": round(drained - ended, 1),
        "depth_at_end": sampler.samples[-1]["depth"],
        "consumers_min": min((s["consumers"] for s in samples), default=0),
        "engine_cpu_share": cpu_share(samples),
        "broker_cpu_share": cpu_share(samples, "broker_cpu"),
        "plans_sent": receiver.deliveries - plans_before,
        "publisher_lag_s": round(late, 2),
        "load": loadavg(),
    }


# -- servers and output ------------------------------------------------------------------------


def broker_process() -> int | None:
    path = os.environ.get("MUSTER_TEST_RABBITMQ_PID_FILE")
    if path:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(path).read_text().split()[0])
    return None


# The variable that says a server is already running, for the servers run as they are found.
SERVER_URLS = {"rabbitmq": "MUSTER_TEST_AMQP_URL", "mongo": "MUSTER_TEST_MONGO_URL"}


@contextlib.contextmanager
def services(directory: Path, names: tuple[str, ...] = ("rabbitmq",)) -> Iterator[dict[str, str]]:
    """The `MUSTER_TEST_*` settings of the servers `names` from tests/services: the ones
    in the environment if MUSTER_TEST_AMQP_URL is set (left running), else started in
    `directory` here and stopped at the end. Also exported, so the samplers find pids."""
    if all(os.environ.get(SERVER_URLS.get(name, "-")) for name in names):
        yield dict(os.environ)
        return
    env = {**os.environ, "MUSTER_SERVICES_DIR": str(directory)}
    command = [sys.executable, "-m", "tests.services"]
    started = subprocess.run(
        [*command, "start", *names], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    try:
        if started.returncode:
            raise SystemExit(f"cannot start {', '.join(names)}:\n{started.stderr}")
        values = dict(
            line.removeprefix("export ").split("=", 1)
            for line in started.stdout.splitlines()
            if line.startswith("export ")
        )
        os.environ.update(values)
        yield values
    finally:
        subprocess.run([*command, "stop"], env=env, cwd=REPO_ROOT, capture_output=True)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def render(results: list[Result]) -> str:
    lines = [
        f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| nodes | engines | converged (s) | plans/s | p50 / p90 / p99 (s) | max depth "
        "| engine CPU (s) | RabbitMQ CPU | engine peak RSS (MiB) | load before |",
        "| ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- | --- |",
    ]
    for r in results:
        a = r.arrivals
        lines.append(
            f"| {r.nodes} | {r.engines} | {r.converge_s} | {r.plans_per_s} "
            f"| {a.get('p50')} / {a.get('p90')} / {a.get('p99')} | {r.depth_max} "
            f"| {r.engine_cpu_s} | {r.broker_cpu_share} | {r.engine_hwm_mib} | {r.load_before} |"
        )
    lines += [
        "",
        "| nodes | keepalives/s | depth max / mean / at end | consumers (min) "
        "| engine CPU (share of a core) | RabbitMQ CPU | plans sent | load |",
        "| ---: | ---: | --- | ---: | --- | --- | ---: | --- |",
    ]
    for r in results:
        s = r.steady
        if s:
            lines.append(
                f"| {r.nodes} | {s['rate_per_s']} | {s['depth_max']} / {s['depth_mean']} / "
                f"{s['depth_at_end']} | {s['consumers_min']} "
                f"| {s['engine_cpu_share']} | {s['broker_cpu_share']} | {s['plans_sent']} "
                f"| {s['load']} |"
            )
    return "\n".join(lines)


def fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a simulated fleet, the same in bench.convergence and bench.fleet."""
    parser.add_argument("--nodes", default="1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500, help="announces per confirm batch")
    parser.add_argument("--steady", type=float, default=60, help="seconds of steady state; 0: none")
    parser.add_argument("--interval", type=float, default=20, help="keepalive interval, seconds")
    parser.add_argument("--timeout", type=float, default=300, help="give up converging after")
    parser.add_argument("--verify", type=int, default=500, help="plans to verify_plan")
    parser.add_argument("--rules", type=Path, default=RULES)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--engine-heartbeat",
        type=int,
        help="MUSTER_HEARTBEAT for the engines (0: off) [default: their own, 20 s]",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convergence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fleet_arguments(parser)
    parser.add_argument("--profile", type=Path, help="run the engines under cProfile, into DIR")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="a first boot: declare the plan queues while the announces go out (clock runs)",
    )
    parser.add_argument(
        "--drain", type=float, default=30, help="after the keepalives, wait this long for 0"
    )
    parser.add_argument(
        "--services-dir",
        type=Path,
        default=Path(os.environ.get("MUSTER_SERVICES_DIR", "/tmp/convergence-services")),
    )
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")]
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="muster-convergence-") as tmp,
        services(args.services_dir) as servers,
    ):
        url = servers["MUSTER_TEST_AMQP_URL"]
        for size in sizes:
            results.append(measure(args, url, size, Path(tmp)))
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
