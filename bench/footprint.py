"""The agent's memory: idle, and while it backs up, and whether that grows with file count.

    python -m bench.footprint [--idle 60] [--scale 1.0] [--small 10000,100000,300000]
                              [--work DIR] [--json FILE]

Against the real RabbitMQ from tests/services (started here in a private state directory
and stopped at the end, or the one named by MUSTER_TEST_AMQP_URL, left running), one real
`muster ruleengine run` and real `muster agent run` daemons (each with its own state
directory and node id, `trusted_keys` pinned, the metadata service disabled). VmRSS of
the agent, and of its children, is read from /proc every 0.2 s: the daemon runs each
backup in a forked child process (agent.daemon_run).

- idle: the agent gets a plan whose one job runs at 02:15 (not during the measurement),
  stores it, then sits connected to the broker sending keepalives; RSS after `--idle` s;
- backup: a fresh agent gets a plan whose job runs every 60 s (splay 0, restore tests
  off) over a dataset into a local-directory target; it runs at the next minute. From
  start until the snapshot record is written: the daemon's peak RSS (samples and VmHWM),
  the largest VmHWM of its descendants (the run process and the backup's worker
  processes), and the peak PSS of the whole tree (forked processes share pages: the sum
  of their RSS would count those several times); then the daemon's RSS
  `AFTER_RUN` s later, idle again after its first run. Datasets: `bench/dataset.py` at
  `--scale` (1.0 is about 1 GiB), and `--small` trees of that many small files (0 to
  2 KiB, 100 per directory), to see whether memory grows with the number of files.

Everything lives under `--work` (default /dev/shm when it has room: on this machine's
virtual disk I/O timings vary 10x) and is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.convergence import REPO_ROOT, loadavg, log, proc_status, services
from bench.dataset import generate
from broker.signing import generate_signing_key, public_pem

RULES = """\
defaults:
  storage: {{kind: local, path: {repo}, prefix: bench}}
  restore_test: {{enabled: false}}
  retention: {{keep_last: 3}}
rules:
  - name: footprint
    match: all
    jobs:
      data:
        sources: {{paths: [{data}]}}
        schedule: {schedule}
"""
IDLE_SCHEDULE = '{cron: "15 2 * * *", splay: 0}'
BACKUP_SCHEDULE = "{every: 60, splay: 0}"
AFTER_RUN = 10  # seconds after the snapshot record until the daemon's RSS is read again


def small_tree(root: Path, count: int, seed: int = 7) -> int:
    """`count` files of 0 to 2 KiB, 100 per directory; returns their total size."""
    rng = random.Random(seed)
    total = 0
    for index in range(count):
        folder = root / f"d{index // 10000:02d}" / f"d{index // 100 % 100:02d}"
        if index % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        size = rng.randint(0, 2048)
        (folder / f"f{index:06d}.conf").write_bytes(rng.randbytes(size // 2).hex().encode())
        total += size
    return total


def children(pid: int) -> list[int]:
    """The direct children of a process, whichever of its threads started them (the
    agent's worker thread starts the run processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Children, their children and so on: a run forks the backup's worker processes."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among their sharers."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class Watch:
    """VmRSS of one process and of its descendants (the agent's runs and their backup
    workers) every 0.2 s, on a thread. `samples` are the daemon's own VmRSS, `totals` the
    PSS of the whole tree: forked processes share pages, which RSS would count twice."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.totals: list[int] = []
        self.hwm = 0
        self.child_hwm = 0  # the largest VmHWM seen of any one descendant
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            status = proc_status(self.pid)
            if status["VmRSS"]:
                total = pss(self.pid)
                for child in descendants(self.pid):
                    total += pss(child)
                    self.child_hwm = max(self.child_hwm, proc_status(child)["VmHWM"])
                self.samples.append((time.monotonic() - started, status["VmRSS"]))
                self.totals.append(total)
                self.hwm = max(self.hwm, status["VmHWM"])
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


class Bench:
    def __init__(self, args: argparse.Namespace, url: str) -> None:
        self.args = args
        self.url = url
        self.work: Path = args.work
        self.key = self.work / "signing.pem"
        self.public = self.work / "signing.pub"
        self.public.write_bytes(public_pem(generate_signing_key(self.key).public_key()))
        self.rules = self.work / "rules.yaml"
        self.repo = self.work / "repo"
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log_name: str, **env: str) -> subprocess.Popen[bytes]:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        environment.pop("MUSTER_CONFIG", None)
        with (self.work / log_name).open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "muster", *argv],
                cwd=REPO_ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def engine(self, data: Path, schedule: str) -> subprocess.Popen[bytes]:
        self.rules.write_text(RULES.format(repo=self.repo, data=data, schedule=schedule))
        return self.spawn(
            ["ruleengine", "run", "--rules", str(self.rules), "--signing-key", str(self.key)],
            "engine.log",
            MUSTER_BROKER_URL=self.url,
        )

    def agent(self, node: str) -> tuple[subprocess.Popen[bytes], Path]:
        state = self.work / f"state-{node}"
        state.mkdir()
        process = self.spawn(
            ["--log-level", "info", "agent", "run"],
            f"agent-{node}.log",
            MUSTER_BROKER_URL=self.url,
            MUSTER_NODE=node,
            MUSTER_STATE_DIR=str(state),
            MUSTER_TRUSTED_KEYS=str(self.public),
            MUSTER_METADATA_URL="",
            MUSTER_CLOUD_INIT_PATH=str(self.work / "no-cloud-init.json"),
            MUSTER_CONFIG_DRIVE_PATH=str(self.work / "no-config-drive"),
        )
        return process, state

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def wait_for(self, what: str, check: Any, timeout: float, process: Any) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if process.poll() is not None:
                raise SystemExit(f"the agent exited while waiting for {what}; see {self.work}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.work}")
            time.sleep(0.2)

    def idle(self) -> dict[str, Any]:
        empty = self.work / "empty"
        empty.mkdir()
        engine = self.engine(empty, IDLE_SCHEDULE)
        load = loadavg()
        agent, state = self.agent("footprint-idle")
        watch = Watch(agent.pid)
        try:
            self.wait_for("a plan", (state / "plan.json").exists, 60, agent)
            got_plan = watch.samples[-1][0] if watch.samples else 0.0
            time.sleep(self.args.idle)
            rss = proc_status(agent.pid)
        finally:
            watch.stop()
            self.stop(agent)
            self.stop(engine)
        row = {
            "phase": "idle",
            "plan_after_s": round(got_plan, 1),
            "seconds": self.args.idle,
            "rss_mib": mib(rss["VmRSS"]),
            "hwm_mib": mib(max(watch.hwm, rss["VmHWM"])),
            "load": load,
        }
        log(f"idle: {row}")
        return row

    def backup(self, label: str, data: Path, files: int, size: int) -> dict[str, Any]:
        engine = self.engine(data, BACKUP_SCHEDULE)
        load = loadavg()
        node = f"footprint-{label}"
        agent, _ = self.agent(node)
        watch = Watch(agent.pid)
        snapshots = self.repo / "bench" / node / "data" / "snapshots"
        try:
            self.wait_for("a snapshot", lambda: any(snapshots.glob("*.json")), 400, agent)
            finished = watch.samples[-1][0] if watch.samples else 0.0
            time.sleep(AFTER_RUN)  # the run's process reports and exits, retention runs
            after = proc_status(agent.pid)["VmRSS"]
        finally:
            watch.stop()
            self.stop(agent)
            self.stop(engine)
        before = [rss for t, rss in watch.samples if t < 5]
        row = {
            "phase": "backup",
            "dataset": label,
            "files": files,
            "bytes": size,
            "snapshot_after_s": round(finished, 1),
            "rss_before_mib": mib(max(before, default=0)),
            "daemon_peak_mib": mib(watch.peak),
            "daemon_hwm_mib": mib(watch.hwm),
            "run_hwm_mib": mib(watch.child_hwm),
            "total_pss_peak_mib": mib(max(watch.totals, default=0)),
            "daemon_after_mib": mib(after),
            "load": load,
            "load_after": loadavg(),
        }
        log(f"backup {label}: {row}")
        shutil.rmtree(self.repo / "bench" / node, ignore_errors=True)
        return row


def mib(value: int) -> float:
    return round(value / 2**20, 1)


def tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                stat = os.lstat(os.path.join(folder, name))
                files += 1
                size += stat.st_size
    return files, size


def default_work() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 * (1 << 30):
        return shm / "muster-footprint"
    return Path("/tmp/muster-footprint")


@contextlib.contextmanager
def workdir(path: Path) -> Iterator[Path]:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.footprint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--idle", type=float, default=60, help="idle seconds after the plan")
    parser.add_argument("--scale", type=float, default=1.0, help="bench/dataset.py scale; 0: none")
    parser.add_argument("--small", default="10000,100000,300000", help="small-file tree sizes")
    parser.add_argument("--work", type=Path, default=default_work())
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--services-dir",
        type=Path,
        default=Path(os.environ.get("MUSTER_SERVICES_DIR", "/tmp/convergence-services")),
    )
    parser.add_argument("--keep", action="store_true", help="keep --work (logs) at the end")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")

    with services(args.services_dir) as env, workdir(args.work):
        bench = Bench(args, env["MUSTER_TEST_AMQP_URL"])
        try:
            rows.append(bench.idle())
            save()
            sets: list[tuple[str, Path]] = []
            for count in filter(None, (int(n) for n in args.small.split(","))):
                root = args.work / f"small-{count}"
                started = time.monotonic()
                small_tree(root, count)
                log(f"{count} small files in {time.monotonic() - started:.1f} s")
                sets.append((f"{count}-small", root))
            if args.scale > 0:
                root = args.work / "dataset"
                started = time.monotonic()
                generate(root, args.scale)
                log(f"dataset scale {args.scale} in {time.monotonic() - started:.1f} s")
                sets.append((f"dataset-{args.scale}", root))
            for label, root in sets:
                files, size = tree_stats(root)
                rows.append(bench.backup(label, root, files, size))
                save()
                shutil.rmtree(root, ignore_errors=True)
        finally:
            for process in bench.processes:
                bench.stop(process)
            if args.keep:
                kept = Path(f"{args.work}-logs")
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(
                    args.work, kept, ignore=shutil.ignore_patterns("small-*", "dataset", "repo")
                )
                log(f"logs kept in {kept}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
