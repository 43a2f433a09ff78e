"""An embedded MongoDB-protocol server for `muster up --embedded`: SecantusDB as a child.

No mongod installs on Debian, and the reporter must write to a real MongoDB-protocol
server, not a mock: SecantusDB (PyPI, its own venv because it pins its own pymongo) runs
as a child process on a free loopback port, in memory, and is stopped with its parent,
also when the parent fails. `make deps` installs it in `.services/venv-secantus`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from pymongo import MongoClient
from pymongo.errors import PyMongoError

EXECUTABLE = "secantusd-py"
ENV_VAR = "MUSTER_SECANTUSD"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class MongoUnavailable(RuntimeError):
    """The embedded server cannot be found or does not start; the message says what to do."""


def find_secantusd(given: Path | None = None) -> Path:
    """The server: the given path, else $MUSTER_SECANTUSD, else the project's own venv
    (`make deps`), else the PATH."""
    configured = given or (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise MongoUnavailable(f"{configured} is not an executable secantusd-py")
    project = Path(__file__).resolve().parents[1] / ".services" / "venv-secantus" / "bin"
    candidates = [project / EXECUTABLE, shutil.which(EXECUTABLE)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise MongoUnavailable(
        f"no {EXECUTABLE} (SecantusDB, the embedded MongoDB-protocol server) in "
        f"{project} or on the PATH: run `make run` (or `make deps`) in the source tree, "
        f"or name it with --secantusd PATH or {ENV_VAR}"
    )


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class EmbeddedMongo:
    """`with EmbeddedMongo(path, log) as mongo:` a running server at `mongo.url`, stopped
    (SIGTERM, then SIGKILL) on leaving the block, whatever happened inside."""

    def __init__(self, executable: Path, log_file: Path) -> None:
        self.executable = executable
        self.log_file = log_file
        self.port = free_port()
        self.url = f"mongodb://{HOST}:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmbeddedMongo:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        argv = [str(self.executable), "--host", HOST, "--port", str(self.port)]
        argv += ["--storage-path", ":memory:", "--log-level", "WARNING"]
        with self.log_file.open("ab") as log:
            # Its own session: a Ctrl-C on the terminal reaches `muster up`, which stops
            # the server after the reporter wrote its last batch, not before.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        client: MongoClient = MongoClient(self.url, serverSelectionTimeoutMS=500)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise MongoUnavailable(
                        f"{self.executable} exited with {self.process.returncode}; "
                        f"see {self.log_file}"
                    )
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    time.sleep(0.1)
        finally:
            client.close()
        raise MongoUnavailable(f"{self.executable} not ready in {START_TIMEOUT:.0f} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
