"""The agent daemon's runs: one backup, restore test or forget, turned into a RunResult.

`Runner` does a run in the calling process. `ChildRunner` does the same run in a child
process (`python -m agent.daemon_run`) so that the daemon never loads the backup engine,
the storage clients and compression, and its memory is back to idle the moment a run ends
(a run's imports, buffers and heap fragmentation go away with the child). The child:

* reads its request (node, state dir, job, kind) as one JSON object on stdin;
* writes every message it produces (run_status, then the RunResult) as one encoded line on
  stdout; the daemon spools them, so the spool keeps one writer;
* treats SIGTERM and SIGINT as the daemon's stop request: the run stops at its next safe
  point and reports `interrupted`, exactly as in-process.

Nothing in this module imports the engine at import time: `Runner` imports it per run.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from agent import age
from agent.hooks import redact, run_hooks
from agent.scheduler import Task
from broker.codec import decode, encode
from broker.errors import ContractError, InvalidMessage
from broker.messages import Message, RunResult, RunStats, RunStatus, new_id
from broker.plan import Job
from broker.types import utcnow
from muster import __version__

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.txt"  # as agent.context.IDENTITY_FILE
SCRATCH_DIR = "scratch"
MAX_WARNINGS = 100  # warnings carried by one result; the rest are counted
MAX_ERROR = 2000
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as muster.cli's
INTERRUPTED = (
    "the agent was stopped; the run ended before its snapshot record was written, so nothing "
    "of it is visible (the next backup removes its objects)"
)


class Interrupted(Exception):
    """Raised from a backup's progress callback when the agent is told to stop."""


@dataclass
class RunContext:
    """What a run needs of the agent, in the daemon or in a run's child process."""

    node: str
    state_dir: Path
    identity: age.Identity
    status_interval: float
    stopping: threading.Event
    emit: Callable[[Message], None]

    @property
    def scratch(self) -> Path:
        return self.state_dir / SCRATCH_DIR


def describe_error(error: BaseException) -> str:
    """One line for a result's `error`: what went wrong, never a secret, bounded."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror}"
    elif isinstance(error, ContractError | age.AgeError) or type(error).__module__.startswith(
        "agent.storage"
    ):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    text = redact(text)
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def bounded_warnings(warnings: list[str]) -> list[str]:
    kept = [redact(w)[:1000] for w in warnings[:MAX_WARNINGS]]
    if len(warnings) > MAX_WARNINGS:
        kept.append(f"... and {len(warnings) - MAX_WARNINGS} more warnings")
    return kept


class _Progress:
    """A backup's progress callback: emits a throttled run_status, raises on stop."""

    def __init__(self, context: RunContext, job: str, run_id: str, kind: str) -> None:
        self.context = context
        self.job = job
        self.run_id = run_id
        self.kind = kind
        self.files_total: int | None = None
        self.bytes_total: int | None = None
        self._sent = 0.0

    def __call__(self, files: int, bytes_done: int) -> None:
        if self.context.stopping.is_set():
            raise Interrupted()
        now = time.monotonic()
        if now - self._sent >= self.context.status_interval:
            self._sent = now
            self.send("running", files, bytes_done)

    def send(self, phase: str, files: int = 0, bytes_done: int = 0) -> None:
        self.context.emit(
            RunStatus(
                node=self.context.node,
                job=self.job,
                run_id=self.run_id,
                kind=self.kind,  # type: ignore[arg-type]
                phase=phase,
                files_done=files,
                bytes_done=bytes_done,
                files_total=self.files_total,
                bytes_total=self.bytes_total,
            )
        )


class Runner:
    """Turns one scheduled task into a RunResult (and the run_status messages before it),
    in this process."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def run(self, task: Task, job: Job) -> RunResult:
        started = utcnow()
        fields: dict[str, Any] = {
            "node": self.context.node,
            "job": job.name,
            "run_id": new_id(),
            "kind": task.kind,
            "started": started,
        }
        try:
            if task.kind == "backup":
                outcome = self._backup(job, fields["run_id"])
            elif task.kind == "verify":
                outcome = self._verify(job)
            else:
                outcome = self._forget(job)
        except Interrupted:
            outcome = {"status": "interrupted", "error": INTERRUPTED}
        except Exception as error:
            log.exception("%s of job %s failed", task.kind, job.name)
            outcome = {"status": "failure", "error": describe_error(error)}
        return RunResult(**fields, finished=utcnow(), **outcome)

    def _open(self, job: Job) -> tuple[Any, Any, str]:
        from agent.context import repository_key
        from agent.repository import Repository
        from agent.state import CatalogCache
        from agent.storage import open_storage

        key = repository_key(job.storage, self.context.node, job.name)
        repo = Repository(open_storage(job.storage), self.context.node, job.name)
        return repo, CatalogCache(self.context.state_dir, key), key

    def _backup(self, job: Job, run_id: str) -> dict[str, Any]:
        from agent.actions.backup import run_backup
        from agent.actions.snapshots import latest

        context = self.context
        env = {"MUSTER_NODE": context.node, "MUSTER_JOB": job.name, "MUSTER_RUN_ID": run_id}
        progress = _Progress(context, job.name, run_id, "backup")
        result: dict[str, Any] = {"status": "failure", "warnings": [], "hooks": []}
        try:
            if job.hooks.pre:
                progress.send("pre_hooks")
            pre_env = {**env, "MUSTER_HOOK": "pre"}
            pre, failure = run_hooks(job.hooks.pre, pre_env, context.stopping)
            result["hooks"] += pre
            if context.stopping.is_set():
                raise Interrupted()
            if failure is not None:
                result["error"] = f"pre {failure}: the backup did not run"
                return result
            repo, cache, _ = self._open(job)
            parent = latest(repo)
            if parent is not None:
                progress.files_total, progress.bytes_total = parent.stats.files, parent.stats.bytes
            progress.send("starting")
            outcome = run_backup(job, repo, context.identity, cache, __version__, progress)
            record, stats = outcome.record, outcome.record.stats
            result.update(
                status="warning" if outcome.warnings else "success",
                snapshot=record.id,
                full=record.full,
                warnings=bounded_warnings(outcome.warnings),
                stats=RunStats(
                    files=stats.files,
                    files_new=stats.files_new,
                    files_changed=stats.files_changed,
                    files_unchanged=stats.files_unchanged,
                    bytes_read=stats.bytes_new,
                    bytes_stored=stats.bytes_stored,
                    volumes=len(record.volumes),
                ),
            )
            return result
        except Interrupted:
            result.update(status="interrupted", error=INTERRUPTED)
            return result
        except Exception as error:
            log.exception("backup of job %s failed", job.name)
            result.update(status="failure", error=describe_error(error))
            return result
        finally:
            # Post hooks run whatever happened (they undo what pre hooks did), to their end.
            post_env = {**env, "MUSTER_HOOK": "post", "MUSTER_STATUS": result["status"]}
            post, post_failure = run_hooks(job.hooks.post, post_env, stop_on_failure=False)
            result["hooks"] += post
            if post_failure is not None:
                result["warnings"].append(f"post {post_failure}")
                if result["status"] == "success":
                    result["status"] = "warning"

    def _verify(self, job: Job) -> dict[str, Any]:
        from agent.actions.verify import run_verify
        from agent.archive import Archive, NoSnapshot

        repo, cache, key = self._open(job)
        test = job.restore_test
        try:
            outcome = run_verify(
                Archive(repo, [self.context.identity], cache),
                self.context.state_dir,
                sample=test.sample,
                max_duration=test.max_duration,
                repository_key=key,
                scratch=self.context.scratch,
            )
        except NoSnapshot as error:
            return {"status": "failure", "error": f"nothing to test: {error}"}
        warnings = []
        if outcome.stopped:
            warnings.append(
                f"stopped after max_duration {test.max_duration} s with "
                f"{len(outcome.volumes_tested)} volumes tested"
            )
        status = "failure" if not outcome.ok else "warning" if warnings else "success"
        return {
            "status": status,
            "snapshot": outcome.snapshot,
            "warnings": warnings,
            "error": redact("; ".join(outcome.failures))[:MAX_ERROR] or None,
            "stats": RunStats(
                files_checked=outcome.files_checked,
                files_failed=outcome.files_failed,
                volumes_tested=len(outcome.volumes_tested),
                coverage=round(outcome.coverage, 4),
                bytes_read=outcome.bytes_checked,
            ),
        }

    def _forget(self, job: Job) -> dict[str, Any]:
        from agent.actions.forget import run_forget

        repo, cache, _ = self._open(job)
        with cache.writer_lock():
            outcome = run_forget(repo, job.retention, dry_run=False)
        # Extra fields (receivers ignore what they do not know): what went, what it freed.
        return {
            "status": "success",
            "forgotten": [record.id for record in outcome.forgotten],
            "kept": len(outcome.kept),
            "freed_bytes": outcome.freed_bytes,
        }


# -- a run in a child process --------------------------------------------------------------


class ChildRunner:
    """`Runner.run` in a child process; the daemon relays what the child emits."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self._child: subprocess.Popen[bytes] | None = None

    def run(self, task: Task, job: Job) -> RunResult:
        started = utcnow()
        context = self.context
        request = {
            "node": context.node,
            "state_dir": str(context.state_dir),
            "status_interval": context.status_interval,
            "log_level": logging.getLogger().level,
            "kind": task.kind,
            "job": job.model_dump(mode="json"),
        }
        try:
            result, error = self._spawn(request)
        except OSError as spawn_error:  # no process (or no pipe): the run did not happen
            result, error = None, describe_error(spawn_error)
        if result is not None:
            return result
        return RunResult(
            node=context.node,
            job=job.name,
            run_id=new_id(),
            kind=task.kind,
            started=started,
            finished=utcnow(),
            status="interrupted" if context.stopping.is_set() else "failure",
            error=error,
        )

    def _spawn(self, request: dict[str, Any]) -> tuple[RunResult | None, str]:
        """Run the child to its end; its RunResult, or why there is none."""
        with subprocess.Popen(
            [sys.executable, "-m", "agent.daemon_run"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as child:
            self._child = child
            done = threading.Event()
            stopper = threading.Thread(target=self._stop_when_asked, args=(child, done))
            stopper.start()
            try:
                child.stdin.write(json.dumps(request).encode())  # type: ignore[union-attr]
                child.stdin.close()  # type: ignore[union-attr]
                result = self._relay(child.stdout)  # type: ignore[arg-type]
                status = child.wait()
            finally:
                done.set()
                stopper.join()
                self._child = None
        return result, f"the run's process exited with status {status} before its result"

    def _relay(self, lines: IO[bytes]) -> RunResult | None:
        """Emit what the child sends until it closes its stdout; return its RunResult."""
        result = None
        for line in lines:
            try:
                message = decode(line)
            except InvalidMessage as error:
                log.error("a run's process sent an invalid message: %s", error)
                continue
            if isinstance(message, RunResult):
                result = message
            else:
                self.context.emit(message)
        return result

    def _stop_when_asked(self, child: subprocess.Popen[bytes], done: threading.Event) -> None:
        """Pass the daemon's stop request on as SIGTERM: the child stops at a safe point."""
        while not done.is_set():
            if self.context.stopping.wait(0.2):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                return

    def kill(self) -> None:
        """The daemon leaves without waiting for the run: its process must not outlive it."""
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()


def _child_main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's side: one request in, the messages of one run out."""
    request = json.loads(stdin.read())
    logging.basicConfig(level=request["log_level"], format=LOG_FORMAT)
    stopping = threading.Event()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lock = threading.Lock()  # verify and backups emit from worker threads too

    def emit(message: Message) -> None:
        with lock:
            stdout.write(encode(message) + b"\n")
            stdout.flush()

    state_dir = Path(request["state_dir"])
    context = RunContext(
        node=request["node"],
        state_dir=state_dir,
        identity=age.load_identities(state_dir / IDENTITY_FILE)[0],
        status_interval=request["status_interval"],
        stopping=stopping,
        emit=emit,
    )
    job = Job.model_validate(request["job"])
    emit(Runner(context).run(Task(job.name, request["kind"]), job))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.stdin.buffer, sys.stdout.buffer))
