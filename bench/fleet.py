"""Fleet simulation: a booting fleet, then its steady state, through every central process.

    python -m bench.fleet --nodes 1000,10000 [--engines 2] [--steady 60]
                          [--interval 20] [--runs-per-hour 1] [--drain 120]
                          [--logs DIR] [--json FILE]

What bench.convergence measures (N simulated agents announcing at once against the real
RabbitMQ and `--engines` real `muster ruleengine run` processes; see its docstring for
the simulated fleet and how plans are received and checked), with a real `muster
reporter run` process writing to the real MongoDB-protocol server (SecantusDB), both from
tests/services (started here in a private state directory and stopped at the end, or the
ones named by MUSTER_TEST_AMQP_URL and MUSTER_TEST_MONGO_URL, left running). Each fleet
size gets a database of its own. The reporter runs with its defaults (batches of 1,000,
w majority, a journaled barrier per batch, the watchdog every 10 s), its /metrics on a
free loopback port; its fleet metrics are cached for the whole run so that scraping its
counters every 0.5 s does not read MongoDB.

1. Boot: every node announces at once; converged = every node holds its plan. The
   reporter gets the same announces meanwhile (its queue is bound to them).
2. Steady state, `--steady` seconds: every node sends a keepalive with its facts every
   `--interval` seconds (spread evenly), and runs a backup `--runs-per-hour` times an
   hour (spread evenly over the fleet): three run_status messages and a run_result,
   sent together when the run is due (built by bench.ingest's fleet events).
3. Drain: wait until the reporter has written every event published (`--drain` at most).

Reported: convergence time; events/s written by the reporter during the boot and during
the steady state against the rate offered (its `muster_reporter_messages_total`
counters); the depth of `muster.ruleengine`, `muster.reporter` and `muster.dead` every
0.5 s (max and last); CPU share and RSS (peak, and at the end) of each engine, the
reporter, RabbitMQ and SecantusDB (peak: VmHWM for the processes started here, the
largest sample for the servers, which outlive a run). Every message carries the time it
is sent: the reporter dates a node's last sign of life by it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import convergence as conv
from bench.ingest import node_event
from broker.codec import encode
from broker.topology import DEAD_QUEUE, PERSISTENT_TYPES, REPORTER_QUEUE, RULEENGINE_QUEUE
from broker.topology import routing_key as key_of
from muster.mongo import free_port

QUEUES = (RULEENGINE_QUEUE.name, REPORTER_QUEUE.name, DEAD_QUEUE.name)
WRITTEN = re.compile(rb'^muster_reporter_messages_total\{type="[a-z_]+"\} ([0-9.e+]+)$', re.M)
RUN_STEPS = (6, 7, 8, 9)  # bench.ingest's cycle: three run_status, then the run_result


# -- the reporter process --------------------------------------------------------------------


@dataclass
class ReporterProcess:
    """A real `muster reporter run`, and its counters of messages written."""

    process: subprocess.Popen[bytes]
    log: Path
    metrics: str

    @classmethod
    def start(cls, url: str, mongo_url: str, database: str, work: Path) -> ReporterProcess:
        port = free_port()
        env = {
            **os.environ,
            "MUSTER_LOG_LEVEL": os.environ.get("MUSTER_LOG_LEVEL", "warning"),
            "MUSTER_METRICS_CACHE": "86400",  # fleet metrics read once, from an empty database
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("MUSTER_CONFIG", None)
        command = [
            *(sys.executable, "-m", "muster", "reporter", "run"),
            *("--broker-url", url, "--mongo-url", mongo_url, "--database", database),
            *("--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
        ]
        log = work / f"reporter-{database}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=conv.REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return cls(process, log, f"http://127.0.0.1:{port}/metrics")

    def written(self) -> int | None:
        """Messages the reporter has written and acknowledged; None while it cannot say."""
        try:
            with urllib.request.urlopen(self.metrics, timeout=2) as response:
                text = response.read()
        except OSError:
            return None
        return int(sum(float(value) for value in WRITTEN.findall(text)))

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        text = self.log.read_text(errors="replace")
        lines = text.strip().splitlines()
        return f"{lines[-1] if lines else ''} ({text.count(' ERROR ')} errors)"


# -- run events ------------------------------------------------------------------------------


class Runs:
    """Backup runs of the fleet, `per_hour` per node, spread evenly: `due(seconds)` gives
    the messages of the runs that started since the last call (persistent or not, as an
    agent sends them)."""

    def __init__(self, nodes: list[conv.Node], per_hour: float) -> None:
        self.nodes = nodes
        self.rate = len(nodes) * per_hour / 3600
        self.started = 0

    def due(self, seconds: float) -> list[tuple[bytes, str, str, int]]:
        target = int(seconds * self.rate)
        items = []
        for number in range(self.started, target):
            index = number % len(self.nodes)
            cycle = 1 + number // len(self.nodes)  # never 0: bench.ingest alerts on cycle 0
            moment = datetime.now(UTC)
            for step in RUN_STEPS:
                for message in node_event(self.nodes[index].node, index, cycle, step, moment):
                    mode = 2 if message.type in PERSISTENT_TYPES else 1
                    items.append((encode(message), key_of(message), message.id, mode))
        self.started = max(self.started, target)
        return items


# -- one measurement ---------------------------------------------------------------------------


@dataclass
class FleetResult(conv.Result):
    reporter: dict[str, Any] = field(default_factory=dict)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    processes: dict[str, dict[str, float]] = field(default_factory=dict)


def rate(samples: list[dict[str, Any]]) -> float:
    """Messages written per second by the reporter over `samples`."""
    points = [(s["t"], s["probe"]) for s in samples if s.get("probe") is not None]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return 0.0
    return round((points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]), 1)


def written_by(samples: list[dict[str, Any]], count: int) -> float | None:
    """When (monotonic) the reporter's count first reached `count`."""
    return next((s["t"] for s in samples if (s.get("probe") or 0) >= count), None)


def summarise_queues(samples: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        queue: {
            "max": max(s["depths"][queue] for s in samples),
            "last": samples[-1]["depths"][queue],
        }
        for queue in QUEUES
    }


def summarise_processes(
    sampler: conv.Sampler, names: dict[int, str], started: float
) -> dict[str, dict[str, float]]:
    """Per central process: CPU share of a core over the run, RSS peak and at the end."""
    samples = conv.window(sampler.samples, started, float("inf"))
    shares = conv.cpu_share(samples)
    out = {}
    for position, pid in enumerate(sampler.pids):
        sampled_peak = max(s["rss"][position] for s in samples)
        out[names[pid]] = {
            "cpu_share": shares[position] if shares else 0.0,
            # VmHWM is since the process started: for the servers, which outlive a run,
            # the peak of the 0.5 s samples is the one that belongs to this run.
            "peak_mib": round(max(sampler.hwm[pid], sampled_peak) / 2**20, 1)
            if names[pid] not in SERVERS
            else round(sampled_peak / 2**20, 1),
            "end_mib": round(samples[-1]["rss"][position] / 2**20, 1),
        }
    return out


SERVERS = ("rabbitmq", "secantusdb")


def server_pids() -> dict[int, str]:
    found = {}
    for variable, name in (
        ("MUSTER_TEST_RABBITMQ_PID_FILE", "rabbitmq"),
        ("MUSTER_TEST_MONGO_PID_FILE", "secantusdb"),
    ):
        with contextlib.suppress(OSError, ValueError):
            found[int(Path(os.environ.get(variable, "")).read_text().split()[0])] = name
    return found


def boot_and_steady(
    args: argparse.Namespace,
    url: str,
    fleet: tuple,
    reporter: ReporterProcess,
    engines: list[conv.Engine],
    result: FleetResult,
) -> None:
    _, _, public, nodes, announces = fleet
    receiver = conv.PlanReceiver(url, nodes)
    publisher = conv.ConfirmingPublisher(url)
    names = {e.process.pid: f"engine {n}" for n, e in enumerate(engines)}
    names |= {reporter.process.pid: "reporter", **server_pids()}
    sampler = conv.Sampler(url, list(names), conv.broker_process(), QUEUES, probe=reporter.written)
    try:
        result.declare_s = round(receiver.declare(), 2)
        conv.log(f"  declared and consuming {len(nodes)} plan queues in {result.declare_s} s")
        baseline = reporter.written() or 0
        sampler.start()
        before = [conv.cpu_seconds(e.process.pid) for e in engines]
        started = conv.converge(args, announces, publisher, receiver, sampler, result)
        result.engine_cpu_s = [
            round(conv.cpu_seconds(e.process.pid) - cpu, 2)
            for e, cpu in zip(engines, before, strict=True)
        ]
        result.engine_cpu_share = result.engine_cpu_share[: len(engines)]
        conv.log(f"  converged in {result.converge_s} s, arrivals {result.arrivals}")
        conv.check_plans(receiver, nodes, public, args.verify, result)
        boot_end = wait_written(sampler, baseline + len(nodes), args.drain)
        boot = conv.window(sampler.samples, started, boot_end)
        result.reporter["boot_written_s"] = round(boot_end - started, 2)
        result.reporter["boot_events_per_s"] = round(len(nodes) / (boot_end - started), 1)
        result.reporter["boot_rate_sampled"] = rate(boot)

        def expected() -> int:  # every event published is bound to muster.reporter
            return baseline + publisher.sent

        steady(args, publisher, receiver, sampler, reporter, expected, result)
        result.queues = summarise_queues(conv.window(sampler.samples, started, float("inf")))
        result.processes = summarise_processes(sampler, names, started)
        peaks = {name: figures["peak_mib"] for name, figures in result.processes.items()}
        result.engine_hwm_mib = [peaks[names[e.process.pid]] for e in engines]
    finally:
        sampler.stop()
        receiver.stop()
        publisher.close()
        receiver.delete_queues(url)


def steady(
    args: argparse.Namespace,
    publisher: conv.ConfirmingPublisher,
    receiver: conv.PlanReceiver,
    sampler: conv.Sampler,
    reporter: ReporterProcess,
    expected: Callable[[], int],
    result: FleetResult,
) -> None:
    """Keepalives and backup runs for `--steady` seconds, then until the reporter wrote
    every event (`expected()` of them); fills `result.steady` and the reporter's rates."""
    runs = Runs(receiver.nodes, args.runs_per_hour)
    started = time.monotonic()
    result.steady = conv.steady_state(
        args,
        publisher,
        receiver,
        sampler,
        receiver.nodes,
        extra=runs.due,
        settled=lambda: (sampler.samples[-1].get("probe") or 0) >= expected(),
    )
    figures = result.steady
    samples = conv.window(sampler.samples, started, started + figures["seconds"])
    offered = (figures["keepalives"] + figures["other_events"]) / figures["seconds"]
    result.reporter["steady_offered_per_s"] = round(offered, 1)
    result.reporter["steady_written_per_s"] = rate(samples)
    result.reporter["steady_queue_max"] = max(s["depths"][REPORTER_QUEUE.name] for s in samples)
    result.reporter["caught_up_after_s"] = figures["drain_after_s"]
    result.reporter["unwritten_at_end"] = expected() - (reporter.written() or 0)


def wait_written(sampler: conv.Sampler, count: int, timeout: float) -> float:
    """The time the reporter's written count reached `count` (or now, after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        when = written_by(sampler.samples, count)
        if when is not None:
            return when
        time.sleep(0.2)
    return time.monotonic()


def measure(
    args: argparse.Namespace, servers: dict[str, str], size: int, work: Path
) -> FleetResult:
    url, mongo_url = servers["MUSTER_TEST_AMQP_URL"], servers["MUSTER_TEST_MONGO_URL"]
    result = FleetResult(nodes=size, engines=args.engines, load_before=conv.loadavg())
    conv.log(f"{size} nodes, {args.engines} engines, 1 reporter (load {result.load_before})")
    fleet = conv.make_fleet(size, work)
    run, key = fleet[0], fleet[1]
    admin = conv.amqp_connection(url)
    conv.purge(admin, QUEUES)
    engines = conv.start_engines(
        args.engines, url, args.rules, key, work, None, f"{size}-{run}", args.engine_heartbeat
    )
    reporter = ReporterProcess.start(url, mongo_url, f"fleet_{size}_{run}", work)
    try:
        processes = [e.process for e in engines]
        conv.wait_consuming(admin, RULEENGINE_QUEUE.name, args.engines, processes, work)
        conv.wait_consuming(admin, REPORTER_QUEUE.name, 1, [reporter.process], work)
        deadline = time.monotonic() + 60
        while reporter.written() is None:  # it serves /metrics once it consumes
            if time.monotonic() > deadline or reporter.process.poll() is not None:
                raise SystemExit(f"the reporter serves no /metrics; see {reporter.log}")
            time.sleep(0.2)
        conv.purge(admin, QUEUES)
        boot_and_steady(args, url, fleet, reporter, engines, result)
    finally:
        result.engine_exit = conv.stop_engines(engines)
        result.reporter["exit"] = reporter.stop()
        conv.purge(admin, QUEUES)
        with contextlib.suppress(Exception):
            admin.close()
    result.load_after = conv.loadavg()
    conv.log(f"  {json.dumps({k: v for k, v in asdict(result).items() if k != 'depth_series'})}")
    return result


# -- output ----------------------------------------------------------------------------------


def render(results: list[FleetResult]) -> str:
    lines = [
        "| nodes | converged (s) | p50 / p99 (s) | engine CPU (s) | reporter: boot announces/s "
        "| steady offered / written (events/s) | caught up after (s) | load before / after |",
        "| ---: | ---: | --- | --- | ---: | --- | ---: | --- |",
    ]
    for r in results:
        rep = r.reporter
        lines.append(
            f"| {r.nodes} | {r.converge_s} | {r.arrivals.get('p50')} / {r.arrivals.get('p99')} "
            f"| {r.engine_cpu_s} "
            f"| {rep.get('boot_events_per_s')} | {rep.get('steady_offered_per_s')} / "
            f"{rep.get('steady_written_per_s')} | {rep.get('caught_up_after_s')} "
            f"| {r.load_before} / {r.load_after} |"
        )
    lines += ["", "| nodes | queue | max depth | last depth |", "| ---: | --- | ---: | ---: |"]
    for r in results:
        for queue, depth in r.queues.items():
            lines.append(f"| {r.nodes} | `{queue}` | {depth['max']} | {depth['last']} |")
    lines += [
        "",
        "| nodes | process | CPU (share of a core) | peak RSS (MiB) | RSS at end (MiB) |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        for name, figures in r.processes.items():
            lines.append(
                f"| {r.nodes} | {name} | {figures['cpu_share']} | {figures['peak_mib']} "
                f"| {figures['end_mib']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.fleet_arguments(parser)
    parser.add_argument("--runs-per-hour", type=float, default=1, help="backups per node")
    parser.add_argument("--drain", type=float, default=120, help="wait for the reporter at most")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    parser.add_argument(
        "--services-dir",
        type=Path,
        default=Path(os.environ.get("MUSTER_SERVICES_DIR", "/tmp/fleet-services")),
    )
    args = parser.parse_args(argv)
    args.cold = False
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="muster-fleet-") as tmp,
        conv.services(args.services_dir, ("rabbitmq", "mongo")) as servers,
    ):
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in (int(n) for n in args.nodes.split(",")):
            results.append(measure(args, servers, size, work))
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
