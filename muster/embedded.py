"""`muster up --embedded`: the whole system in one process, with no server to install.

Everything is the real code on a stand-in for the servers: kombu's in-memory transport
for RabbitMQ (so every component is a thread of this process), SecantusDB in memory for
MongoDB (a child process, see muster.mongo), a local directory for Swift. The rule engine
reads a rules file written from `embedded-rules.yaml`; each simulated node runs the real
agent daemon (its broker and worker threads, its scheduler, its spool) with facts, data
and a state directory of its own (muster.sample). The demo then shows what a user does:

1. nodes announce, plans arrive, backups run with progress, restore tests pass;
2. the fleet table fills (`muster status`);
3. a file is deleted on a node and brought back by `muster restore`, run as a user
   would run it on that node (a subprocess; the node's stored plan gives every default);
4. the same file restored with age, zstd and tar alone (docs/RESTORE-WITHOUT-MUSTER.md);
5. the fleet report (`muster report`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import click
from kombu import Consumer

from agent.daemon import Agent
from broker.agent_config import AgentSettings
from broker.codec import parse_json
from broker.connection import body_bytes, connect
from broker.errors import InvalidMessage
from broker.messages import Facts
from broker.signing import generate_signing_key, public_pem
from broker.topology import tail_queue
from broker.up_config import UpSettings
from muster.central import Central
from muster.mongo import EmbeddedMongo, find_secantusd
from muster.sample import NODES, RESTORED_FILE, SimulatedNode, generate
from reporter.cli import describe, render_report, render_status
from reporter.queries import fleet_status, report

BROKER_URL = "memory://"
RULES_TEMPLATE = "embedded-rules.yaml"
STORAGE_PREFIX = "demo"  # as in embedded-rules.yaml
KEEPALIVE_INTERVAL = 5
HEALTHY_TIMEOUT = 120.0
STANDARD_TOOLS = ("age", "zstd", "tar", "bash")
SHOWN_EVENTS = ["announce.#", "run_status.#", "run_result.#", "alert.#"]


class DemoFailed(click.ClickException):
    """A step of the demo did not do what it must; exit 1 with what went wrong."""


def say(text: str) -> None:
    click.echo(f"{datetime.now().strftime('%H:%M:%S')} {text}")


def step(title: str) -> None:
    click.echo("")
    click.secho(f"== {title}", bold=True)


# -- the work directory ----------------------------------------------------------------


@dataclass(frozen=True)
class Workdir:
    """Everything of one run: rules, keys, the nodes' data and state, the storage."""

    path: Path

    @property
    def rules(self) -> Path:
        return self.path / "rules.yaml"

    @property
    def signing_key(self) -> Path:
        return self.path / "signing.pem"

    @property
    def public_key(self) -> Path:
        return self.path / "signing.pub"

    @property
    def storage(self) -> Path:
        return self.path / "storage"

    def prepare(self) -> dict[str, dict[str, bytes]]:
        """Write the rules, the signing key pair and every node's data; returns the
        files written per node. A kept work directory (--workdir) keeps its signing key,
        the nodes' identities, plans and schedules, and the backups: a second run goes on
        where the first stopped."""
        self.path.mkdir(parents=True, exist_ok=True)
        template = resources.files("muster").joinpath(RULES_TEMPLATE).read_text()
        self.rules.write_text(Template(template).substitute(workdir=self.path))
        if not self.signing_key.exists():
            key = generate_signing_key(self.signing_key)
            self.public_key.write_bytes(public_pem(key.public_key()))
        self.storage.mkdir(exist_ok=True)
        return {node.node: generate(node, self.path) for node in NODES}


# -- simulated nodes -------------------------------------------------------------------


class SimulatedAgent(Agent):
    """The real agent daemon, with the host name of the node it simulates: every node of
    the demo shares this machine, whose own name would give them all the same facts."""

    def __init__(self, settings: AgentSettings, simulated: SimulatedNode) -> None:
        self.simulated = simulated
        super().__init__(settings)

    def facts(self, refresh: bool = False) -> Facts:
        facts = super().facts(refresh)
        name = self.simulated.hostname
        return facts.model_copy(update={"hostname": name, "fqdn": name})


def agent_settings(node: SimulatedNode, workdir: Workdir) -> AgentSettings:
    return AgentSettings(
        broker_url=BROKER_URL,
        node=node.node,
        labels=node.labels,
        state_dir=node.state_dir(workdir.path),
        trusted_keys=[workdir.public_key],
        keepalive_interval=KEEPALIVE_INTERVAL,
        metadata_url=None,  # no metadata service: the config drive file says it all
        cloud_init_path=workdir.path / "no-cloud-init",
        config_drive_path=node.config_drive(workdir.path),
        status_interval=0.2,
        stop_timeout=5,
    )


@contextmanager
def running_agents(workdir: Workdir) -> Iterator[list[SimulatedAgent]]:
    agents: list[SimulatedAgent] = []
    try:
        for node in NODES:
            agent = SimulatedAgent(agent_settings(node, workdir), node)
            agent.start()
            agents.append(agent)
        yield agents
    finally:
        for agent in agents:
            agent.stop()
        for agent in agents:
            agent.shutdown()


# -- watching ----------------------------------------------------------------------------


@contextmanager
def printed_events(broker_url: str) -> Iterator[None]:
    """Print announces, progress, results and alerts as they pass through the broker,
    in `muster status --follow`'s words."""
    stop = threading.Event()

    def show(delivery: Any) -> None:
        try:
            click.echo(describe(parse_json(body_bytes(delivery))))
        except InvalidMessage as error:  # shown, not judged: the consumers dead-letter it
            say(f"an unreadable message on {delivery.delivery_info.get('routing_key')}: {error}")

    ready = threading.Event()

    def follow() -> None:
        with connect([broker_url]) as connection:
            queue = tail_queue(SHOWN_EVENTS)
            with Consumer(connection.channel(), queues=[queue], on_message=show, no_ack=True):
                ready.set()
                while not stop.is_set():
                    with suppress(TimeoutError):
                        connection.drain_events(timeout=0.2)

    thread = threading.Thread(target=follow, name="muster-events", daemon=True)
    thread.start()
    ready.wait(10)  # bound before the nodes start, so that no announce goes unseen
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def healthy(nodes: list[dict[str, Any]], expected: int) -> bool:
    """`expected` nodes have jobs, each with a successful backup and a successful
    restore test (`fleet_status` entries)."""

    def tested(job: dict[str, Any]) -> bool:
        verify = job.get("last_restore_test")
        return bool(job.get("last_success")) and bool(verify) and verify["status"] == "success"

    return sum(bool(node["jobs"]) and all(map(tested, node["jobs"])) for node in nodes) >= expected


def report_plans(agents: list[SimulatedAgent], seen: dict[str, str]) -> None:
    """Say which nodes accepted a plan since the last call (`seen`: node -> plan hash)."""
    for agent in agents:
        plan = agent.plans.plan
        if plan is not None and plan.content_hash() != seen.get(agent.node):
            seen[agent.node] = plan.content_hash()
            jobs = ", ".join(f"{job.name} ({', '.join(job.sources.paths)})" for job in plan.jobs)
            say(f"{agent.node} accepted its signed plan {plan.content_hash()[:19]}: {jobs}")


def wait_healthy(central: Central, agents: list[SimulatedAgent]) -> None:
    """Say when each node gets its plan, show the fleet table once all have one; return
    once the reporter has every node's backup and restore test in MongoDB."""
    assert central.store is not None
    seen: dict[str, str] = {}
    shown = False
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while time.monotonic() < deadline:
        report_plans(agents, seen)
        nodes = fleet_status(central.store)
        if healthy(nodes, len(agents)):
            return
        if not shown and len(seen) == len(agents) and len(nodes) == len(agents):
            shown = True
            say("every node holds its plan; the fleet table (muster status) so far:")
            render_status(nodes, datetime.now(UTC))
        time.sleep(0.2)
    raise DemoFailed(
        f"the fleet was not healthy within {HEALTHY_TIMEOUT:.0f} s; see the lines above"
    )


# -- restoring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreCase:
    """The file the demo deletes and brings back, and where it lives."""

    node: SimulatedNode
    job: str
    path: Path
    content: bytes
    workdir: Workdir

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir(self.workdir.path)

    @property
    def repo(self) -> Path:
        return self.workdir.storage / STORAGE_PREFIX / self.node.node / self.job


def run_shown(argv: list[str], env: dict[str, str], shown: str) -> subprocess.CompletedProcess:
    click.secho(f"$ {shown}", fg="cyan")
    result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        click.echo(f"  {line}")
    return result


def muster_restore(case: RestoreCase) -> str:
    """Delete the file, bring it back with `muster restore` on the node; returns the
    snapshot it came from."""
    say(f"deleting {case.path} on {case.node.node}")
    case.path.unlink()
    env = {"MUSTER_STATE_DIR": str(case.state_dir)}
    shown = f"MUSTER_STATE_DIR={shlex.quote(str(case.state_dir))} muster restore {case.path}"
    argv = [sys.executable, "-m", "muster", "restore", str(case.path)]
    result = run_shown(argv, env, shown)
    if result.returncode != 0:
        raise DemoFailed(f"muster restore exited with {result.returncode}")
    check_content(case.path, case.content, "muster restore")
    found = re.search(rf"{re.escape(str(case.path))}\s+from (\S+) ", result.stdout)
    if found is None:
        raise DemoFailed("muster restore did not say which snapshot it restored from")
    return found.group(1)


def check_content(path: Path, expected: bytes, how: str) -> None:
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DemoFailed(f"{how}: {path} is not there: {error.strerror}") from None
    if content != expected:
        raise DemoFailed(f"{how}: {path} differs from the original")
    click.secho(f"✓ {path} restored by {how}, identical to the original", fg="green")


def standard_tools_script(case: RestoreCase, snapshot: str, dest: Path) -> str:
    """The commands of docs/RESTORE-WITHOUT-MUSTER.md (steps 3 and 4, without jq) for
    this file, with its values filled in."""
    values = {
        "KEY": case.state_dir / "identity.txt",
        "REPO": case.repo,
        "SNAP": snapshot,
        "FILE": case.path,
        "DEST": dest,
    }
    lines = [f"{name}={shlex.quote(str(value))}" for name, value in values.items()]
    lines += [
        'mkdir -p "$DEST" && cd "$DEST/.."',
        'age -d -i "$KEY" "$REPO/catalogs/$SNAP.jsonl.zst.age" | zstd -d > catalog.jsonl',
        'VOL=$(grep -a -F "\\"path\\": \\"$FILE\\", " catalog.jsonl '
        '| grep -o \'"volume": "[^"]*"\' | cut -d \'"\' -f 4)',
        'age -d -i "$KEY" "$REPO/$VOL" | zstd -d | tar -x -p -f - -C "$DEST" "${FILE#/}"',
    ]
    return "\n".join(lines) + "\n"


def standard_tools_restore(case: RestoreCase, snapshot: str) -> None:
    dest = case.workdir.path / "without-muster" / "restored"
    script = standard_tools_script(case, snapshot, dest)
    click.echo("The same file without Muster, with age, zstd and tar (bash):")
    for line in script.splitlines():
        click.secho(f"  {line}", fg="cyan")
    missing = [tool for tool in STANDARD_TOOLS if shutil.which(tool) is None]
    if missing:
        say(f"not running them: {', '.join(missing)} not installed (apt install age zstd)")
        return
    shutil.rmtree(dest, ignore_errors=True)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True)
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip()
        raise DemoFailed(f"the standard-tools restore failed ({result.returncode}): {error}")
    check_content(dest / case.path.relative_to("/"), case.content, "age, zstd and tar")


# -- the run -------------------------------------------------------------------------------


def central_settings(workdir: Workdir, mongo_url: str) -> UpSettings:
    return UpSettings(
        broker_url=BROKER_URL,
        rules=workdir.rules,
        signing_key=workdir.signing_key,
        reload_interval=1.0,
        mongo_url=mongo_url,
        flush_interval=0.2,
        watchdog_interval=2.0,
        metrics_port=0,
    )


def quieter_logs() -> None:
    """At the default level, leave the telling to the demo: it says what the agents would
    warn about (a new identity, a new plan), and kombu's warning that `memory://` names
    no host is no news. Errors still show."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("agent.daemon", "kombu.connection"):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_embedded(
    workdir: Path, secantusd: Path | None, keep_running: bool, wait: Callable[[], None]
) -> None:
    """The demo, start to end; raises DemoFailed (or MongoUnavailable) when a step fails.
    `wait` blocks until the user stops a --keep-running fleet."""
    executable = find_secantusd(secantusd)
    quieter_logs()
    work = Workdir(workdir)
    step(f"Muster, embedded: one process, work directory {work.path}")
    written = work.prepare()
    say(f"rules {work.rules}; {len(NODES)} simulated nodes: {', '.join(n.node for n in NODES)}")
    started = datetime.now(UTC) - timedelta(seconds=1)
    with ExitStack() as stack:
        mongo = stack.enter_context(EmbeddedMongo(executable, work.path / "secantusd.log"))
        say(f"MongoDB-protocol server (SecantusDB) on {mongo.url}, in memory")
        central = Central(central_settings(work, mongo.url))
        stack.callback(central.stop)
        central.start()
        say("rule engine and reporter consuming on the in-memory broker")
        step("Nodes announce, plans arrive, backups and restore tests run")
        stack.enter_context(printed_events(BROKER_URL))
        agents = stack.enter_context(running_agents(work))
        wait_healthy(central, agents)
        assert central.store is not None
        step("The fleet (muster status)")
        render_status(fleet_status(central.store), datetime.now(UTC))
        step("A file is lost on a node, and comes back")
        node = NODES[0]
        agent = next(a for a in agents if a.node == node.node)
        job = agent.plans.plan.jobs[0].name  # type: ignore[union-attr]
        case = RestoreCase(
            node,
            job,
            node.data_dir(work.path) / RESTORED_FILE,
            written[node.node][RESTORED_FILE],
            work,
        )
        snapshot = muster_restore(case)
        standard_tools_restore(case, snapshot)
        step("The fleet report (muster report)")
        render_report(report(central.store, started))
        if keep_running:
            step("The fleet keeps running; Ctrl-C stops it")
            say(f"from another terminal: muster status --mongo-url {mongo.url}")
            wait()
    click.secho("muster up --embedded: every step passed", fg="green", bold=True)
