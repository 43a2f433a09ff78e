"""The agent daemon's process: `muster agent run` resolves its options and settings, then
replaces itself (exec, same PID) with `python -m agent.daemon_main --settings-fd N`.

Why exec: the daemon lives for months, and every MiB it holds is held on every node of a
fleet (issue #4: under 40 MB idle). Parsing options needs click, the `muster` command's
module table and PyYAML's settings file reading; resolving them leaves garbage behind that
Python never returns to the system. A fresh interpreter that only imports the daemon
(agent.daemon) starts about 1 MiB smaller. The settings travel, resolved and validated, as
JSON in an inherited memory file (memfd): not through the environment, which hooks and
runs inherit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import NoReturn

from agent.daemon import Agent
from agent.hooks import redact
from broker.agent_config import AgentSettings
from broker.errors import ContractError
from muster import LOG_FORMAT

log = logging.getLogger(__name__)

SETTINGS_FD_OPTION = "--settings-fd"
TUNABLES = "GLIBC_TUNABLES"
# glibc gives each thread that allocates its own malloc arena; the daemon's broker and
# worker threads then hold partly used arenas for good, and memory one arena frees the
# others cannot reuse. One arena for all: 0.2-0.3 MiB less after the first run than with
# two (bench.footprint; two were 0.5 MiB less idle than glibc's default). A run's process is
# forked with the same setting; its peak stayed within the spread of runs (75-80 MiB for
# 10,000 small files), and so did a backup's CPU time (bench/dataset.py at scale 0.3, four
# backups each way: median 2.45 s against 2.43 s): the daemon's threads mostly sleep, and a
# backup's spend their time in zstd and hashing, not in malloc.
# Read by glibc when the process starts, hence set for the exec.
ARENA_MAX = "glibc.malloc.arena_max=1"


def exec_daemon(settings: AgentSettings, log_level: int) -> NoReturn:
    """Become the daemon: this process's image is replaced; it keeps its PID, environment
    and standard streams. The settings go in a memory file, which no size can block (a
    pipe nobody reads yet could)."""
    tunables = os.environ.get(TUNABLES)
    payload = json.dumps(
        {
            "log_level": log_level,
            "settings": settings.model_dump(mode="json"),
            "tunables": tunables,  # restored in the daemon: hooks and tools inherit its env
        }
    )
    carrier = os.memfd_create("muster-agent-settings")
    with os.fdopen(carrier, "w", closefd=False) as out:
        out.write(payload)
    os.lseek(carrier, 0, os.SEEK_SET)
    os.set_inheritable(carrier, True)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "agent.daemon_main", SETTINGS_FD_OPTION, str(carrier)]
    chosen = tunables or ""
    if "glibc.malloc.arena_max=" not in chosen:
        chosen = ":".join(filter(None, (chosen, ARENA_MAX)))
    os.execve(sys.executable, argv, {**os.environ, TUNABLES: chosen})


def read_settings(fd: int) -> tuple[AgentSettings, int]:
    """The settings and log level `exec_daemon` wrote to the file `fd` (closed here); the
    environment's GLIBC_TUNABLES is put back as it was before the exec."""
    with os.fdopen(fd) as carrier:
        payload = json.loads(carrier.read())
    if payload["tunables"] is None:
        os.environ.pop(TUNABLES, None)
    else:
        os.environ[TUNABLES] = payload["tunables"]
    return AgentSettings.model_validate(payload["settings"]), payload["log_level"]


def serve(settings: AgentSettings) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit status. Start-up errors are printed the
    way `muster` prints them: 1 for an unusable state directory, 2 for bad settings."""
    try:
        agent = Agent(settings, isolated_runs=True)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"Error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except ContractError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s received: stopping at the next safe point", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.warning(
        "agent %s started: broker %s, state %s, %d trusted key(s)",
        settings.node,
        redact(settings.broker_url),
        settings.state_dir,
        len(settings.trusted_keys),
    )
    status = agent.run()
    log.warning("agent %s stopped", settings.node)
    return status


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != SETTINGS_FD_OPTION or not argv[1].isdigit():
        print(f"usage: python -m agent.daemon_main {SETTINGS_FD_OPTION} N", file=sys.stderr)
        print("(started by `muster agent run`, which resolves the settings)", file=sys.stderr)
        return 2
    settings, log_level = read_settings(int(argv[1]))
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
