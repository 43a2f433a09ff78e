"""`muster agent run`: the node's agent. It announces itself, follows its signed plan and
reports every run, whether the broker is there or not.

Three threads, each with one job:

* the **broker thread** owns the one AMQP connection (kombu connections are not thread-safe).
  It connects with backoff, declares the topology and the node's plan queue, announces the
  node (on start and on every reconnect), sends a keepalive with the facts every
  `keepalive_interval`, consumes the plan queue and delivers the spool, oldest first,
  removing each file only after RabbitMQ confirmed it;
* the **worker thread** asks the scheduler what is due and runs it: one run at a time (a
  node backs up one job after the other, which keeps the load it puts on itself and on
  storage predictable). A backup's progress callback spools throttled `run_status`
  messages and is also where a stop request interrupts it;
* the **main thread** waits for SIGTERM/SIGINT, then stops the worker at a safe point, lets
  the broker thread deliver what is spooled, and exits 0.

Plans are verified before they are stored (`agent.planstore`); on start the stored plan is
verified again and run at once, broker or not. Results and alerts go through the spool
(`agent.spool`), so a broker outage delays them and loses none.

Memory: `muster agent run` does each run, and each use of cryptography (the identity, plan
signatures), in a forked child process (`agent.daemon_run`); so are plans validated, cron
times computed (croniter) and the node's facts collected. The daemon itself holds only
kombu, the contract models and its settings, stays at the same size before and after runs,
and never imports the backup engine, storage clients, zstd, cryptography, croniter or the
fact collectors (tests/unit/test_daemon.py checks the imports).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from amqp.exceptions import AMQPError
from kombu import Connection, Consumer
from kombu.exceptions import KombuError
from kombu.message import Message as Delivery

from agent.daemon_run import (
    SCRATCH_DIR,
    ChildFailed,
    ChildRunner,
    RunContext,
    Runner,
    call_here,
    call_in_child,
)
from agent.hooks import redact
from agent.planstore import PlanRejected, PlanStore
from agent.scheduler import STATE_FILE, CronWindows, Scheduler, Task, cron_window
from agent.spool import Spool
from broker.agent_config import AgentSettings
from broker.codec import decode
from broker.connection import Publisher, body_bytes, connect
from broker.errors import InvalidMessage
from broker.messages import (
    Alert,
    Announce,
    Facts,
    Keepalive,
    Message,
    RunResult,
    SignedPlan,
    new_id,
)
from broker.topology import declare, plan_queue
from broker.types import utcnow
from muster import __version__

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.txt"  # as agent.context.IDENTITY_FILE
SPOOL_DIR = "spool"
LOCK_FILE = "agent.lock"
KILL_WAIT = 5.0  # seconds for the worker to report a run whose process was killed
DRAIN_TIMEOUT = 0.5  # seconds the broker thread waits for a delivery before other chores
PUBLISH_RETRY: dict[str, Any] = {"max_retries": 0}  # a failed publish means: reconnect
SCHEDULE_RETRY = 60.0  # seconds before the worker asks again for schedule times it could not get


# -- identity ------------------------------------------------------------------------------


def ensure_identity(state_dir: Path) -> Any:
    """The node's age identity, generated on first start (mode 0600). Only its recipient
    ever leaves the node."""
    from agent import age

    path = state_dir / IDENTITY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = age.Identity.generate()
        with contextlib.suppress(age.AgeError):  # another process just wrote one: use it
            age.write_identity(path, identity)
            log.warning(
                "generated this node's age identity in %s (recipient %s): keep a copy of it "
                "away from this node, backups cannot be decrypted without it",
                path,
                identity.recipient,
            )
    return age.load_identities(path)[0]


def node_recipient(state_dir: Path) -> str:
    """The recipient the announce carries (the identity generated first if need be)."""
    return str(ensure_identity(state_dir).recipient)


def node_facts(settings: AgentSettings) -> Facts:
    """The node's facts (agent.facts). The daemon collects them in a child: it then holds
    neither ipaddress nor, on a cloud node, the HTTP client that asks the metadata service."""
    from agent.facts import FactSources, collect

    return collect(
        FactSources(
            labels=settings.labels,
            cloud_init_path=settings.cloud_init_path,
            config_drive_path=settings.config_drive_path,
            metadata_url=settings.metadata_url,
            metadata_timeout=settings.metadata_timeout,
        )
    )


def check_trusted_keys(paths: list[Path]) -> None:
    """Refuse to start with a trusted key file that is not an Ed25519 public key."""
    from broker.signing import TrustedKeys

    TrustedKeys.from_files(paths)


def verify_signed(signed: SignedPlan, key_files: list[Path], node: str) -> None:
    """Raise SignatureError unless `signed` is signed by one of the keys and for `node`."""
    from broker.signing import TrustedKeys, verify_plan

    verify_plan(signed, TrustedKeys.from_files(key_files), node)


class Backoff:
    """0.5 s, 1 s, 2 s ... up to `maximum`, each with +-20 % jitter so a fleet that lost
    its broker does not come back in lockstep."""

    def __init__(self, first: float = 0.5, maximum: float = 30.0) -> None:
        self.first = first
        self.maximum = maximum
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = min(self._next, self.maximum)
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(0.8, 1.2)


# -- the agent -----------------------------------------------------------------------------


class Agent:
    """One node's agent: `run()` blocks until `stop()` (or a signal, via the CLI).

    With `isolated_runs` each backup, restore test and forget runs in a child process
    (agent.daemon_run.ChildRunner), and so does what needs cryptography (the identity, plan
    signatures): `muster agent run` does so, to keep the daemon small; without it all of
    it happens in this process (on the worker thread for runs)."""

    def __init__(
        self,
        settings: AgentSettings,
        clock: Callable[[], datetime] | None = None,
        isolated_runs: bool = False,
    ) -> None:
        self.settings = settings
        self.node = settings.node
        self.state_dir = settings.state_dir
        self.clock = clock or (lambda: datetime.now().astimezone())
        self.stopping = threading.Event()  # stop at the next safe point
        self.closing = threading.Event()  # the worker is done: deliver what is left, then go
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._started = time.monotonic()
        self._facts: Facts | None = None
        self._facts_time = 0.0
        self._rejection_open = False
        self.last_rejection = ""
        self._threads: list[threading.Thread] = []

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scratch = self.state_dir / SCRATCH_DIR
        self.scratch.mkdir(mode=0o700, exist_ok=True)
        self._call = call_in_child if isolated_runs else call_here
        self.recipient = self._call(node_recipient, self.state_dir)
        missing = [str(p) for p in settings.trusted_keys if not Path(p).is_file()]
        if missing:
            raise InvalidMessage(f"trusted key file(s) not found: {', '.join(missing)}")
        self._call(check_trusted_keys, settings.trusted_keys)
        if not settings.trusted_keys:
            log.warning(
                "no trusted_keys configured: every plan will be refused; pin the rule "
                "engine's public key (MUSTER_TRUSTED_KEYS or trusted_keys in %s)",
                AgentSettings.default_file,
            )
        self.spool = Spool(
            self.state_dir / SPOOL_DIR, settings.spool_max_files, settings.spool_max_bytes
        )
        # Validating a plan (a cron schedule loads croniter) and computing cron times happen
        # where the cryptography does: in a child, with `isolated_runs`.
        self.plans = PlanStore(self.state_dir, self._verify, self._validate_plan)
        cron = CronWindows(partial(self._call, cron_window))
        self.scheduler = Scheduler(self.node, self.clock, self.state_dir / STATE_FILE, cron)
        context = RunContext(
            node=self.node,
            state_dir=self.state_dir,
            identity_file=self.state_dir / IDENTITY_FILE,
            status_interval=settings.status_interval,
            stopping=self.stopping,
            emit=self.emit,
        )
        self.runner = ChildRunner(context) if isolated_runs else Runner(context)
        try:
            plan = self.plans.load()
        except PlanRejected as error:
            log.error("%s", error)
            self._reject(str(error), {"stored": True})
            plan = None
        if plan is not None:
            log.info("following the stored plan %s (issued %s)", plan.content_hash(), plan.issued)
            self.scheduler.set_plan(plan)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Take the state directory (one agent per state dir), start the worker and broker
        threads."""
        self._lock = (self.state_dir / LOCK_FILE).open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise InvalidMessage(
                f"another agent is running with state dir {self.state_dir}"
            ) from None
        shutil.rmtree(self.scratch, ignore_errors=True)  # what an interrupted verify left
        self.scratch.mkdir(mode=0o700)
        for name, target in (("muster-worker", self._work), ("muster-broker", self._broker)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def run(self) -> int:
        """Start, wait for `stop()`, shut down in order. Returns the exit status (0)."""
        self.start()
        while not self.stopping.wait(1):
            pass
        return self.shutdown()

    def shutdown(self) -> int:
        worker, broker = self._threads
        worker.join(self.settings.stop_timeout)
        if worker.is_alive() and isinstance(self.runner, ChildRunner):
            log.error(
                "the running task did not reach a safe point within %s s; killing its process",
                self.settings.stop_timeout,
            )
            self.runner.kill()  # the worker then reports the run interrupted itself
            worker.join(KILL_WAIT)
        if worker.is_alive():
            log.error(
                "the running task did not reach a safe point within %s s; leaving it",
                self.settings.stop_timeout,
            )
            for task in self.scheduler.running:
                self._abandoned(task)
        self.closing.set()
        broker.join(10)
        return 0

    # -- messages ------------------------------------------------------------------------

    def emit(self, message: Message) -> None:
        """Spool a message for the broker thread to deliver (results, alerts, progress)."""
        self.spool.add(message)

    def facts(self, refresh: bool = False) -> Facts:
        now = time.monotonic()
        if refresh or self._facts is None or now - self._facts_time >= self.settings.facts_interval:
            try:
                self._facts = self._call(node_facts, self.settings)
            except (OSError, ChildFailed) as error:
                if self._facts is None:
                    raise
                # a fork refused under memory pressure: the facts held are a few minutes old
                log.warning("could not collect the node's facts (%s); keeping the last", error)
            self._facts_time = now
        return self._facts

    def _verify(self, signed: SignedPlan) -> None:
        self._call(verify_signed, signed, self.settings.trusted_keys, self.node)

    def _validate_plan(self, data: Any) -> SignedPlan:
        return self._call(SignedPlan.model_validate, data)

    @property
    def plan_hash(self) -> str | None:
        plan = self.plans.plan
        return plan.content_hash() if plan is not None else None

    def announce(self) -> Announce:
        return Announce(
            node=self.node,
            facts=self.facts(),
            agent_version=__version__,
            recipient=self.recipient,
            plan_hash=self.plan_hash,
        )

    def keepalive(self) -> Keepalive:
        return Keepalive(
            node=self.node,
            plan_hash=self.plan_hash,
            uptime=round(time.monotonic() - self._started, 3),
            interval=self.settings.keepalive_interval,
            running=sorted({task.job for task in self.scheduler.running}),
            facts=self.facts(),
        )

    # -- plans ---------------------------------------------------------------------------

    def receive_plan(self, body: bytes) -> str:
        """Handle one delivery of the plan queue; returns what happened, for the log. Invalid
        and refused plans raise a plan_rejected alert; the plan held stays in force."""
        try:
            message = self._call(decode, body)
        except InvalidMessage as error:
            self._reject(f"not a valid plan message: {error}", {})
            return "invalid"
        if not isinstance(message, SignedPlan):
            self._reject(f"a {message.type} message on the plan queue", {"id": message.id})
            return "invalid"
        details = {
            "id": message.id,
            "key_id": message.signature.key_id,
            "plan_node": message.plan.node,
            "issued": message.plan.issued.isoformat(),
        }
        try:
            changed = self.plans.offer(message)
        except PlanRejected as error:
            self._reject(str(error), details)
            return "rejected"
        if self._rejection_open:
            self._rejection_open = False
            self.emit(self._alert("resolved", "the node accepted a valid plan again", details))
        if changed:
            plan = message.plan
            log.warning(
                "new plan %s issued %s: %d jobs", plan.content_hash(), plan.issued, len(plan.jobs)
            )
            self.scheduler.set_plan(plan)
            self._wake.set()
            return "accepted"
        return "unchanged"

    def _reject(self, reason: str, details: dict[str, Any]) -> None:
        log.error("refused a plan: %s", reason)
        self.last_rejection = reason
        self._rejection_open = True
        self.emit(self._alert("open", f"{self.node} refused a plan: {reason}", details))

    def _alert(self, state: str, summary: str, details: dict[str, Any]) -> Alert:
        return Alert(
            key=f"plan_rejected:{self.node}",
            kind="plan_rejected",
            state=state,  # type: ignore[arg-type]
            severity="critical",
            source="agent",
            node=self.node,
            summary=summary[:1000],
            details=details,
        )

    # -- worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    due = self.scheduler.due()
                    wakeup = None if due else self.scheduler.next_wakeup()
                except (OSError, ChildFailed) as error:
                    # Cron times come from a child process: a fork refused under memory
                    # pressure delays the schedule; it does not stop the agent.
                    log.error("could not compute the schedule (%s); trying again", error)
                    self._wake.wait(SCHEDULE_RETRY)
                    continue
                if not due:
                    self._sleep_until(wakeup)
                    continue
                self._execute(due[0])
        except Exception:
            log.exception("the worker thread failed; stopping the agent")
            self.stop()

    def _sleep_until(self, when: datetime | None) -> None:
        seconds = 60.0 if when is None else (when - self.clock()).total_seconds()
        self._wake.wait(min(max(seconds, 0.05), 60.0))
        self._wake.clear()

    def _execute(self, task: Task) -> None:
        tasks = [task]
        while tasks and not self.stopping.is_set():
            task = tasks.pop(0)
            job = self.scheduler.job(task.job)
            if job is None:  # the plan dropped the job meanwhile
                self.scheduler.finished(task, "interrupted")
                continue
            if task.slot is not None:
                self.scheduler.start(task)
            log.info("%s of job %s starts", task.kind, task.job)
            result = self.runner.run(task, job)
            self._report(result)
            tasks += self.scheduler.finished(task, result.status)
        for left in tasks:  # follow-ups a stop request cut off
            self.scheduler.finished(left, "interrupted")

    def _report(self, result: RunResult) -> None:
        levels = {"success": logging.INFO, "warning": logging.INFO, "interrupted": logging.WARNING}
        log.log(
            levels.get(result.status, logging.ERROR),
            "%s of job %s: %s%s",
            result.kind,
            result.job,
            result.status,
            f" ({result.error})" if result.error else "",
        )
        self.emit(result)

    def _abandoned(self, task: Task) -> None:
        """A task still running at exit: report it interrupted ourselves."""
        now = utcnow()
        self.emit(
            RunResult(
                node=self.node,
                job=task.job,
                run_id=new_id(),
                kind=task.kind,
                status="interrupted",
                started=now,
                finished=now,
                error="the agent stopped while this run was still going; it is caught up "
                "when the agent is back",
            )
        )

    # -- broker thread -------------------------------------------------------------------

    def _broker(self) -> None:
        backoff = Backoff(maximum=self.settings.reconnect_max)
        urls = self.settings.broker_urls
        while not self.closing.is_set():
            try:
                with connect(urls, self.settings.heartbeat) as connection:
                    # each URL once, without kombu's own sleeps: the backoff is ours
                    connection.ensure_connection(
                        max_retries=len(urls) - 1, interval_start=0, interval_step=0
                    )
                    self._session(connection, backoff)
                return
            except Exception as error:
                self.connected.clear()
                delay = backoff.next()
                expected = isinstance(error, OSError | KombuError | AMQPError)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "broker %s unreachable (%s); %d messages spooled; retrying in %.1f s",
                    redact(self.settings.broker_url),
                    redact(str(error) or type(error).__name__),
                    len(self.spool),
                    delay,
                    exc_info=not expected or log.isEnabledFor(logging.DEBUG),
                )
                self.closing.wait(delay)

    def _session(self, connection: Connection, backoff: Backoff) -> None:
        declare(connection)
        channel = connection.default_channel
        queue = plan_queue(self.node)(channel)
        queue.declare()
        publisher = Publisher(channel, retry_policy=PUBLISH_RETRY)
        publisher.publish(self.announce())
        log.info("connected to %s; announced %s", connection.as_uri(), self.node)
        # Deliveries are only collected by the callback and handled between two waits: a
        # publish waits for its confirm, and py-amqp dispatches deliveries that arrive
        # meanwhile re-entrantly; a callback that published in turn could hang.
        deliveries: list[Delivery] = []
        consumer = Consumer(channel, queues=[queue], on_message=deliveries.append, prefetch_count=1)
        consumer.consume()
        self.connected.set()
        backoff.reset()
        self.spool.changed.set()
        next_keepalive = time.monotonic() + self.settings.keepalive_interval
        while True:
            while deliveries:
                self._on_plan(deliveries.pop(0), publisher, queue.name)
            if self.spool.changed.is_set():
                self.spool.changed.clear()
                self._deliver(publisher)
            if self.closing.is_set():
                with contextlib.suppress(Exception):
                    consumer.cancel()
                self.connected.clear()
                return
            if time.monotonic() >= next_keepalive:
                next_keepalive = time.monotonic() + self.settings.keepalive_interval
                publisher.publish(self.keepalive())
            if not deliveries:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=DRAIN_TIMEOUT)
            connection.heartbeat_check()

    def _deliver(self, publisher: Publisher) -> None:
        """Publish the spool, oldest first; each file goes once RabbitMQ confirmed it."""
        for entry in self.spool.pending():
            message = self.spool.read(entry)
            if message is None:
                continue
            publisher.publish(message)
            self.spool.remove(entry)

    def _on_plan(self, delivery: Delivery, publisher: Publisher, queue: str) -> None:
        body = body_bytes(delivery)
        try:
            what = self.receive_plan(body)
        except Exception:
            # Acknowledged anyway: the keepalive still names the old plan hash, so the rule
            # engine sends the plan again within one interval; a requeue would only loop.
            log.exception("could not handle a plan delivery")
            what = "failed"
        if what == "invalid":
            publisher.dead_letter(delivery, self.last_rejection, queue)
        delivery.ack()
        log.info("plan delivery: %s", what)
