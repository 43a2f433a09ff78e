"""Side-by-side benchmarks: Muster next to restic, borg and `tar | zstd | age`, in one run.

    python -m bench.run [--scale 1.0] [--rounds 3] [--targets local,swift]
                        [--out docs/benchmarks.md] [--workdir /tmp/muster-bench]

Every tool runs as its own process under `/usr/bin/time` (wall seconds and peak RSS), on
the same generated dataset (bench/dataset.py), one after the other, in an order that
rotates each round; the page cache is warm (the dataset is read before each round) and
each tool keeps its own local cache (restic's cache, borg's files cache, Muster's catalog
cache) as it would on a server. Each number is the median of `--rounds` runs and is shown
as a ratio to the plain pipeline (full backup) or to restic (everything else).

Nothing is installed here: `bench/install.sh` installs the peers (restic, borgbackup,
zstd, age, time) and py-spy, which samples Muster's steps for the profile hints.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TOOLS = ("plain", "muster", "restic", "borg")
SNAPSHOT_TOOLS = ("muster", "restic", "borg")
REQUIRED = {  # command -> Debian package
    "restic": "restic",
    "borg": "borgbackup",
    "zstd": "zstd",
    "age": "age",
    "age-keygen": "age",
    "tar": "tar",
    "/usr/bin/time": "time",
}
VOLUME_SIZES = (32, 128, 512)  # MiB
DEFAULT_VOLUME_MIB = 128
PASSWORD = "muster-bench-password"
MEMORY_LIMIT = 150 * 10**6  # "150 MB", decimal


@dataclass
class Sample:
    seconds: float
    peak_kib: int
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    # user + system CPU seconds of the process and the children it waited for: on a
    # shared machine wall time follows the load, CPU time much less
    cpu_seconds: float = 0.0


@dataclass
class Scenario:
    key: str
    title: str
    baseline: str  # the tool ratios are taken against
    tools: tuple[str, ...]


SCENARIOS = [
    Scenario("full", "Full backup", "plain", TOOLS),
    Scenario("nochange", "No-change backup", "restic", SNAPSHOT_TOOLS),
    Scenario("change1", "1%-change backup", "restic", SNAPSHOT_TOOLS),
    Scenario("one_file", "Restore one small file", "restic", TOOLS),
    Scenario("full_restore", "Full restore", "restic", TOOLS),
    Scenario("verify", "Full verify", "restic", SNAPSHOT_TOOLS),
]
TOOL_NAMES = {
    "plain": "plain pipeline",
    "muster": "Muster",
    "restic": "restic",
    "borg": "borg",
}


class BenchError(Exception):
    pass


# -- running and measuring -----------------------------------------------------------------


class Runner:
    """Runs one command under /usr/bin/time, bounded by a timeout; keeps its output."""

    def __init__(self, logs: Path, timeout: float) -> None:
        self.logs = logs
        self.timeout = timeout
        self.count = 0

    def measure(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        ok_codes: tuple[int, ...] = (0,),
    ) -> Sample:
        self.count += 1
        os.sync()  # untimed: no tool pays for the writeback of the one before it
        stem = self.logs / f"{self.count:04d}-{name}"
        timing = stem.with_suffix(".time")
        argv = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(timing), *argv]
        with (
            open(stem.with_suffix(".out"), "wb") as out,
            open(stem.with_suffix(".err"), "wb") as err,
        ):
            started = time.perf_counter()
            process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
            )
            # A blocking wait: Popen.wait(timeout=...) polls with sleeps of up to 50 ms,
            # which would show in sub-second timings. A timer kills a run that hangs.
            expired = threading.Event()

            def kill() -> None:
                expired.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

            timer = threading.Timer(self.timeout, kill)
            timer.start()
            try:
                code = process.wait()
            finally:
                timer.cancel()
            seconds = time.perf_counter() - started
            if expired.is_set():
                code = -9
        peak, cpu = _time_report(timing)
        detail: dict[str, Any] = {"returncode": code, "log": str(stem)}
        if code not in ok_codes:
            detail["stderr"] = _tail(stem.with_suffix(".err"))
            if code == -9:
                detail["stderr"] = f"killed after the {self.timeout:.0f} s timeout"
        return Sample(seconds, peak, code in ok_codes, detail, cpu)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """An untimed setup step; it must succeed."""
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.timeout, check=False, **kwargs
        )
        if result.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed:\n{result.stderr[-2000:]}")
        return result


def _time_report(timing: Path) -> tuple[int, float]:
    """Peak RSS (KiB) and user + system seconds from `/usr/bin/time -f "%M %U %S"`, whose
    last line they are (a line about the exit status may come first)."""
    lines = timing.read_text().splitlines() if timing.exists() else []
    fields = lines[-1].split() if lines else []
    try:
        peak, user, system = int(fields[0]), float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        return 0, 0.0
    return peak, user + system


def _tail(path: Path, limit: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def content_map(root: Path) -> dict[str, tuple[str, int, str]]:
    """relative path -> (type, size, sha256 or link target) for every entry under root."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, root)
            info = os.lstat(path)
            if os.path.islink(path):
                found[relative] = ("symlink", 0, os.readlink(path))
            elif os.path.isdir(path):
                found[relative] = ("dir", 0, "")
            else:
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
                found[relative] = ("file", info.st_size, digest)
    return found


def _short(text: str, limit: int = 80) -> str:
    """The start and the end of a long text (an error's reason is at its end)."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return text[: limit - tail - 3] + "..." + text[-tail:]


def compare_trees(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    different = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    return {
        "matches": not (missing or extra or different),
        "missing": len(missing),
        "extra": len(extra),
        "different": len(different),
        "samples": [_short(repr(p)) for p in (missing + different + extra)[:5]],
    }


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale: float = args.scale
        self.rounds: int = args.rounds
        self.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        self.work: Path = args.workdir.absolute()
        self.data = self.work / "data"
        self.key = self.work / "key.txt"
        self.password = self.work / "password"
        self.results: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
        self.checks: dict[str, Any] = {}
        self.profiles: dict[str, Any] = {}
        self.notes: list[str] = []
        self.mutations: list[dict[str, Any]] = []
        self.manifest: dataset.Manifest | None = None
        self.fingerprint = ""
        self.timeout = max(600.0, 1800.0 * self.scale)
        self.runner = Runner(self.work / "logs", self.timeout)
        self.borg_archives = 0
        self.started = datetime.datetime.now(datetime.UTC)
        self.swift_env: dict[str, str] = {}
        self.filesystem = ""
        self.commit: str | None = None  # set when rendering an earlier run
        self.part_size_test: dict[str, Any] = {}
        self.repo_sizes: dict[str, list[int]] = defaultdict(list)  # after each full backup

    # -- setup -------------------------------------------------------------------------

    def check_tools(self) -> None:
        missing = sorted(
            {package for command, package in REQUIRED.items() if not shutil.which(command)}
        )
        if missing:
            raise BenchError(
                "missing tools; install them with\n"
                f"  apt-get install -y {' '.join(missing)}\n"
                "or run bench/install.sh (restic borgbackup zstd age time, and py-spy)"
            )
        if not shutil.which("py-spy") and not (Path(sys.executable).parent / "py-spy").exists():
            self.notes.append("py-spy is not installed: no profile hints (bench/install.sh)")

    def prepare(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "logs").mkdir(parents=True)
        self.filesystem = _filesystem(self.work)
        compile_muster()
        self.runner.run(["age-keygen", "-o", str(self.key)])
        self.password.write_text(PASSWORD + "\n")
        self.log(f"generating the dataset (scale {self.scale}) in {self.data}")
        started = time.perf_counter()
        self.manifest = dataset.generate(self.data, self.scale, self.args.seed)
        self.fingerprint = dataset.fingerprint(self.data)
        self.log(
            f"dataset: {self.manifest.files} files, {self.manifest.bytes / MIB:.0f} MiB, "
            f"in {time.perf_counter() - started:.0f} s"
        )

    @property
    def probe(self) -> Path:
        assert self.manifest is not None
        return self.data / self.manifest.probe

    def recipient(self) -> str:
        for line in self.key.read_text().splitlines():
            if line.startswith("# public key: "):
                return line.removeprefix("# public key: ").strip()
        raise BenchError(f"{self.key}: no public key line")

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **extra}

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {message}", file=sys.stderr, flush=True)

    def warm(self) -> None:
        """Read every file once so that each tool starts with the same warm page cache."""
        for dirpath, _, names in os.walk(self.data):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        while handle.read(8 * MIB):
                            pass

    # -- per-tool commands ------------------------------------------------------------

    def restic_env(self, round_dir: Path) -> dict[str, str]:
        return self.env(
            RESTIC_REPOSITORY=str(round_dir / "restic-repo"),
            RESTIC_PASSWORD_FILE=str(self.password),
            RESTIC_CACHE_DIR=str(round_dir / "restic-cache"),
        )

    def borg_env(self, round_dir: Path) -> dict[str, str]:
        return self.env(
            BORG_REPO=str(round_dir / "borg-repo"),
            BORG_PASSPHRASE=PASSWORD,
            BORG_BASE_DIR=str(round_dir / "borg-base"),
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        )

    def muster(
        self,
        name: str,
        step: str,
        repo_url: str,
        state: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> Sample:
        result = self.work / "logs" / f"muster-{self.runner.count + 1:04d}.json"
        argv = [
            sys.executable,
            "-m",
            "bench.muster_step",
            step,
            "--repo",
            repo_url,
            "--state",
            str(state),
            "--identity",
            str(self.key),
            "--result",
            str(result),
            *extra,
        ]
        sample = self.runner.measure(name, argv, cwd=REPO_ROOT, env=env or self.env())
        if result.exists():
            sample.detail.update(json.loads(result.read_text()))
            sample.detail["in_process_seconds"] = sample.detail.pop("seconds", None)
        return sample

    def backup(self, tool: str, round_dir: Path, scenario: str) -> Sample:
        data = str(self.data)
        if tool == "plain":
            out = round_dir / "plain.tar.zst.age"
            script = (
                f"set -o pipefail; tar -cf - -C {shlex.quote(str(self.data.parent))} "
                f"{shlex.quote(self.data.name)} | zstd -q -T0 -3 | "
                f"age -r {shlex.quote(self.recipient())} > {shlex.quote(str(out))} && "
                f"sync {shlex.quote(str(out))}"  # durable, as the backup tools make theirs
            )
            return self.runner.measure(f"plain-{scenario}", ["bash", "-c", script])
        if tool == "muster":
            return self.muster(
                f"muster-{scenario}",
                "backup",
                f"file://{round_dir / 'muster-repo'}",
                round_dir / "muster-state",
                "--source",
                data,
                "--volume-size",
                str(DEFAULT_VOLUME_MIB * MIB),
            )
        if tool == "restic":
            argv = ["restic", "backup", "--quiet", "--host", "bench", data]
            return self.runner.measure(f"restic-{scenario}", argv, env=self.restic_env(round_dir))
        self.borg_archives += 1
        argv = ["borg", "create", "--compression", "zstd,3", f"::snap-{self.borg_archives}", data]
        # borg exits 1 for warnings (a file changed while read): still a backup
        return self.runner.measure(
            f"borg-{scenario}", argv, env=self.borg_env(round_dir), ok_codes=(0, 1)
        )

    def restore(self, tool: str, round_dir: Path, scenario: str, one_file: bool) -> Sample:
        target = round_dir / f"restore-{tool}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        wanted = self.probe if one_file else self.data
        if tool == "plain":
            member = "" if not one_file else shlex.quote(str(wanted.relative_to(self.work)))
            script = (
                f"set -o pipefail; age -d -i {shlex.quote(str(self.key))} "
                f"{shlex.quote(str(round_dir / 'plain.tar.zst.age'))} | zstd -q -d | "
                f"tar -xf - -C {shlex.quote(str(target))} {member}"
            )
            sample = self.runner.measure(f"plain-{scenario}", ["bash", "-c", script])
            restored = target / wanted.relative_to(self.work)
        elif tool == "muster":
            sample = self.muster(
                f"muster-{scenario}",
                "restore",
                f"file://{round_dir / 'muster-repo'}",
                round_dir / "muster-state",
                "--to",
                str(target),
                "--path",
                str(wanted),
            )
            restored = target / str(wanted).lstrip("/")
        elif tool == "restic":
            argv = ["restic", "restore", "latest", "--target", str(target)]
            if one_file:
                argv += ["--include", str(wanted)]
            sample = self.runner.measure(f"restic-{scenario}", argv, env=self.restic_env(round_dir))
            restored = target / str(wanted).lstrip("/")
        else:
            argv = ["borg", "extract", f"::snap-{self.borg_archives}"]
            if one_file:
                argv.append(str(wanted).lstrip("/"))
            sample = self.runner.measure(
                f"borg-{scenario}", argv, cwd=target, env=self.borg_env(round_dir)
            )
            restored = target / str(wanted).lstrip("/")
        sample.detail["restored"] = str(restored)
        return sample

    def verify(self, tool: str, round_dir: Path) -> Sample:
        if tool == "muster":
            scratch = round_dir / "verify-muster"
            sample = self.muster(
                "muster-verify",
                "verify",
                f"file://{round_dir / 'muster-repo'}",
                round_dir / "muster-state",
                "--to",
                str(scratch),
                "--source",
                str(self.data),
            )
            shutil.rmtree(scratch, ignore_errors=True)
            return sample
        if tool == "restic":
            argv = ["restic", "check", "--read-data"]
            return self.runner.measure("restic-verify", argv, env=self.restic_env(round_dir))
        argv = ["borg", "check", "--verify-data"]
        return self.runner.measure("borg-verify", argv, env=self.borg_env(round_dir))

    # -- rounds ------------------------------------------------------------------------

    def record(self, scenario: str, tool: str, sample: Sample) -> None:
        self.results[scenario][tool].append(sample)
        state = "ok" if sample.ok else f"FAILED ({sample.detail.get('stderr', '')[-200:]!r})"
        errors = sample.detail.get("errors")
        if errors:
            state += f", {errors} errors: {sample.detail.get('error_samples', [''])[0][:200]}"
        self.log(
            f"  {scenario:<13} {tool:<7} {sample.seconds:8.2f} s "
            f"{sample.cpu_seconds:7.2f} s CPU {sample.peak_kib / 1024:7.1f} MiB  {state}"
        )

    def round(self, number: int) -> None:
        self.log(f"round {number} of {self.rounds}")
        round_dir = self.work / "round"
        if round_dir.exists():
            shutil.rmtree(round_dir)
        round_dir.mkdir()
        shift = (number - 1) % len(TOOLS)
        order = TOOLS[shift:] + TOOLS[:shift]
        snapshot_order = [t for t in order if t in SNAPSHOT_TOOLS]
        self.runner.run(["restic", "init"], env=self.restic_env(round_dir))
        self.runner.run(["borg", "init", "--encryption", "repokey"], env=self.borg_env(round_dir))
        (round_dir / "muster-state").mkdir()
        check = number == 1
        before = content_map(self.data) if check else {}
        self.warm()
        for tool in order:
            self.record("full", tool, self.backup(tool, round_dir, "full"))
            self.repo_sizes[tool].append(tree_size(self.repo_path(tool, round_dir)))
        for tool in snapshot_order:
            self.record("nochange", tool, self.backup(tool, round_dir, "nochange"))
        mutation = dataset.mutate(self.data, 1.0, seed=100 + number)
        self.mutations.append(asdict(mutation))
        self.warm()
        for tool in snapshot_order:
            repo = self.repo_path(tool, round_dir)
            size = tree_size(repo)
            sample = self.backup(tool, round_dir, "change1")
            sample.detail["repo_bytes_added"] = tree_size(repo) - size
            self.record("change1", tool, sample)
        after = content_map(self.data) if check else {}
        for tool in order:
            sample = self.restore(tool, round_dir, "one_file", one_file=True)
            restored = Path(sample.detail["restored"])
            same = restored.is_file() and restored.read_bytes() == self.probe.read_bytes()
            sample.detail["content_ok"] = same
            sample.ok = sample.ok and same
            self.record("one_file", tool, sample)
        for tool in order:
            sample = self.restore(tool, round_dir, "full_restore", one_file=False)
            if check:
                restored = Path(sample.detail["restored"])
                expected = before if tool == "plain" else after
                self.checks[tool] = compare_trees(expected, content_map(restored))
                self.log(f"  restored tree of {tool}: {self.checks[tool]}")
            shutil.rmtree(round_dir / f"restore-{tool}", ignore_errors=True)
            self.record("full_restore", tool, sample)
        for tool in snapshot_order:
            self.record("verify", tool, self.verify(tool, round_dir))
        shutil.rmtree(round_dir)

    def repo_path(self, tool: str, round_dir: Path) -> Path:
        return {
            "plain": round_dir / "plain.tar.zst.age",
            "muster": round_dir / "muster-repo",
            "restic": round_dir / "restic-repo",
            "borg": round_dir / "borg-repo",
        }[tool]

    def volume_sizes(self) -> None:
        """Muster's full backup and one-file restore with different volume sizes."""
        self.log("Muster volume sizes")
        for number in range(self.rounds):
            shift = number % len(VOLUME_SIZES)
            for size in VOLUME_SIZES[shift:] + VOLUME_SIZES[:shift]:
                place = self.work / f"volume-{size}"
                shutil.rmtree(place, ignore_errors=True)
                place.mkdir()
                url = f"file://{place / 'repo'}"
                sample = self.muster(
                    f"muster-volume-{size}",
                    "backup",
                    url,
                    place / "state",
                    "--source",
                    str(self.data),
                    "--volume-size",
                    str(size * MIB),
                )
                self.record(f"volume:{size}", "muster", sample)
                sample = self.muster(
                    f"muster-volume-{size}-one",
                    "restore",
                    url,
                    place / "state",
                    "--to",
                    str(place / "out"),
                    "--path",
                    str(self.probe),
                )
                self.record(f"volume-one:{size}", "muster", sample)
                shutil.rmtree(place)

    # -- swift -------------------------------------------------------------------------

    def start_swift(self) -> bool:
        """Use the Swift named by MUSTER_TEST_SWIFT_*, or start one (and say so)."""
        if os.environ.get("MUSTER_TEST_SWIFT_AUTH_URL"):
            self.swift_env = {k: v for k, v in os.environ.items() if k.startswith("MUSTER_TEST_")}
            return False
        self.log(f"starting Swift (MUSTER_SERVICES_DIR={self.args.services_dir})")
        result = self.runner.run(
            [sys.executable, "-m", "tests.services", "start", "swift"],
            cwd=REPO_ROOT,
            env=self.env(MUSTER_SERVICES_DIR=str(self.args.services_dir)),
        )
        for line in result.stdout.splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                self.swift_env[name] = shlex.split(value)[0] if value else ""
        return True

    def stop_swift(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "tests.services", "stop", "swift"],
            cwd=REPO_ROOT,
            env=self.env(MUSTER_SERVICES_DIR=str(self.args.services_dir)),
            capture_output=True,
            timeout=120,
            check=False,
        )

    def swift(self) -> None:
        started = self.start_swift()
        try:
            env = self.env(
                ST_AUTH=self.swift_env["MUSTER_TEST_SWIFT_AUTH_URL"],
                ST_USER=self.swift_env["MUSTER_TEST_SWIFT_USER"],
                ST_KEY=self.swift_env["MUSTER_TEST_SWIFT_KEY"],
            )
            for number in range(1, self.rounds + 1):
                self.log(f"Swift round {number}")
                place = self.work / "swift"
                shutil.rmtree(place, ignore_errors=True)
                place.mkdir()
                url = f"swift://muster-bench/run-{int(time.time())}-{number}"
                common = (url, place / "state")
                sample = self.muster(
                    "swift-full", "backup", *common, "--source", str(self.data), env=env
                )
                self.record("swift:full", "muster", sample)
                restore = ("--to", str(place / "out"), "--path", str(self.probe))
                sample = self.muster("swift-one", "restore", *common, *restore, env=env)
                self.record("swift:one_file", "muster", sample)
                shutil.rmtree(place / "out", ignore_errors=True)
                sample = self.muster(
                    "swift-one-cold", "restore", *common, *restore, "--no-cache", env=env
                )
                self.record("swift:one_file_cold", "muster", sample)
                shutil.rmtree(place)
        finally:
            if started:
                self.log("stopping Swift")
                self.stop_swift()

    # -- profiles ----------------------------------------------------------------------

    def py_spy(self) -> str | None:
        beside = Path(sys.executable).parent / "py-spy"
        return str(beside) if beside.exists() else shutil.which("py-spy")

    def profile(self, wanted: set[str]) -> None:
        """Replay Muster's local steps once under py-spy; keep the top frames of those
        whose targets were missed."""
        spy = self.py_spy()
        if spy is None or not wanted:
            return
        self.log(f"profiling Muster: {', '.join(sorted(wanted))}")
        place = self.work / "profile"
        shutil.rmtree(place, ignore_errors=True)
        place.mkdir()
        url, state = f"file://{place / 'repo'}", place / "state"
        steps: list[tuple[str, str, list[str]]] = [
            ("full", "backup", ["--source", str(self.data)]),
            ("nochange", "backup", ["--source", str(self.data)]),
            ("change1", "backup", ["--source", str(self.data)]),
            ("one_file", "restore", ["--to", str(place / "one"), "--path", str(self.probe)]),
            ("full_restore", "restore", ["--to", str(place / "all"), "--path", str(self.data)]),
            ("verify", "verify", ["--to", str(place / "verify"), "--source", str(self.data)]),
        ]
        for key, step, extra in steps:
            if key == "change1":
                dataset.mutate(self.data, 1.0, seed=999)
            argv = [sys.executable, "-m", "bench.muster_step", step, "--repo", url]
            argv += ["--state", str(state), "--identity", str(self.key), *extra]
            if key not in wanted:
                subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, check=False)
                continue
            raw = place / f"{key}.txt"
            spied = [spy, "record", "--format", "raw", "--rate", "250", "-o", str(raw), "--"]
            subprocess.run(
                spied + argv, cwd=REPO_ROOT, capture_output=True, check=False, timeout=self.timeout
            )
            if raw.exists():
                self.profiles[key] = summarize_profile(raw.read_text())
            shutil.rmtree(place / "all", ignore_errors=True)
        shutil.rmtree(place, ignore_errors=True)

    def try_part_sizes(self) -> None:
        """One full backup per storage part size: how much of the peak is upload buffers."""
        self.log("Muster full backup peak memory by storage part size")
        for part in (16, 4):
            place = self.work / f"part-{part}"
            shutil.rmtree(place, ignore_errors=True)
            place.mkdir()
            sample = self.muster(
                f"muster-part-{part}",
                "backup",
                f"file://{place / 'repo'}",
                place / "state",
                "--source",
                str(self.data),
                "--part-size",
                str(part),
            )
            self.part_size_test[str(part)] = {
                "seconds": sample.seconds,
                "peak_bytes": sample.peak_kib * 1024,
                "ok": sample.ok,
            }
            shutil.rmtree(place)

    # -- main --------------------------------------------------------------------------

    def run(self) -> None:
        self.check_tools()
        self.prepare()
        try:
            if "local" in self.targets:
                for number in range(1, self.rounds + 1):
                    self.round(number)
                self.volume_sizes()
            if "swift" in self.targets:
                self.swift()
            if "local" in self.targets:
                self.profile(self.missed_muster_steps())
                if any(t.name.startswith("Peak memory") and t.met is False for t in evaluate(self)):
                    self.try_part_sizes()
        finally:
            self.save_raw()
        self.write_report()

    def missed_muster_steps(self) -> set[str]:
        return {t.profile for t in evaluate(self) if t.profile and t.met is not True}

    def save_raw(self) -> None:
        raw = {
            "results": {
                scenario: {tool: [asdict(s) for s in samples] for tool, samples in tools.items()}
                for scenario, tools in self.results.items()
            },
            "checks": self.checks,
            "profiles": self.profiles,
            "mutations": self.mutations,
            "manifest": asdict(self.manifest) if self.manifest else None,
            "repo_sizes": self.repo_sizes,
            "fingerprint": self.fingerprint,
            "started": self.started.isoformat(),
            "notes": self.notes,
            "filesystem": self.filesystem,
            "commit": _git(),
            "part_size_test": self.part_size_test,
            "run": {"scale": self.scale, "rounds": self.rounds, "targets": self.targets},
        }
        (self.work / "results.json").write_text(json.dumps(raw, indent=1, default=str))

    def load_raw(self, path: Path) -> None:
        """Take the numbers of an earlier run (its results.json) to render them again."""
        raw = json.loads(path.read_text())
        for scenario, tools in raw["results"].items():
            for tool, samples in tools.items():
                self.results[scenario][tool] = [Sample(**sample) for sample in samples]
        self.checks, self.profiles = raw["checks"], raw["profiles"]
        self.mutations, self.notes = raw["mutations"], raw.get("notes", [])
        self.manifest = dataset.Manifest(**raw["manifest"]) if raw["manifest"] else None
        self.repo_sizes = defaultdict(list, raw.get("repo_sizes", {}))
        self.fingerprint = raw.get("fingerprint", "")
        self.filesystem = raw.get("filesystem", "?")
        self.commit = raw.get("commit")
        self.part_size_test = raw.get("part_size_test", {})
        if "started" in raw:
            self.started = datetime.datetime.fromisoformat(raw["started"])
        run = raw.get("run", {})
        self.scale = run.get("scale", self.scale)
        self.rounds = run.get("rounds", self.rounds)
        self.targets = run.get("targets", self.targets)
        self.work = path.parent

    def write_report(self) -> None:
        text = render(self)
        out: Path = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + kept_tail(out))
        self.log(f"wrote {out} (raw numbers: {self.work / 'results.json'})")


# -- profiles ------------------------------------------------------------------------------


# Leaf frames of threads that wait for work, which py-spy may still count as active.
IDLE_FRAMES = ("_worker (", "wait (", "_wait_for_tstate_lock (", "result (")


def _frame_name(frame: str, line: bool = False) -> str:
    """'function (path/to/file.py:123)' -> 'function (file.py)' (with ':123' if `line`),
    with the path shortened to its package."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, number = where.rpartition(":")
    if not file:
        file, number = where, ""
    for marker in ("/agent/", "/broker/", "/bench/", "/site-packages/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker in ("/agent/", "/broker/", "/bench/"):
                file = marker.strip("/") + "/" + file
            break
    return f"{name} ({file}{':' + number if line and number else ''})"


def summarize_profile(raw: str, top: int = 10) -> dict[str, Any]:
    """Top frames by own samples and by inclusive samples, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not raw_frames or raw_frames[-1].startswith(IDLE_FRAMES):
            continue
        frames = [_frame_name(f) for f in raw_frames]
        total += count
        own[_frame_name(raw_frames[-1], line=True)] += count
        for name in set(frames):
            if "(agent/" in name or "(bench/" not in name:
                inclusive[name] += count

    def share(items: list[tuple[str, int]]) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / total) for name, count in items]

    interesting = [(n, c) for n, c in inclusive.most_common() if "(agent/" in n][:top]
    return {
        "samples": total,
        "own": share(own.most_common(top)),
        "inclusive": share(interesting),
    }


# -- evaluation and the report -------------------------------------------------------------


def median(samples: list[Sample]) -> float | None:
    return statistics.median(s.seconds for s in samples) if samples else None


def cpu_median(samples: list[Sample]) -> float | None:
    """None for results recorded before CPU time was measured."""
    values = [s.cpu_seconds for s in samples if s.cpu_seconds]
    return statistics.median(values) if values else None


def detail_median(samples: list[Sample], key: str) -> float | None:
    values = [s.detail[key] for s in samples if isinstance(s.detail.get(key), int | float)]
    return statistics.median(values) if values else None


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured
    profile: str = ""  # the Muster step to profile when missed


def evaluate(bench: Bench) -> list[Target]:
    results = bench.results

    def med(scenario: str, tool: str) -> float | None:
        return median(results.get(scenario, {}).get(tool, []))

    def per_round(scenario: str, base: str) -> str:
        """Each round's ratio: the two ran side by side in that round."""
        mine = results.get(scenario, {}).get("muster", [])
        theirs = results.get(scenario, {}).get(base, [])
        ratios = [m.seconds / t.seconds for m, t in zip(mine, theirs, strict=False) if t.seconds]
        return f" (per round: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""

    def valid(scenario: str, tool: str = "muster") -> bool:
        samples = results.get(scenario, {}).get(tool, [])
        return bool(samples) and all(s.ok for s in samples)

    targets: list[Target] = []
    muster, plain = med("full", "muster"), med("full", "plain")
    if muster and plain:
        ratio = muster / plain
        met = ratio <= 1.3 and valid("full")
        targets.append(
            Target(
                "Full backup",
                "<= 1.3x plain pipeline",
                f"{ratio:.2f}x" + per_round("full", "plain"),
                met,
                "full",
            )
        )
    for key, title in (("nochange", "No-change backup"), ("change1", "1%-change backup")):
        muster, restic = med(key, "muster"), med(key, "restic")
        if muster and restic:
            ratio = muster / restic
            met = ratio <= 1 / 3 and valid(key)
            shown = f"{ratio:.2f}x" + per_round(key, "restic")
            targets.append(Target(title, "<= 1/3 of restic (0.33x)", shown, met, key))
    one = med("one_file", "muster")
    if one is not None:
        inner = detail_median(results["one_file"]["muster"], "in_process_seconds")
        shown = f"{one:.2f} s ({inner:.2f} s inside the process)" if inner else f"{one:.2f} s"
        met = one < 0.3 and valid("one_file")
        targets.append(Target("One small file", "< 0.3 s", shown, met, "one_file"))
    for key, title in (("full_restore", "Full restore"), ("verify", "Full verify")):
        muster, restic = med(key, "muster"), med(key, "restic")
        if muster and restic:
            ratio = muster / restic
            ok = valid(key)
            shown = f"{ratio:.2f}x restic" + per_round(key, "restic")
            shown += "" if ok else "; with errors, see below"
            targets.append(Target(title, "faster than restic (< 1x)", shown, ratio < 1 and ok, key))
    peaks = [
        (s.peak_kib * 1024, scenario)
        for scenario in results
        for s in results[scenario].get("muster", [])
    ]
    if peaks:
        peak, where = max(peaks)
        targets.append(
            Target(
                "Peak memory (RSS)",
                "< 150 MB",
                # /usr/bin/time reports the largest process; a backup forks worker processes
                f"{peak / 1e6:.0f} MB ({where}), the largest process; a backup's processes "
                "together: see the agent's footprint below",
                peak < MEMORY_LIMIT,
            )
        )
    swift = results.get("swift:one_file", {}).get("muster", [])
    if swift:
        fetched = detail_median(swift, "bytes_fetched") or 0
        cold = detail_median(results["swift:one_file_cold"]["muster"], "bytes_fetched") or 0
        seconds = median(swift) or 0
        met = fetched < 2 * MIB and all(s.ok for s in swift)
        targets.append(
            Target(
                "Swift: one small file",
                "< 2 MiB fetched",
                f"{fetched / MIB:.2f} MiB with the catalog cache, {cold / MIB:.2f} MiB without; "
                f"{seconds:.2f} s",
                met,
            )
        )
    return targets


def _mark(met: bool | None) -> str:
    return "met" if met else "not measured" if met is None else "**not met**"


def _seconds(samples: list[Sample]) -> str:
    value = median(samples)
    return "-" if value is None else f"{value:.2f}"


def _spread(samples: list[Sample]) -> str:
    if len(samples) < 2:
        return ""
    return f"{min(s.seconds for s in samples):.2f}-{max(s.seconds for s in samples):.2f}"


def _peak(samples: list[Sample]) -> str:
    return f"{max(s.peak_kib for s in samples) / 1024:.0f}" if samples else "-"


def _machine() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    debian = Path("/etc/debian_version")
    versions = {
        "restic": ["restic", "version"],
        "borg": ["borg", "--version"],
        "zstd": ["zstd", "--version"],
        "age": ["age", "--version"],
        "tar": ["tar", "--version"],
    }
    found = []
    for name, argv in versions.items():
        try:
            output = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
            found.append(f"{name} `{output.splitlines()[0].strip()}`")
        except (OSError, IndexError):
            found.append(f"{name} ?")
    try:
        import zstandard

        found.append(f"python-zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION})")
    except ImportError:
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory / 2**30:.0f} GiB",
        f"- OS: Debian {debian.read_text().strip() if debian.exists() else '?'}, "
        f"Linux {platform.release()}; Python {platform.python_version()}",
        "- Tools: " + "; ".join(found),
    ]


def _git() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "agent", "broker")
    return commit + (" (agent/ or broker/ had uncommitted changes)" if dirty else "")


def render(bench: Bench) -> str:
    results = bench.results
    manifest = bench.manifest
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. Muster is measured next to restic, "
        "borg and the plain `tar | zstd | age` pipeline in the same run, on the same data, and "
        "reported as ratios: absolute seconds only mean something on this machine.",
        "",
        "Reproduce (after `bench/install.sh`, from the repository root, with the project's "
        "virtualenv):",
        "",
        "```sh",
        f"python -m bench.run --scale {bench.scale:g} --rounds {bench.rounds} "
        f"--targets {','.join(bench.targets)} --out {bench.args.out}",
        "```",
        "",
        f"Run: {bench.started:%Y-%m-%d %H:%M} UTC, commit {bench.commit or _git()}, "
        f"{bench.rounds} rounds, medians shown (range over rounds in the table).",
        "",
        "## Machine",
        "",
        *_machine(),
        f"- Work directory: `{bench.work}` ({bench.filesystem}), which holds the dataset, "
        "every repository and every restore",
        "",
        "## Dataset",
        "",
    ]
    if manifest:
        kinds = ", ".join(
            f"{kind} {files} files / {size / MIB:.0f} MiB"
            for kind, (files, size) in sorted(manifest.by_kind.items())
        )
        lines += [
            f"`bench/dataset.py`, seed {manifest.seed}, scale {manifest.scale:g}: "
            f"{manifest.files} regular files, {manifest.bytes / MIB:.0f} MiB, "
            f"{manifest.directories} directories, {manifest.symlinks} symlinks, "
            f"{manifest.hardlinks} hard links, {manifest.odd_names} awkward names (spaces, "
            "unicode, a newline, quotes, non-UTF-8 bytes, names of 99-250 bytes, a path over "
            "400 bytes). By kind: " + kinds + ".",
            "",
            f"Fingerprint of the generated tree (names, modes, times, contents): "
            f"`{bench.fingerprint[:16]}`.",
            "",
        ]
    if bench.mutations:
        first = bench.mutations[0]
        lines += [
            "Each round's 1% change (`dataset.mutate`) modified "
            f"{first['modified']}, deleted {first['deleted']} and added {first['added']} files "
            f"({first['bytes_written'] / 1024:.0f} KiB written) in round 1; logs grow, large "
            "files change 64 KiB in place, text files gain lines.",
            "",
        ]
    lines += [
        "## Method",
        "",
        "- Each round: fresh repositories; full backup, no-change backup, 1% change, 1%-change "
        "backup, restore of one small file, full restore, full verify; tools in a rotating "
        "order; the dataset is read before the backups so the page cache is warm for every "
        "tool, and each tool keeps its own cache (restic's cache directory, borg's files "
        "cache, Muster's catalog cache).",
        "- Seconds are wall time of the whole process (start-up included) as `/usr/bin/time` "
        "runs it; CPU is its user + system seconds, the children it waited for included "
        "(for the pipeline: every stage), which a shared machine disturbs much less than "
        "wall time; peak memory is its maximum RSS (for the pipeline: of its largest "
        "process).",
        "- Muster runs through `python -m bench.muster_step`, which calls `run_backup`, "
        "`run_restore` and `run_verify` and counts what it reads through the Repository.",
        "- Before every timed step the runner calls `sync` (untimed), so no tool pays for "
        "the writeback of the one before it. Backups are timed until their data is durable: "
        "Muster, restic and borg fsync what they write, and the plain pipeline ends with "
        "`sync FILE`. Restores are timed without a final sync, for every tool.",
        *(
            [
                "- The work directory is on tmpfs: on this machine's virtual disk, I/O-heavy "
                "steps (full backups, full restores) varied up to 10x between rounds for every "
                "tool, which drowned the differences between the tools. `--workdir DIR` runs "
                "on a disk instead; fsync is then real.",
            ]
            if bench.filesystem == "tmpfs"
            else []
        ),
        "- The plain pipeline is `tar -cf - data | zstd -T0 -3 | age -r KEY > FILE` and "
        "`age -d | zstd -d | tar -x` back (one file: `tar -x PATH`, which still reads the "
        "whole stream).",
        "- Settings: Muster compression level 3, volume size "
        f"{DEFAULT_VOLUME_MIB} MiB, local target; restic repository v2 (compression auto); "
        "borg `--encryption repokey --compression zstd,3`; pipeline `zstd -T0 -3`.",
        "- Verify: `restic check --read-data`, `borg check --verify-data`, Muster "
        + _verify_mode(results)
        + ".",
        "",
        "## Targets",
        "",
        "| Target | Goal | Measured | Result |",
        "| --- | --- | --- | --- |",
    ]
    targets = evaluate(bench)
    for target in targets:
        lines.append(f"| {target.name} | {target.goal} | {target.measured} | {_mark(target.met)} |")
    lines.append("")
    for scenario in SCENARIOS:
        if scenario.key not in results:
            continue
        lines += _scenario_table(bench, scenario)
    lines += _volume_table(bench)
    lines += _swift_table(bench)
    lines += _memory(bench, targets)
    lines += _problems(bench)
    lines += _profiles(bench, targets)
    if bench.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in bench.notes], ""]
    return "\n".join(lines).rstrip() + "\n"


def _verify_mode(results: dict[str, dict[str, list[Sample]]]) -> str:
    samples = results.get("verify", {}).get("muster", [])
    mode = samples[0].detail.get("mode") if samples else None
    if mode and "run_verify" in mode:
        return (
            "`run_verify(..., all=True)` (reads every volume once, checking its sha256 as it "
            "goes, and restores every file through the restore code into a sink that checks "
            "each file's sha256 instead of writing it)"
        )
    return (
        "has no `run_verify` yet in this tree: a full `run_restore` to a scratch directory "
        "stands in (it reads every volume and checks every file's sha256)"
    )


def _scenario_table(bench: Bench, scenario: Scenario) -> list[str]:
    results = bench.results[scenario.key]
    base = median(results.get(scenario.baseline, []))
    extra = {
        "change1": "Added to repo (MiB)",
        "one_file": "Check",
        "full_restore": "Tree",
        "full": "Repo (MiB)",
    }.get(scenario.key)
    base_cpu = cpu_median(results.get(scenario.baseline, []))
    header = (
        f"| Tool | Seconds (median) | Range | x {TOOL_NAMES[scenario.baseline]} "
        f"| CPU s, user+sys (median) | CPU x {TOOL_NAMES[scenario.baseline]} | Peak RSS (MiB)"
    )
    lines = [f"### {scenario.title}", "", header + (f" | {extra} |" if extra else " |")]
    lines.append("| --- " * (7 + bool(extra)) + "|")
    for tool in scenario.tools:
        samples = results.get(tool, [])
        if not samples:
            continue
        value = median(samples)
        ratio = f"{value / base:.2f}" if value is not None and base else "-"
        failed = sum(not s.ok for s in samples)
        name = TOOL_NAMES[tool] + (
            f" (errors in {failed} of {len(samples)} runs)" if failed else ""
        )
        cpu = cpu_median(samples)
        cpu_ratio = f"{cpu / base_cpu:.2f}" if cpu and base_cpu else "-"
        cpu_text = f"{cpu:.2f}" if cpu else "-"
        row = (
            f"| {name} | {_seconds(samples)} | {_spread(samples)} | {ratio} | {cpu_text} "
            f"| {cpu_ratio} | {_peak(samples)}"
        )
        if scenario.key == "change1":
            added = detail_median(samples, "repo_bytes_added")
            row += f" | {added / MIB:.2f}" if added is not None else " | -"
        elif scenario.key == "one_file":
            same = all(s.detail.get("content_ok") for s in samples)
            row += " | " + ("same bytes" if same else "wrong or missing")
        elif scenario.key == "full_restore":
            check = bench.checks.get(tool)
            row += " | " + (_tree_check(check) if check else "-")
        elif scenario.key == "full":
            sizes = bench.repo_sizes.get(tool)
            row += f" | {statistics.median(sizes) / MIB:.0f}" if sizes else " | -"
        lines.append(row + " |")
    muster = results.get("muster", [])
    inner = detail_median(muster, "in_process_seconds")
    if inner is not None:
        lines += [
            "",
            f"Muster inside its process (without interpreter start-up and imports): "
            f"{inner:.2f} s median.",
        ]
    lines.append("")
    return lines


def _tree_check(check: dict[str, Any]) -> str:
    if check["matches"]:
        return "identical"
    return (
        f"{check['missing']} missing, {check['different']} different, {check['extra']} extra "
        f"(e.g. {', '.join(check['samples'][:2])})"
    )


def _volume_table(bench: Bench) -> list[str]:
    rows = []
    for size in VOLUME_SIZES:
        backup = bench.results.get(f"volume:{size}", {}).get("muster", [])
        one = bench.results.get(f"volume-one:{size}", {}).get("muster", [])
        if not backup:
            continue
        volumes = detail_median(backup, "volumes")
        fetched = detail_median(one, "bytes_fetched")
        rows.append(
            f"| {size} MiB{' (default)' if size == DEFAULT_VOLUME_MIB else ''} | "
            f"{_seconds(backup)} | {_spread(backup)} | {_peak(backup)} | "
            f"{volumes:.0f} | {_seconds(one)} | "
            + (f"{fetched / 1024:.0f}" if fetched is not None else "-")
            + " |"
        )
    if not rows:
        return []
    times = {
        size: median(bench.results[f"volume:{size}"]["muster"])
        for size in VOLUME_SIZES
        if bench.results.get(f"volume:{size}")
    }
    best = min(times, key=lambda s: times[s] or float("inf"))
    default = times.get(DEFAULT_VOLUME_MIB) or 0
    spread = (max(times.values()) - min(times.values())) / min(times.values()) * 100
    verdict = (
        f"Full-backup time varies by {spread:.0f}% across sizes (fastest: {best} MiB; the "
        f"{DEFAULT_VOLUME_MIB} MiB default is {default / times[best]:.2f}x the fastest)."
    )
    return [
        "### Muster volume size",
        "",
        "Full backup and one small file restored, per `volume_size` (local target).",
        "",
        "| Volume size | Full backup (s) | Range | Peak RSS (MiB) | Volumes | One file (s) "
        "| One file fetched (KiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        verdict,
        "",
    ]


def _swift_table(bench: Bench) -> list[str]:
    labels = {
        "swift:full": "Full backup",
        "swift:one_file": "One small file (catalog cache warm)",
        "swift:one_file_cold": "One small file (no catalog cache)",
    }
    rows = []
    for key, label in labels.items():
        samples = bench.results.get(key, {}).get("muster", [])
        if not samples:
            continue
        fetched = detail_median(samples, "bytes_fetched")
        requests = detail_median(samples, "range_requests") or 0
        gets = detail_median(samples, "get_requests") or 0
        failed = sum(not s.ok for s in samples)
        rows.append(
            f"| {label}{f' ({failed} failed)' if failed else ''} | {_seconds(samples)} | "
            f"{_spread(samples)} | {_peak(samples)} | "
            + (f"{fetched / 1024:.0f}" if fetched is not None else "-")
            + f" | {gets:.0f} / {requests:.0f} |"
        )
    if not rows:
        return []
    return [
        "### Muster against Swift (loopback)",
        "",
        "A real Swift (tests/services) on 127.0.0.1. Bytes fetched are counted by wrapping "
        "the Repository's `get` and `get_range` in the driver.",
        "",
        "| Step | Seconds (median) | Range | Peak RSS (MiB) | Fetched (KiB) | GETs / ranged GETs |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def _memory(bench: Bench, targets: list[Target]) -> list[str]:
    """Every Muster step's peak RSS, when the memory target was missed."""
    if all(t.met is not False for t in targets if t.name.startswith("Peak memory")):
        return []
    rows = []
    for scenario, tools in bench.results.items():
        samples = tools.get("muster", [])
        if samples:
            peak = max(s.peak_kib for s in samples) * 1024
            rows.append((peak, scenario))
    baseline = min(rows)[0] if rows else 0
    lines = [
        "### Muster's peak memory by step",
        "",
        f"The smallest peak ({baseline / 1e6:.0f} MB) is about what the interpreter and "
        "Muster's imports take; the rest is the step's own.",
        "",
        "| Step | Peak RSS (MB) | Over the smallest (MB) |",
        "| --- | --- | --- |",
    ]
    for peak, scenario in sorted(rows, reverse=True):
        mark = " **over 150**" if peak >= MEMORY_LIMIT else ""
        lines.append(f"| {scenario} | {peak / 1e6:.0f}{mark} | {(peak - baseline) / 1e6:.0f} |")
    tests = bench.part_size_test
    if {"16", "4"} <= set(tests):
        big, small = tests["16"], tests["4"]
        lines += [
            "",
            "The same local full backup with the storage `Tuning.part_size` at 16 MiB (a "
            f"local directory's default is 1 MiB) peaks at {big['peak_bytes'] / 1e6:.0f} MB "
            f"({big['seconds']:.1f} s); at "
            f"4 MiB it peaks at {small['peak_bytes'] / 1e6:.0f} MB ({small['seconds']:.1f} s). "
            "Each open object (a volume per worker, and the catalog) keeps a part-size "
            "buffer plus a `bytes()` copy of the part being uploaded.",
        ]
    return [*lines, ""]


def _problems(bench: Bench) -> list[str]:
    found = []
    for scenario, tools in bench.results.items():
        for tool, samples in tools.items():
            for number, sample in enumerate(samples, 1):
                errors = sample.detail.get("errors")
                if sample.ok and not errors:
                    continue
                what = sample.detail.get("error_samples") or [sample.detail.get("stderr", "")]
                text = _short(str(what[0]).replace("\n", " "), 200)
                count = f"{errors} errors" if errors else "failed"
                found.append(f"- {scenario}, {TOOL_NAMES[tool]}, run {number}: {count}: `{text}`")
    for tool, check in bench.checks.items():
        if not check["matches"]:
            found.append(f"- Full restore of {TOOL_NAMES[tool]}: {_tree_check(check)}")
    if not found:
        return []
    return [
        "## Failures seen in this run",
        "",
        "A run with errors still has its time in the tables, but its target is not met.",
        "",
        *found[:40],
        *(["- ..."] if len(found) > 40 else []),
        "",
    ]


def _profiles(bench: Bench, targets: list[Target]) -> list[str]:
    missed = [t for t in targets if t.met is not True and t.profile in bench.profiles]
    if not missed:
        return []
    lines = [
        "## Where Muster's time goes (missed targets)",
        "",
        "py-spy samples (250 Hz, all threads, idle excluded) of one extra run of the step. "
        "Own: samples in that line itself (C calls such as hashing, compression, system "
        "calls count to the Python line that made them); inclusive: samples with that agent/ "
        "function anywhere on the stack. Imports show as `<module>` and importlib frames.",
        "",
    ]
    for target in missed:
        profile = bench.profiles[target.profile]
        lines += [
            f"### {target.name} ({profile['samples']} samples)",
            "",
            "| Own % | Frame |",
            "| --- | --- |",
            *[f"| {share:.1f} | `{name}` |" for name, share in profile["own"]],
            "",
            "| Inclusive % | agent/ function |",
            "| --- | --- |",
            *[f"| {share:.1f} | `{name}` |" for name, share in profile["inclusive"]],
            "",
        ]
    return lines


def default_workdir(scale: float) -> Path:
    """tmpfs when it holds the dataset, the repositories and a restore (about 6x the
    dataset): this machine's virtual disk made I/O-heavy timings vary up to 10x between
    rounds, which drowns the differences between the tools."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 6 * scale * (1 << 30) + (1 << 30):
        return shm / "muster-bench"
    return Path("/tmp/muster-bench")


def _filesystem(path: Path) -> str:
    result = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "?"


# The fleet figures (bench/fleet.py, bench/ingest.py, bench/footprint.py) close the same
# document: everything from this line on is carried over when the report is written again.
KEPT_MARK = (
    "<!-- fleet figures: from bench/fleet.py, ingest.py, footprint.py; kept by bench/run.py -->"
)


def kept_tail(out: Path) -> str:
    """The part of an earlier report that this benchmark does not measure."""
    if not out.exists():
        return ""
    _, mark, tail = out.read_text().partition(KEPT_MARK)
    return f"\n{mark}{tail}" if mark else ""


def compile_muster() -> None:
    """Byte-compile Muster as an installed wheel would be: with PYTHONDONTWRITEBYTECODE set
    (as on this machine kind) a source checkout is otherwise compiled again by every
    measured process, a start-up cost no installed Muster pays."""
    for package in ("broker", "agent", "ruleengine", "reporter", "muster", "bench"):
        compileall.compile_dir(REPO_ROOT / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size (1.0: ~1 GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="local,swift", help="local, swift or both")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--workdir",
        type=Path,
        help="default: /dev/shm/muster-bench when that tmpfs has room, else /tmp/muster-bench",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--services-dir",
        type=Path,
        default=Path("/tmp/bench-services"),
        help="MUSTER_SERVICES_DIR for the Swift this run starts",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write --out again from an earlier run's results.json",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be at least 1 and --scale positive")
    if args.workdir is None:
        args.workdir = default_workdir(args.scale)
    try:
        bench = Bench(args)
        if args.render:
            bench.load_raw(args.render)
            bench.write_report()
        else:
            bench.run()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
