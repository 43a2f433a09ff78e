"""Muster's processes driven as real subprocesses, and what watches them on the wire.

Shared by the daemon test and the fleet tests: `Daemon` runs `muster agent run`, `Central` a
`muster ruleengine run` or `muster reporter run`, `Listener` keeps every event it saw in a
durable queue of its own (so a broker crash loses none of them), `wait_for` waits on a
condition instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kombu import Connection, Queue

from broker.codec import decode
from broker.connection import body_bytes
from broker.errors import InvalidMessage
from broker.messages import Message
from broker.topology import EVENTS

MUSTER = Path(sys.executable).parent / "muster"
# Storage credentials of the outer environment never reach a process under test.
STORAGE_FAMILIES = ("OS_", "ST_", "AWS_")


def wait_for(
    condition: Callable[[], Any], timeout: float = 30, what: str | Callable[[], str] = ""
) -> Any:
    """Poll `condition` until it returns something true, and return that; a timeout fails
    the test with `what` (a callable is asked only then, so it can describe the state)."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.1)


def clean_environ() -> dict[str, str]:
    """This process's environment without storage credentials."""
    return {n: v for n, v in os.environ.items() if not n.startswith(STORAGE_FAMILIES)}


class Listener:
    """A durable queue of our own bound to every event (so it outlives a broker restart),
    read with basic.get; keeps every message of one node (of every node when `node` is
    None), with its raw body."""

    def __init__(self, amqp_url: str, node: str | None = None) -> None:
        self.url = amqp_url
        self.node = node
        self.queue = Queue(
            f"muster.test.{uuid.uuid4().hex[:12]}",
            exchange=EVENTS,
            routing_key="#",
            durable=True,
            auto_delete=False,
        )
        self.messages: list[Message] = []
        self.bodies: list[bytes] = []
        self._connection: Connection | None = None
        self._poll()

    def _poll(self) -> None:
        try:
            if self._connection is None:
                self._connection = Connection(self.url, connect_timeout=3)
                self._connection.connect()
            bound = self.queue(self._connection.default_channel)
            bound.declare()
            while (delivery := bound.get(no_ack=True)) is not None:
                body = body_bytes(delivery)
                try:
                    message = decode(body)
                except InvalidMessage:  # junk a fault test injected: not an event
                    continue
                if self.node is None or getattr(message, "node", None) == self.node:
                    self.messages.append(message)
                    self.bodies.append(body)
        except OSError:  # the broker is down, or just came back: reconnect next time
            self.close_connection()

    def close_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
            self._connection = None

    def of(self, cls: type, /, **fields: Any) -> list:
        self._poll()
        return [
            m
            for m in self.messages
            if isinstance(m, cls) and all(getattr(m, k) == v for k, v in fields.items())
        ]

    def wait(self, cls: type, /, timeout: float = 30, count: int = 1, **fields: Any) -> list:
        def what() -> str:
            return f"{count} {cls.__name__} {fields or ''} from {self.node}; got {self.summary()}"

        def enough() -> list:
            found = self.of(cls, **fields)
            return found if len(found) >= count else []

        return wait_for(enough, timeout, what)

    def summary(self) -> str:
        return ", ".join(
            f"{m.type}({getattr(m, 'status', None) or getattr(m, 'bytes_done', '')})"
            for m in self.messages[-50:]
        )

    def delete(self) -> None:
        self.close_connection()
        with Connection(self.url, connect_timeout=5) as connection:
            self.queue(connection.default_channel).delete()


class Process:
    """One `muster ...` command in a subprocess, its output in a log file per start."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.args = args
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> Process:
        log = self.tmp_path / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(MUSTER), "--log-level", "info", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, and the exit status: 0 when the process shut down in order."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash); also how a test leaves nothing behind."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    @property
    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs if path.exists())


class Daemon(Process):
    """`muster agent run`, configured by environment only."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str = "daemon") -> None:
        super().__init__(tmp_path, name, ["agent", "run"], env)

    @property
    def state(self) -> Path:
        return Path(self.env["MUSTER_STATE_DIR"])

    def spooled(self, kind: str = "run_result") -> list[str]:
        """Ids of the messages waiting in the spool."""
        folder = self.state / "spool"
        found = folder.glob(f"*-{kind}-*.json") if folder.exists() else []
        # not `.tmp-...` files: a message being spooled right now, under another name
        names = sorted(p.name for p in found if not p.name.startswith("."))
        return [name.removesuffix(".json").split("-", 2)[2] for name in names]


def agent_env(
    directory: Path, amqp_url: str, node: str, trusted_key: Path, labels: str, **extra: str
) -> dict[str, str]:
    """A node's agent settings, all by environment: its own state dir, no cloud metadata,
    short intervals so a test sees keepalives and progress within a second."""
    return {
        **clean_environ(),
        "MUSTER_CONFIG": str(directory / "absent.yaml"),
        "MUSTER_BROKER_URL": amqp_url,
        "MUSTER_NODE": node,
        "MUSTER_STATE_DIR": str(directory / "state"),
        "MUSTER_TRUSTED_KEYS": str(trusted_key),
        "MUSTER_LABELS": labels,
        "MUSTER_METADATA_URL": "",
        "MUSTER_CLOUD_INIT_PATH": str(directory / "no-instance-data.json"),
        "MUSTER_CONFIG_DRIVE_PATH": str(directory / "no-config-drive"),
        "MUSTER_KEEPALIVE_INTERVAL": "1",
        "MUSTER_STATUS_INTERVAL": "0.2",
        "MUSTER_RECONNECT_MAX": "1",
        **extra,
    }


def central_env(amqp_url: str, directory: Path, values: Mapping[str, str]) -> dict[str, str]:
    """Settings of a rule engine or reporter, all by environment."""
    return {
        **clean_environ(),
        "MUSTER_CONFIG": str(directory / "absent.yaml"),
        "MUSTER_BROKER_URL": amqp_url,
        **values,
    }
