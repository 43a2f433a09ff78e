"""Command line: python -m tests.services {start|stop|kill|status|env|run -- CMD...}.

stdout carries only `export NAME=value` lines (so `eval "$(python -m tests.services start)"`
works); progress and server logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from types import FrameType

from .common import ServiceError, log
from .fleet import Fleet, export_lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.services", description=__doc__)
    commands = parser.add_subparsers(dest="action", required=True)
    names = {
        "nargs": "*",
        "metavar": "NAME",
        "help": "rabbitmq, mongo, swift or keystone (default: all)",
    }
    commands.add_parser("start", help="start servers, print their env").add_argument(
        "names", **names
    )
    commands.add_parser("stop", help="stop servers (all: also delete data)").add_argument(
        "names", **names
    )
    commands.add_parser("kill", help="SIGKILL servers, as in a crash").add_argument(
        "names", nargs="+", metavar="NAME"
    )
    commands.add_parser("status", help="which servers run")
    commands.add_parser("env", help="print the env of started servers")
    run = commands.add_parser("run", help="start all, run CMD with the env, stop all")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    return parser.parse_args(argv)


def start(fleet: Fleet, names: list[str]) -> int:
    try:
        fleet.start(names)
    except ServiceError as error:
        log(f"start failed:\n{error}")
        return 1
    print(export_lines(fleet.env()), end="")
    return 0


def status(fleet: Fleet) -> int:
    running = fleet.running()
    for name in fleet.servers:
        print(f"{name}: {'running' if name in running else 'stopped'}")
    return 0 if len(running) == len(fleet.servers) else 3


class Interrupts:
    """Records SIGINT/SIGTERM instead of raising, so servers are never left half-started.

    Ctrl-C reaches the child directly (same process group); SIGTERM, as from a CI timeout,
    is passed on to it. Either way the servers are stopped once the child has exited.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.child is not None and signum == signal.SIGTERM:
            self.child.terminate()


def run(fleet: Fleet, command: list[str]) -> int:
    """Start what is not running, run command with the env, then stop what this call started."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        log("run: no command given")
        return 2
    interrupts = Interrupts()
    try:
        with fleet.session() as env:
            if interrupts.received is not None:
                return 128 + interrupts.received
            interrupts.child = subprocess.Popen(command, env={**os.environ, **env})
            code = interrupts.child.wait()
            return 128 - code if code < 0 else code
    except ServiceError as error:
        log(f"start failed:\n{error}")
        return 1


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    fleet = Fleet()
    if args.action == "start":
        return start(fleet, args.names)
    if args.action == "stop":
        fleet.stop(args.names)
        return 0
    if args.action == "kill":
        fleet.kill(args.names)
        return 0
    if args.action == "status":
        return status(fleet)
    if args.action == "env":
        print(export_lines(fleet.env()), end="")
        return 0
    return run(fleet, args.command)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as error:
        log(str(error))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
