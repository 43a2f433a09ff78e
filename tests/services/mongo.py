"""SecantusDB: a MongoDB wire-protocol server from PyPI, since no mongod installs on this machine.

It runs from its own venv (.services/venv-secantus, it pins its own pymongo). It presents as a
single-node replica set, so change streams and transactions work. Point MUSTER_TEST_MONGO_URL at
a real mongod to run the same tests against one.
"""

from __future__ import annotations

import socket
import struct

from .common import HOST, SERVICES_HOME, Server

SECANTUSD = SERVICES_HOME / "venv-secantus" / "bin" / "secantusd-py"
OP_MSG = 2013


def hello_message(request_id: int = 1) -> bytes:
    """An OP_MSG carrying {hello: 1, $db: "admin"}, BSON-encoded by hand (no pymongo here)."""
    body = (
        b"\x10hello\x00"
        + struct.pack("<i", 1)
        + b"\x02$db\x00"
        + struct.pack("<i", len(b"admin\x00"))
        + b"admin\x00"
    )
    document = struct.pack("<i", len(body) + 5) + body + b"\x00"
    payload = struct.pack("<I", 0) + b"\x00" + document  # flagBits, section kind 0
    header = struct.pack("<iiii", 16 + len(payload), request_id, 0, OP_MSG)
    return header + payload


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    """Read size bytes or raise ConnectionError."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def hello_ok(port: int) -> bool:
    """True when the server answers hello with ok: 1.0 (it accepts commands, not just TCP)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(hello_message())
            length = struct.unpack("<i", receive_exactly(sock, 4))[0]
            reply = receive_exactly(sock, length - 4)
    except OSError:
        return False
    opcode = struct.unpack("<i", reply[8:12])[0]
    return opcode == OP_MSG and b"\x01ok\x00" + struct.pack("<d", 1.0) in reply


class Mongo(Server):
    """secantusd-py with an explicit storage path, so it survives a stop (or a SIGKILL)."""

    name = "mongo"
    processes = ("secantusd",)
    port_names = ("mongo",)
    start_timeout = 60
    stop_timeout = 15

    def prepare(self) -> None:
        # An explicit (empty) config disables the search of ./, ~/.secantus/ and /etc/secantus/.
        (self.dir / "secantusd.toml").write_text("")

    def launch(self, process: str) -> None:
        argv = [
            SECANTUSD,
            "--config",
            self.dir / "secantusd.toml",
            "--host",
            HOST,
            "--port",
            str(self.ports["mongo"]),
            "--storage-path",
            self.dir / "data",
            "--log-level",
            "WARNING",
        ]
        self.spawn(process, argv)

    def wait_ready(self, deadline: float) -> None:
        self.wait_for(lambda: hello_ok(self.ports["mongo"]), deadline, "a hello reply")

    def env(self) -> dict[str, str]:
        return {
            "MUSTER_TEST_MONGO_URL": f"mongodb://{HOST}:{self.ports['mongo']}/",
            "MUSTER_TEST_MONGO_PID_FILE": str(self.pid_file("secantusd")),
        }
