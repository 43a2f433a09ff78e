"""Shared plumbing for the test servers: state dir, ports, processes, readiness waits.

Standard library only: this runs in the project's .venv, while the servers themselves run from
Debian binaries or from their own venvs under .services/ as separate processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_HOME = REPO_ROOT / ".services"
STATE_DIR_VAR = "MUSTER_SERVICES_DIR"
OWNER_VAR = "MUSTER_SERVICES_OWNER"  # marks the processes of one server, see owned_by()
HOST = "127.0.0.1"

# Ports are drawn below the kernel's ephemeral range (32768+ by default), so that a client's
# outgoing connection cannot take a server's port while that server is stopped for a fault test.
PORT_RANGE = (20000, 32000)

# Popen objects of servers started by this process: kept so they can be reaped (and so that
# Python does not warn about child processes it thinks were forgotten).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_PORTS_TAKEN: set[int] = set()
_PORTS_LOCK = threading.Lock()


class ServiceError(RuntimeError):
    """A server failed to start or stop; the message carries the tail of its logs."""


def log(message: str) -> None:
    """Progress goes to stderr: stdout is reserved for the `export` lines."""
    print(f"services: {message}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    """The directory holding PIDs, ports, configs, logs and data of one set of servers."""
    configured = os.environ.get(STATE_DIR_VAR)
    return Path(configured).resolve() if configured else SERVICES_HOME / "run"


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """Free ports on 127.0.0.1, outside the ephemeral range (see PORT_RANGE).

    Servers pick theirs concurrently and do not bind at once, so ports handed out (or loaded)
    in this process are remembered and never handed out twice.
    """
    chosen: list[int] = []
    with _PORTS_LOCK:
        while len(chosen) < count:
            port = random.randint(*PORT_RANGE)
            if port not in _PORTS_TAKEN and port_is_free(port):
                _PORTS_TAKEN.add(port)
                chosen.append(port)
    return chosen


def port_open(port: int) -> bool:
    """True when a TCP connect to 127.0.0.1:port succeeds."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether pid still runs. A zombie counts as gone: PID 1 here reaps orphans slowly."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:  # our own child: poll() reaps it
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    fields = state.split()
    return len(fields) < 2 or fields[1] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid has exited (or is a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def send_signal(pid: int, sig: int) -> None:
    """Signal pid, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to timeout, then SIGKILL: stop one server for good."""
    if not pid_alive(pid):
        return
    send_signal(pid, signal.SIGTERM)
    if not wait_gone(pid, timeout):
        log(f"pid {pid} ignored SIGTERM for {timeout:.0f} s, sending SIGKILL")
        send_signal(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def read_pid(path: Path) -> int | None:
    """The PID stored in path, or None when the file is missing or empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
) -> int:
    """Start a server in its own session (Ctrl-C in the terminal must not reach it)."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [os.fspath(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[process.pid] = process
    return process.pid


def owned_by(pid: int, owner: str) -> bool:
    """Whether pid was started with OWNER_VAR=owner in its environment.

    PID files can outlive their processes (a reboot, a machine handed over as it was); this
    keeps `stop` from signalling an unrelated process that reused the PID. Our own children
    are ours without looking: right after exec their environ can still read as empty.
    """
    if pid in _CHILDREN:
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{OWNER_VAR}={owner}".encode() in environ.split(b"\0")


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(content[-lines:]) or "(empty)"


class Server(ABC):
    """One test server (or a group, like Swift's) managed through files in its own dir.

    Each process has `<proc>.pid` and `<proc>.log` in `self.dir`; ports live in `ports.json`
    so that a stopped server comes back on the same port with the same data.
    """

    name: str
    processes: tuple[str, ...]  # in start order; stopped in reverse order
    port_names: tuple[str, ...]
    after: tuple[str, ...] = ()  # servers that must be ready before this one starts
    start_timeout: float = 60
    stop_timeout: float = 15

    def __init__(self, root: Path) -> None:
        self.dir = root / self.name
        self._ports: dict[str, int] | None = None

    @property
    def ports(self) -> dict[str, int]:
        """Ports chosen on first start and then kept for restarts."""
        if self._ports is None:
            path = self.dir / "ports.json"
            if path.exists():
                self._ports = json.loads(path.read_text())
                with _PORTS_LOCK:
                    _PORTS_TAKEN.update(self._ports.values())
            else:
                ports = pick_ports(len(self.port_names))
                self._ports = dict(zip(self.port_names, ports, strict=True))
                self.dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self._ports))
        return self._ports

    def pid_file(self, process: str) -> Path:
        return self.dir / f"{process}.pid"

    def log_file(self, process: str) -> Path:
        return self.dir / f"{process}.log"

    def pid(self, process: str) -> int | None:
        """The PID of process, if that PID is still one of ours (see owned_by)."""
        pid = read_pid(self.pid_file(process))
        return pid if pid is not None and owned_by(pid, str(self.dir)) else None

    def spawn(self, process: str, argv: Sequence[str | os.PathLike[str]], **env: str) -> None:
        """Start process with its log file and PID file in self.dir, marked as ours."""
        environment = {**os.environ, **env, OWNER_VAR: str(self.dir)}
        pid = spawn(argv, self.log_file(process), environment, self.dir)
        self.pid_file(process).write_text(str(pid))

    def alive(self, process: str) -> bool:
        pid = self.pid(process)
        return pid is not None and pid_alive(pid)

    def running(self) -> bool:
        return all(self.alive(process) for process in self.processes)

    def configured(self) -> bool:
        """True once ports were chosen, i.e. the server was started at least once."""
        return (self.dir / "ports.json").exists()

    def start(self) -> None:
        """Start whatever process is not running, then wait until the server really serves."""
        if self.running():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.start_timeout
        try:
            self.prepare()
            for process in self.processes:
                if not self.alive(process):
                    self.pid_file(process).unlink(missing_ok=True)
                    self.launch(process)
            self.wait_ready(deadline)
        except OSError as error:  # e.g. a binary is missing
            self.stop()
            hint = "(did tests/services/install-system.sh and install-venvs.sh run?)"
            raise ServiceError(f"{self.name}: {error} {hint}\n{self.logs()}") from error
        except BaseException:
            self.stop()
            raise

    def stop(self) -> bool:
        """SIGTERM each process in reverse start order; keeps ports and data for a restart.

        Returns whether any process was still running.
        """
        found = False
        for process in reversed(self.processes):
            pid = self.pid(process)
            if pid is not None:
                found = True
                terminate(pid, self.stop_timeout)
            self.pid_file(process).unlink(missing_ok=True)
        return found

    def kill(self) -> None:
        """SIGKILL the server processes: a crash, as fault tests want it."""
        for process in self.crash_processes():
            pid = self.pid(process)
            if pid is not None:
                send_signal(pid, signal.SIGKILL)
                wait_gone(pid, 10)

    def destroy(self) -> bool:
        """Stop and delete everything: data, configs, logs and the chosen ports."""
        found = self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return found

    def crash_processes(self) -> tuple[str, ...]:
        """Processes that `kill` hits; by default all of them."""
        return self.processes

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Write configs or data needed before launch; optional."""

    def ensure_alive(self, process: str) -> None:
        """Fail fast, with the log, when a process died during startup."""
        if not self.alive(process):
            child = _CHILDREN.get(read_pid(self.pid_file(process)) or 0)
            status = f" (exit status {child.poll()})" if child is not None else ""
            raise ServiceError(
                f"{self.name}: {process} exited during startup{status}\n{self.logs()}"
            )

    def wait_for(
        self,
        check: Callable[[], bool],
        deadline: float,
        what: str,
        watch: tuple[str, ...] | None = None,
    ) -> None:
        """Poll check until true; fail with the logs when a watched process dies or time is up."""
        while not check():
            for process in self.processes if watch is None else watch:
                self.ensure_alive(process)
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name}: timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        """Tails of all log files of this server, for error messages."""
        files = sorted(self.dir.glob("**/*.log")) if self.dir.exists() else []
        return "\n".join(f"--- {path} ---\n{tail(path)}" for path in files) or "(no logs)"

    @abstractmethod
    def launch(self, process: str) -> None:
        """Spawn one process and record its PID in pid_file(process)."""

    @abstractmethod
    def wait_ready(self, deadline: float) -> None:
        """Return once clients can use the server; raise ServiceError otherwise."""

    @abstractmethod
    def env(self) -> dict[str, str]:
        """The MUSTER_TEST_* variables describing this server."""
