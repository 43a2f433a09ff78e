"""The central part of a fleet, the rule engine and the reporter, in threads of one process.

`muster up` runs them as threads, not child processes: both spend their time waiting on
the broker and MongoDB, so one interpreter serves both (the GIL is no limit at this
size), one configuration and one Ctrl-C govern both, and `--embedded` can put them on
kombu's in-memory transport, which only connects threads of one process. A deployment
that must scale runs `muster ruleengine run` and `muster reporter run` instead, as many
as it needs: the same classes, the same queues.
"""

from __future__ import annotations

import logging
import threading

from kombu import Connection
from pymongo.errors import PyMongoError

from broker.connection import connect
from broker.signing import load_signing_key
from broker.topology import declare
from broker.up_config import UpSettings
from reporter.service import Reporter
from reporter.store import Store
from ruleengine.engine import RuleEngine, RulesWatcher

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
JOIN_TIMEOUT = 15.0


class CentralError(RuntimeError):
    """A central component could not start; the message says which and why."""


class Central:
    """`start()` returns once both consume; `stop()` lets the reporter write what it
    holds, then closes everything it opened."""

    def __init__(self, settings: UpSettings, instance: str = "muster-up") -> None:
        self.settings = settings
        self.instance = instance
        self.engine: RuleEngine | None = None
        self.reporter: Reporter | None = None
        self.store: Store | None = None
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        settings = self.settings
        self.store = Store.from_settings(settings, self.instance)
        try:
            self.store.ensure_indexes()
        except PyMongoError as error:
            raise CentralError(
                f"cannot reach MongoDB at {settings.mongo_location}: {error}"
            ) from None
        self.engine = RuleEngine(
            self._connect(),
            RulesWatcher(settings.rules),
            load_signing_key(settings.signing_key),
            reload_interval=settings.reload_interval,
            instance=self.instance,
        )
        self.reporter = Reporter(self._connect(), self.store, settings, instance=self.instance)
        self._run("muster-ruleengine", self.engine)
        self._run("muster-reporter", self.reporter)
        for name, ready in (("rule engine", self.engine.ready), ("reporter", self.reporter.ready)):
            if not ready.wait(READY_TIMEOUT):
                raise CentralError(f"the {name} did not start consuming in {READY_TIMEOUT} s")

    def _connect(self) -> Connection:
        connection = connect(self.settings.broker_urls, self.settings.heartbeat)
        declare(connection)
        self._connections.append(connection)
        return connection

    def _run(self, name: str, consumer: RuleEngine | Reporter) -> None:
        thread = threading.Thread(target=consumer.run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        for consumer in (self.engine, self.reporter):
            if consumer is not None:
                consumer.stop()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.error("%s did not stop within %s s", thread.name, JOIN_TIMEOUT)
        for connection in self._connections:
            connection.release()
        if self.store is not None:
            self.store.close()
