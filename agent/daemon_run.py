"""The agent daemon's runs: one backup, restore test or forget, turned into a RunResult.

`Runner` does a run in the calling process. `ChildRunner` does the same run in a forked
child process so that the daemon never loads the backup engine, the storage clients and
compression, and its memory is back to idle the moment a run ends (a run's imports,
buffers and heap fragmentation go away with the child). The child:

* writes every message it produces (run_status, then the RunResult) as one encoded line
  to a pipe; the daemon spools them, so the spool keeps one writer;
* treats SIGTERM and SIGINT as the daemon's stop request: the run stops at its next safe
  point and reports `interrupted`, exactly as in-process.

Nothing in this module imports the engine (nor cryptography) at import time: `Runner`
imports it per run. `call_in_child` does the same for the daemon's other cryptography,
the node identity and plan signatures, so that the daemon never loads it at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from agent.hooks import redact, run_hooks
from agent.scheduler import Task
from broker.codec import decode, encode
from broker.errors import ContractError, InvalidMessage
from broker.messages import Message, RunResult, RunStats, RunStatus, new_id
from broker.plan import Job
from broker.types import utcnow
from muster import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")

SCRATCH_DIR = "scratch"
MAX_WARNINGS = 100  # warnings carried by one result; the rest are counted
MAX_ERROR = 2000
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
    identity_file: Path
    status_interval: float
    stopping: threading.Event
    emit: Callable[[Message], None]

    @property
    def scratch(self) -> Path:
        return self.state_dir / SCRATCH_DIR


def describe_error(error: BaseException) -> str:
    """One line for a result's `error`: what went wrong, never a secret, bounded."""
    from agent import age  # cryptography: the daemon itself does without

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

    def _identity(self) -> Any:
        from agent import age

        return age.load_identities(self.context.identity_file)[0]

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
            outcome = run_backup(job, repo, self._identity(), cache, __version__, progress)
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
                Archive(repo, [self._identity()], cache),
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
    """`Runner.run` in a forked child process; the daemon relays what the child emits.

    Forked, not spawned: the child starts at once with what the daemon already holds (the
    contract models, the identity) and shares those pages with it, so daemon plus child
    use about what one process running the backup did. The fork happens on the worker
    thread; the child touches nothing of the broker thread's (no lock, no socket), writes
    only to its pipe and leaves with os._exit."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self._child: int | None = None

    def run(self, task: Task, job: Job) -> RunResult:
        started = utcnow()
        context = self.context
        try:
            result, error = self._fork(task, job)
        except OSError as fork_error:  # no process (or no pipe): the run did not happen
            result, error = None, describe_error(fork_error)
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

    def _fork(self, task: Task, job: Job) -> tuple[RunResult | None, str]:
        """Run the child to its end; its RunResult, or why there is none."""
        pid, end = fork_with_pipe()
        if pid == 0:  # the child
            os._exit(_child(self.context, task, job, end))
        self._child = pid
        done = threading.Event()
        stopper = threading.Thread(target=self._stop_when_asked, args=(pid, done))
        stopper.start()
        try:
            with os.fdopen(end, "rb") as lines:
                result = self._relay(lines)
            _, status = os.waitpid(pid, 0)
        finally:
            done.set()
            stopper.join()
            self._child = None
        code = os.waitstatus_to_exitcode(status)
        return result, f"the run's process exited with status {code} before its result"

    def _relay(self, lines: IO[bytes]) -> RunResult | None:
        """Emit what the child sends until it closes its pipe; return its RunResult."""
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

    def _stop_when_asked(self, pid: int, done: threading.Event) -> None:
        """Pass the daemon's stop request on as SIGTERM: the child stops at a safe point."""
        while not done.is_set():
            if self.context.stopping.wait(0.2):
                if not done.is_set():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                return

    def kill(self) -> None:
        """The daemon leaves without waiting for the run: its process must not outlive it."""
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGKILL)


def _child(parent: RunContext, task: Task, job: Job, write_end: int) -> int:
    """The forked child's side: run, send every message down the pipe. Returns the exit
    status (never raises: the child must not unwind into the daemon's code)."""
    try:
        stopping = threading.Event()

        def stop(_signum: int, _frame: FrameType | None) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if parent.stopping.is_set():  # asked before the handlers were ours
            stopping.set()
        _fresh_log_streams()
        out = os.fdopen(write_end, "wb")
        lock = threading.Lock()  # a backup's worker threads may report progress too

        def emit(message: Message) -> None:
            with lock:
                out.write(encode(message) + b"\n")
                out.flush()

        context = dataclasses.replace(parent, stopping=stopping, emit=emit)
        emit(Runner(context).run(task, job))
        out.close()
        return 0
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("the run's process failed")
        return 1


def _fresh_log_streams() -> None:
    """Give the child's log handlers streams of their own: a thread of the daemon may have
    been writing to the inherited ones at the fork, and their locks went with it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and hasattr(handler.stream, "fileno"):
            with contextlib.suppress(OSError, ValueError):
                fd = os.dup(handler.stream.fileno())
                handler.setStream(os.fdopen(fd, "w", buffering=1))


# -- one call in a child process -----------------------------------------------------------


_FORKING = threading.Lock()


def fork_with_pipe() -> tuple[int, int]:
    """Fork with a pipe from the child to the daemon: (pid, read end) here, (0, write end)
    in the child. One fork at a time (worker and broker thread both fork): a child forked
    meanwhile would inherit the write end, and the reader would see no end of file until
    that child exits. The daemon's objects are frozen for the fork: the child's garbage
    collections then leave them, and the pages it shares with the daemon, alone."""
    with _FORKING:
        read_end, write_end = os.pipe()
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            gc.unfreeze()
            raise
        if pid == 0:
            os.close(read_end)
            return 0, write_end
        gc.unfreeze()
        os.close(write_end)
        return pid, read_end


class ChildFailed(RuntimeError):
    """A child process ended without an answer."""


def call_in_child(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a forked child: its return value, or its exception raised
    here. For what needs a library the daemon should not keep loaded (cryptography: a
    plan's signature, the node identity); costs a fork, a few milliseconds."""
    pid, end = fork_with_pipe()
    if pid == 0:  # the child
        status = 1
        try:
            try:
                answer = (True, function(*args))
            except Exception as error:
                answer = (False, error)
            with os.fdopen(end, "wb") as out:
                out.write(pickle.dumps(answer))
            status = 0
        finally:
            os._exit(status)
    with os.fdopen(end, "rb") as answers:
        data = answers.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        code = os.waitstatus_to_exitcode(status)
        raise ChildFailed(f"{function.__name__} ended with status {code} and no answer")
    ok, value = pickle.loads(data)  # from our own fork: trusted
    if ok:
        return value
    raise value


def call_here(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in this process: what `call_in_child` does, without the fork."""
    return function(*args)
