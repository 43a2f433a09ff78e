"""RabbitMQ from the Debian package, isolated in the state dir with its own epmd.

The node is started through /usr/lib/rabbitmq/bin/rabbitmq-server, not the /usr/sbin wrappers:
those switch user and Erlang cookie, after which the CLI cannot authenticate to the node.
"""

from __future__ import annotations

import os
import secrets
import string
import subprocess
import time

from .common import HOST, Server, ServiceError, port_open, terminate

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"
NODE = "muster@localhost"
LOOPBACK_ONLY = "-kernel inet_dist_use_interface {127,0,0,1}"


class RabbitMQ(Server):
    """One RabbitMQ node plus the epmd it registers with.

    The wrapper script (`server`) forks the Erlang VM (`beam`) and waits for it; the VM writes
    its own PID to beam.pid. A crash is simulated by SIGKILLing both; epmd stays up.
    """

    name = "rabbitmq"
    processes = ("epmd", "server")
    port_names = ("amqp", "dist", "epmd")
    start_timeout = 90
    stop_timeout = 30

    def node_env(self) -> dict[str, str]:
        """Variables shared by the node and rabbitmqctl, so both find cookie and epmd."""
        return {
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.dir / "home"),
            "ERL_EPMD_PORT": str(self.ports["epmd"]),
            "ERL_EPMD_ADDRESS": HOST,
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.ports["amqp"]),
            "RABBITMQ_DIST_PORT": str(self.ports["dist"]),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file("beam")),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_ONLY,
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_ONLY,
        }

    def prepare(self) -> None:
        """Config, empty plugin list and a fixed cookie (the CLI must never race to make one)."""
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
            cookie.chmod(0o400)
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {HOST}:{self.ports['amqp']}\nloopback_users = none\n"
        )

    def launch(self, process: str) -> None:
        if process == "epmd":
            argv = ["epmd", "-address", HOST, "-port", str(self.ports["epmd"])]
            self.spawn("epmd", argv, **self.node_env())
            # Our epmd must listen before the node starts, or Erlang spawns one on all interfaces.
            deadline = time.monotonic() + 10
            self.wait_for(lambda: port_open(self.ports["epmd"]), deadline, "epmd", ("epmd",))
            return
        self.pid_file("beam").unlink(missing_ok=True)
        argv = [f"{RABBITMQ_BIN}/rabbitmq-server"]
        self.spawn("server", argv, **self.node_env())

    def wait_ready(self, deadline: float) -> None:
        """`rabbitmqctl wait` returns once the rabbit application has fully booted."""
        timeout = str(int(deadline - time.monotonic()))
        command = ["wait", str(self.pid_file("beam")), "--timeout", timeout]
        waiter = self.ctl_process(*command)
        try:
            self.wait_for(lambda: waiter.poll() is not None, deadline, "rabbitmqctl wait")
        finally:
            if waiter.poll() is None:
                waiter.kill()
            output = waiter.communicate()[0]
        if waiter.returncode != 0:
            raise ServiceError(f"rabbitmq: rabbitmqctl wait failed:\n{output}\n{self.logs()}")
        self.wait_for(lambda: port_open(self.ports["amqp"]), deadline, "the AMQP port")

    def ctl_process(self, *args: str) -> subprocess.Popen[str]:
        """rabbitmqctl against this node, with the node's cookie and epmd."""
        return subprocess.Popen(
            [f"{RABBITMQ_BIN}/rabbitmqctl", "-n", NODE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.node_env()},
            text=True,
        )

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run rabbitmqctl (e.g. `close_all_connections why`) and return its output."""
        process = self.ctl_process(*args)
        output = process.communicate(timeout=timeout)[0]
        if process.returncode != 0:
            raise ServiceError(f"rabbitmqctl {' '.join(args)} failed:\n{output}")
        return output

    def stop(self) -> bool:
        """SIGTERM the VM itself first (graceful, about 1 s); then the wrapper and epmd."""
        pid = self.pid("beam")
        if pid is not None:
            terminate(pid, self.stop_timeout)
        self.pid_file("beam").unlink(missing_ok=True)
        return super().stop() or pid is not None

    def crash_processes(self) -> tuple[str, ...]:
        return ("beam", "server")

    def env(self) -> dict[str, str]:
        return {
            "MUSTER_TEST_AMQP_URL": f"amqp://guest:guest@{HOST}:{self.ports['amqp']}//",
            "MUSTER_TEST_RABBITMQ_PID_FILE": str(self.pid_file("beam")),
        }
