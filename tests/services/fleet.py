"""The set of test servers as one unit: start concurrently, stop, kill, and their environment."""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .common import STATE_DIR_VAR, Server, ServiceError, log, state_dir
from .keystone import Keystone
from .mongo import Mongo
from .rabbitmq import RabbitMQ
from .swift import Swift

SERVER_CLASSES: dict[str, type[Server]] = {
    "rabbitmq": RabbitMQ,
    "mongo": Mongo,
    "swift": Swift,
    "keystone": Keystone,
}

# What a test needs to reach the servers; a test run may set them to point at other servers.
CLIENT_VARS = (
    "MUSTER_TEST_AMQP_URL",
    "MUSTER_TEST_MONGO_URL",
    "MUSTER_TEST_SWIFT_AUTH_URL",
    "MUSTER_TEST_SWIFT_USER",
    "MUSTER_TEST_SWIFT_KEY",
    "MUSTER_TEST_S3_ENDPOINT",
    "MUSTER_TEST_S3_ACCESS_KEY",
    "MUSTER_TEST_S3_SECRET_KEY",
    "MUSTER_TEST_S3_REGION",
    "MUSTER_TEST_KEYSTONE_AUTH_URL",
    "MUSTER_TEST_KEYSTONE_USER",
    "MUSTER_TEST_KEYSTONE_PASSWORD",
    "MUSTER_TEST_KEYSTONE_PROJECT",
    "MUSTER_TEST_KEYSTONE_REGION",
)


@dataclass(frozen=True)
class SwiftCredentials:
    """What python-swiftclient needs for tempauth (v1) authentication."""

    auth_url: str
    user: str
    key: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SwiftCredentials:
        return cls(
            env["MUSTER_TEST_SWIFT_AUTH_URL"],
            env["MUSTER_TEST_SWIFT_USER"],
            env["MUSTER_TEST_SWIFT_KEY"],
        )


@dataclass(frozen=True)
class S3Credentials:
    """What an S3 client needs; Swift's s3api wants path-style addressing."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Credentials:
        return cls(
            env["MUSTER_TEST_S3_ENDPOINT"],
            env["MUSTER_TEST_S3_ACCESS_KEY"],
            env["MUSTER_TEST_S3_SECRET_KEY"],
            env["MUSTER_TEST_S3_REGION"],
        )


@dataclass(frozen=True)
class KeystoneCredentials:
    """A Keystone v3 user whose project's object-store endpoint is a Keystone-trusting proxy."""

    auth_url: str
    user: str
    password: str
    project: str
    region: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeystoneCredentials:
        return cls(
            env["MUSTER_TEST_KEYSTONE_AUTH_URL"],
            env["MUSTER_TEST_KEYSTONE_USER"],
            env["MUSTER_TEST_KEYSTONE_PASSWORD"],
            env["MUSTER_TEST_KEYSTONE_PROJECT"],
            env["MUSTER_TEST_KEYSTONE_REGION"],
        )

    def os_env(self) -> dict[str, str]:
        """The OS_* variables an OpenStack user sources from an openrc file."""
        return {
            "OS_AUTH_URL": self.auth_url,
            "OS_USERNAME": self.user,
            "OS_PASSWORD": self.password,
            "OS_PROJECT_NAME": self.project,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": self.region,
        }


def timed(action: Callable[[], object]) -> tuple[object, float]:
    """What action returned, and the seconds it took."""
    began = time.monotonic()
    result = action()
    return result, time.monotonic() - began


class Fleet:
    """All test servers sharing one state dir (default .services/run, or MUSTER_SERVICES_DIR)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()).resolve()
        self.servers = {name: cls(self.root) for name, cls in SERVER_CLASSES.items()}

    def select(self, names: Iterable[str] = ()) -> list[Server]:
        """The named servers, or all of them when no name is given."""
        names = list(names) or list(self.servers)
        unknown = sorted(set(names) - set(self.servers))
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {sorted(self.servers)}")
        return [self.servers[name] for name in names]

    def running(self) -> list[str]:
        return [name for name, server in self.servers.items() if server.running()]

    def start(self, names: Iterable[str] = ()) -> list[str]:
        """Start the servers that are not running, concurrently; returns the names started.

        A server whose `after` servers are being started too waits for them (Keystone's proxy
        needs Swift's ports); a named server brings those along. When one fails, the others
        started by this call are stopped again and a ServiceError with the failing server's
        log tail is raised.
        """
        selected = self.select(names)
        for server in selected:  # grows while it is read: the dependencies' own come too
            selected += [self.servers[n] for n in server.after if self.servers[n] not in selected]
        todo = [server for server in selected if not server.running()]
        self.root.mkdir(parents=True, exist_ok=True)
        for server in self.servers.values():
            if server.configured():
                _ = server.ports  # loading them reserves them: no other server may pick them
        started: list[str] = []
        try:
            while todo:
                waiting = {server.name for server in todo}
                wave = [server for server in todo if not waiting & set(server.after)]
                if not wave:
                    raise ServiceError(f"servers waiting for each other: {sorted(waiting)}")
                started += self._start_together(wave)
                todo = [server for server in todo if server not in wave]
        except ServiceError:
            if started:
                self.stop(started)
            raise
        self.write_env()
        return started

    def _start_together(self, servers: list[Server]) -> list[str]:
        """Start servers concurrently; on a failure stop the others and raise."""
        if not servers:
            return []
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = {server.name: pool.submit(timed, server.start) for server in servers}
        errors = [name for name, future in futures.items() if future.exception() is not None]
        if errors:
            if started := [name for name in futures if name not in errors]:
                self.stop(started)
            raise ServiceError("\n".join(str(futures[name].exception()) for name in errors))
        for name, future in futures.items():
            log(f"{name} ready in {future.result()[1]:.1f} s")
        return list(futures)

    def stop(self, names: Iterable[str] = ()) -> None:
        """Stop servers. Named ones keep port and data for a restart; a full stop deletes all."""
        names = list(names)
        servers = self.select(names)
        action = (lambda s: s.stop) if names else (lambda s: s.destroy)
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = {s.name: pool.submit(timed, action(s)) for s in servers if s.dir.exists()}
        for name, future in futures.items():
            found, seconds = future.result()
            if found:
                log(f"{name} stopped in {seconds:.1f} s")
        if not names:
            (self.root / "env").unlink(missing_ok=True)
            if self.root.exists() and not any(self.root.iterdir()):
                self.root.rmdir()

    @contextlib.contextmanager
    def session(self) -> Iterator[dict[str, str]]:
        """Start all servers for a while; on exit stop those started here.

        If everything was started here, everything is stopped and deleted; servers that were
        already running (say, from `make services`) are left alone.
        """
        already = self.running()
        try:
            self.start()
            yield self.env()
        finally:
            if not already:
                self.stop()
            elif started := [name for name in self.servers if name not in already]:
                self.stop(started)

    def kill(self, names: Iterable[str]) -> None:
        """SIGKILL the named servers (a crash); `start` brings them back on the same ports."""
        for server in self.select(names):
            server.kill()
            log(f"{server.name} killed")

    def env(self) -> dict[str, str]:
        """MUSTER_TEST_* of every server started at least once, plus the state dir."""
        env = {STATE_DIR_VAR: str(self.root)}
        for server in self.servers.values():
            if server.configured():
                env.update(server.env())
        return env

    def write_env(self) -> Path:
        """Write root/env, sourceable by a shell."""
        path = self.root / "env"
        path.write_text(export_lines(self.env()))
        return path

    def rabbitmqctl(self, *args: str) -> str:
        """rabbitmqctl against the test node, e.g. ("close_all_connections", "test")."""
        server = self.servers["rabbitmq"]
        assert isinstance(server, RabbitMQ)
        return server.ctl(*args)


def export_lines(env: Mapping[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


@dataclass
class ServiceSet:
    """What the pytest fixtures hand to tests: the servers' env, and control for fault tests.

    `fleet` is None when the MUSTER_TEST_* variables point at servers this run did not start
    and no MUSTER_SERVICES_DIR says where their state is; controlling them then fails loudly.
    """

    env: dict[str, str]
    fleet: Fleet | None = None

    def _control(self) -> Fleet:
        if self.fleet is None:
            raise ServiceError(
                f"these servers are not controllable: set {STATE_DIR_VAR} to the state dir "
                "of `python -m tests.services start`, or unset the MUSTER_TEST_* variables"
            )
        return self.fleet

    def stop(self, name: str) -> None:
        """Stop one server (SIGTERM); port and data stay for `start`."""
        self._control().stop([name])

    def start(self, name: str) -> None:
        """Start one server again on the same port with the same data; no-op when running."""
        self._control().start([name])

    def kill(self, name: str) -> None:
        """SIGKILL one server, as in a crash."""
        self._control().kill([name])

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def rabbitmqctl(self, *args: str) -> str:
        """e.g. services.rabbitmqctl("close_all_connections", "fault test")."""
        return self._control().rabbitmqctl(*args)
