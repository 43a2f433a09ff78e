"""A whole Muster fleet on the real servers, for the end-to-end and fault tests.

One rule engine and one reporter (`muster ruleengine run`, `muster reporter run`) and any
number of agents (`muster agent run`), each a real subprocess with its own state directory,
facts (labels) and sample data; a `Listener` that keeps every event on the wire; the
reporter's MongoDB database, so a test can count what reached it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from kombu import Connection
from pymongo import MongoClient
from pymongo.database import Database

from broker.connection import connect
from broker.signing import generate_signing_key, public_pem
from broker.topology import DEAD_QUEUE, REPORTER_QUEUE, RULEENGINE_QUEUE, declare
from tests.processes import Daemon, Listener, Process, agent_env, central_env, wait_for

# The reporter writes small batches at once, and its watchdog looks often: the tests wait
# on MongoDB, so it should follow the wire closely.
REPORTER_SETTINGS = {
    "MUSTER_BATCH_SIZE": "50",
    "MUSTER_FLUSH_INTERVAL": "0.2",
    "MUSTER_METRICS_PORT": "0",
    "MUSTER_WATCHDOG_INTERVAL": "2",
}


class FleetRun:
    """The central processes of one test module, and the agents its tests start."""

    def __init__(self, root: Path, amqp_url: str, mongo_url: str) -> None:
        self.root = root
        self.amqp_url = amqp_url
        self.tag = uuid.uuid4().hex[:8]  # in labels and names: this run's nodes only
        self.key = generate_signing_key(root / "signing.pem")
        self.public_key = root / "signing.pem.pub"
        self.public_key.write_bytes(public_pem(self.key.public_key()))
        self.rules = root / "rules.yaml"
        self.database = f"test_fleet_{self.tag}"
        self.mongo = MongoClient(mongo_url, serverSelectionTimeoutMS=20000)
        with connect([amqp_url]) as connection:
            declare(connection)
            for queue in (RULEENGINE_QUEUE, REPORTER_QUEUE, DEAD_QUEUE):
                queue(connection.default_channel).purge()  # what earlier tests left
        self.listener = Listener(amqp_url)
        engine_args = ["ruleengine", "run", "--rules", str(self.rules)]
        engine_args += ["--signing-key", str(root / "signing.pem")]
        self.engine = Process(
            root,
            "ruleengine",
            engine_args,
            central_env(amqp_url, root, {"MUSTER_RELOAD_INTERVAL": "0.3"}),
        )
        reporter_values = {
            "MUSTER_MONGO_URL": mongo_url,
            "MUSTER_DATABASE": self.database,
            **REPORTER_SETTINGS,
        }
        self.reporter_env = central_env(amqp_url, root, reporter_values)
        self.reporter = Process(root, "reporter", ["reporter", "run"], dict(self.reporter_env))
        self.agents: list[Daemon] = []

    def write_rules(self, text: str) -> None:
        """Replace the rules file the way a deployment should: atomically."""
        temporary = self.rules.with_name("rules.yaml.new")
        temporary.write_text(text)
        temporary.rename(self.rules)

    def start(self) -> FleetRun:
        self.engine.start()
        self.reporter.start()
        for process in (self.engine, self.reporter):
            consuming(process)
        return self

    def recover(self) -> None:
        """Start the rule engine or reporter again (as configured first) if it is down."""
        if not self.reporter.running:
            self.reporter.env = dict(self.reporter_env)
        for process in (self.engine, self.reporter):
            if not process.running:
                consuming(process.start())

    def node(self, role: str) -> str:
        return f"{role}-{self.tag}-{len(self.agents)}"

    def agent(self, role: str, **extra: str) -> Daemon:
        """Start an agent for a new node with the labels fleet=<tag>, role=<role>."""
        node = self.node(role)
        directory = self.root / node
        directory.mkdir()
        labels = f"fleet={self.tag},role={role}"
        env = agent_env(directory, self.amqp_url, node, self.public_key, labels, **extra)
        daemon = Daemon(directory, env, node)
        self.agents.append(daemon)
        return daemon.start()

    @property
    def db(self) -> Database:
        return self.mongo[self.database]

    def runs(self, node: str, **query: Any) -> list[dict[str, Any]]:
        return list(self.db.runs.find({"node": node, **query}))

    def logs(self) -> str:
        processes = [self.engine, self.reporter, *self.agents]
        return "\n".join(f"=== {p.name}\n{p.log[-6000:]}" for p in processes)

    def close(self) -> None:
        for daemon in self.agents:
            daemon.kill()
        for process in (self.engine, self.reporter):
            if process.running:
                try:
                    process.stop(20)
                except Exception:
                    process.kill()
        self.listener.delete()
        self.mongo.drop_database(self.database)
        self.mongo.close()


def consuming(process: Process) -> None:
    """Wait until the rule engine or reporter started last consumes its queue (and so
    handles signals): its newest log says so."""
    wait_for(
        lambda: "consuming" in process.logs[-1].read_text(errors="replace"),
        30,
        lambda: f"{process.name} to consume\n{process.log[-3000:]}",
    )


def connection(amqp_url: str) -> Connection:
    """A connection on the declared topology, for tests that publish or read directly."""
    opened = connect([amqp_url])
    declare(opened)
    return opened
