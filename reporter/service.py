"""The reporter process: `muster.reporter` in, MongoDB out, in batches.

Deliveries are decoded as they arrive (an invalid one is dead-lettered and acknowledged at
once, as by every `ContractConsumer`) and held, unacknowledged, in a batch. The batch is
written when it holds `batch_size` messages or its oldest has waited `flush_interval`
seconds: one unordered bulk write per collection, then one journaled barrier write, then
one acknowledgement (`multiple`) for the whole batch. A message is therefore acknowledged
only once what it says is durable in MongoDB; a crash before that leaves it unacknowledged
and RabbitMQ delivers it again, which rewrites the same documents (see reporter.ingest).

Batches are written on a writer thread of their own while the next batch fills: receiving
and decoding (the consumer thread) and MongoDB's work on the last batch overlap instead of
taking turns, which about doubles the ingest rate. At most one batch is in flight and they
are written in order, so the consumer thread settles them in delivery order (a `multiple`
acknowledgement never covers a message still unwritten); it alone touches the channel.

When MongoDB fails, the batch stays unacknowledged and is written again after a back-off
(0.5 s doubling to `retry_max`). The prefetch count (2 x batch_size by default) bounds
what RabbitMQ hands over meanwhile, so consuming stops by itself until MongoDB is back.
Messages are never requeued for a MongoDB failure: a quorum queue dead-letters a message
after five requeues, and an outage is not the message's fault. A write error that names a
message (a document MongoDB refuses) requeues just that message, and the queue's
delivery limit dead-letters it if it keeps failing.

The watchdog (reporter.watchdog) runs between deliveries in the same thread, every
`watchdog_interval` seconds, or again soon while a mass event leaves it unfinished. It
judges silence by `watermark` (the median sender time of the newest written batch) while
the queue holds a backlog.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from kombu import Connection
from kombu.message import Message as Delivery
from pymongo.errors import BulkWriteError, PyMongoError

from broker.connection import ContractConsumer, acknowledge
from broker.messages import AnyMessage
from broker.reporter_config import ReporterSettings
from broker.topology import REPORTER_QUEUE
from broker.types import utcnow
from reporter.ingest import Write, Writes, build_writes
from reporter.store import LANES, Store
from reporter.transport import buffered
from reporter.watchdog import Watchdog, advance_watermark

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
# Writes go in this order: history first, alerts last; none depends on another.
ORDER = ("alert_history", "runs", "jobs", "nodes", "alerts")


@dataclass
class Held:
    delivery: Delivery | None
    message: AnyMessage


@dataclass
class Batch:
    """A batch handed to the writer thread; `generation` names the broker connection its
    deliveries came on (only that connection can acknowledge them)."""

    held: list[Held]
    generation: int
    oldest: float
    started: float
    future: Future[set[int]]


class StoreUnavailable(Exception):
    """MongoDB could not take the batch; it stays unacknowledged and is retried."""


def write_batch(
    store: Store,
    messages: Sequence[AnyMessage],
    received: datetime,
    settings: ReporterSettings,
    *,
    fast: bool = True,
) -> set[int]:
    """Write what `messages` say; returns the indices of messages MongoDB refused for good.

    Raises StoreUnavailable when the batch must be retried as a whole. Without `fast`,
    guarded pipelines only (see reporter.ingest).
    """
    writes = build_writes(messages, received, history=settings.overdue_history, fast=fast)
    lanes = [store.lanes.submit(_write_lane, store, writes, lane) for lane in range(1, LANES)]
    try:
        refused = _write_lane(store, writes, 0)
    finally:
        wait(lanes)  # a retry must not overlap a lane still writing
    try:
        for lane in lanes:
            refused |= lane.result()
        store.barrier()
    except PyMongoError as error:
        raise StoreUnavailable(str(error)) from error
    return refused


def _write_lane(store: Store, writes: Writes, lane: int) -> set[int]:
    """Every `LANES`-th write of each collection, from the `lane`-th on. A batch holds one
    write per document, so lanes never write the same document (but for alert history
    inserts of one message delivered twice, where a duplicate means done)."""
    refused: set[int] = set()
    try:
        for name in ORDER:
            batch = writes.by_collection.get(name, [])[lane::LANES]
            if batch:
                refused |= _bulk(store, name, batch)
    except PyMongoError as error:
        raise StoreUnavailable(str(error)) from error
    return refused


def _bulk(store: Store, name: str, writes: list[Write], attempt: int = 0) -> set[int]:
    """One unordered bulk write; returns the indices of messages refused for good.

    A duplicate key means one of three things: an insert by message id that is already
    there (done), a fast-path write whose document holds something newer (sent again as
    its guarded pipeline), or two instances upserting one new document (sent again).
    """
    try:
        store.db[name].bulk_write(
            [write.fast or write.operation for write in writes], ordered=False
        )
    except BulkWriteError as error:
        details = error.details
        if details.get("writeConcernErrors"):
            raise
        retry: list[Write] = []
        refused: set[int] = set()
        for problem in details.get("writeErrors", []):
            write = writes[problem["index"]]
            if problem.get("code") == DUPLICATE_KEY:
                if not write.duplicate_ok:
                    retry.append(replace(write, fast=None))
            else:
                log.error("MongoDB refused a %s write: %s", name, problem.get("errmsg"))
                refused.update(write.messages)
        if retry:
            if attempt >= 2:
                raise
            refused |= _bulk(store, name, retry, attempt + 1)
        return refused
    return set()


class Reporter(ContractConsumer):
    """One reporter instance: a `ContractConsumer` on `muster.reporter` writing in batches."""

    def __init__(
        self,
        connection: Connection,
        store: Store,
        settings: ReporterSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
        instance: str | None = None,
        watchdog: bool = True,
    ) -> None:
        super().__init__(
            buffered(connection),
            [REPORTER_QUEUE],
            self._not_used,
            prefetch=settings.effective_prefetch,
        )
        self.store = store
        self.settings = settings
        self.clock = clock
        self.instance = instance or socket.gethostname()
        self.ready = threading.Event()
        self.counts: Counter[str] = Counter()
        self.watermark: datetime | None = None
        self.watchdog = Watchdog(
            store,
            self.publisher.publish,
            settings,
            clock,
            backlog=self.queue_depth,
            watermark=lambda: self.watermark,
        )
        self._watchdog_on = watchdog
        self._held: list[Held] = []
        self._writing: Batch | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reporter-writer")
        self._generation = 0
        self._channel: Any = None  # the consuming channel, once consuming
        self._oldest = 0.0
        self._retry_at = 0.0
        self._failures = 0
        self._next_watchdog = 0.0
        self.mongo_up = True
        self.last_flush: dict[str, float] = {}

    def _not_used(self, message: AnyMessage) -> None:  # pragma: no cover - see _on_message
        raise AssertionError("the reporter handles deliveries in _on_message")

    # -- kombu hooks --------------------------------------------------------------------

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("safety_interval", min(0.2, self.settings.flush_interval))
        try:
            super().run(_tokens, **kwargs)
        finally:
            self._writer.shutdown(wait=True)

    def on_connection_revived(self) -> None:
        """A new connection: deliveries held from the old one come again, with new tags
        (a batch still writing is written, but no longer acknowledged)."""
        if self.held_count():
            log.warning("broker connection lost: %d held messages come again", self.held_count())
        self._held = []
        self._generation += 1

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Sequence[Any]) -> None:
        self._channel = channel  # kombu consumes on a clone of self.connection
        log.info(
            "reporter %s consuming %s into %s/%s; batches of %d, prefetch %d",
            self.instance,
            REPORTER_QUEUE.name,
            self.settings.mongo_location,
            self.settings.database,
            self.settings.batch_size,
            self._prefetch,
        )
        self.ready.set()

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        """Stopping: write and acknowledge what is held while the channel is still open."""
        self.flush(force=True)

    def _on_message(self, queue: str, delivery: Delivery) -> None:
        message = self.decoded(queue, delivery)
        if message is None:
            self.counts["dead_lettered"] += 1
            return
        if not self._held:
            self._oldest = time.monotonic()
        self._held.append(Held(delivery, message))
        if len(self._held) >= self.settings.batch_size:
            self._collect(wait=True)  # one batch writes while the next one fills
            self.flush()

    def on_iteration(self) -> None:
        self._collect(wait=False)
        now = time.monotonic()
        if self._held and now - self._oldest >= self.settings.flush_interval:
            self.flush()
        if self._watchdog_on and now >= self._next_watchdog:
            self._next_watchdog = now + self.settings.watchdog_interval
            self.run_watchdog()
        super().on_iteration()

    # -- batches ------------------------------------------------------------------------

    def held_count(self) -> int:
        """Messages received and not yet acknowledged: the next batch and the one writing."""
        return len(self._held) + (len(self._writing.held) if self._writing else 0)

    def flush(self, force: bool = False) -> bool:
        """Start writing the held batch on the writer thread; False if it cannot start yet
        (a batch is still writing, or MongoDB failed and the back-off has not passed).

        With `force` (stopping) it waits for the write in flight, then writes what is held
        and waits for that too.
        """
        if force:
            self._collect(wait=True)
        elif self._writing is not None or time.monotonic() < self._retry_at:
            return False
        if not self._held:
            return False
        held, self._held = self._held, []
        future = self._writer.submit(
            write_batch, self.store, [h.message for h in held], self.clock(), self.settings
        )
        self._writing = Batch(held, self._generation, self._oldest, time.monotonic(), future)
        if force:
            self._collect(wait=True)
        return True

    def _collect(self, wait: bool) -> None:
        """Settle the batch in flight once written: acknowledge it, or on a MongoDB failure
        put it back in front of the held messages to be written again after a back-off."""
        batch = self._writing
        if batch is None or (not wait and not batch.future.done()):
            return
        self._writing = None
        try:
            refused = batch.future.result()
        except StoreUnavailable as error:
            self._failed(batch, error)
            return
        if batch.generation != self._generation:
            return  # its deliveries died with their connection; they come again
        if not self.mongo_up:
            log.warning("MongoDB is back: %d held messages written", len(batch.held))
        self._failures, self._retry_at, self.mongo_up = 0, 0.0, True
        self._settle(batch.held, refused)
        self.watermark = advance_watermark(
            self.watermark, [h.message for h in batch.held], self.clock()
        )
        for item in batch.held:
            self.counts[item.message.type] += 1
        self.counts["batches"] += 1
        self.last_flush = {"size": len(batch.held), "seconds": time.monotonic() - batch.started}

    def _failed(self, batch: Batch, error: StoreUnavailable) -> None:
        self._failures += 1
        delay = min(0.5 * 2 ** (self._failures - 1), self.settings.retry_max)
        self._retry_at = time.monotonic() + delay
        self.mongo_up = False
        self.counts["mongo_failures"] += 1
        log.warning(
            "MongoDB unavailable (%s); %d messages held unacknowledged, retry in %.1f s",
            str(error).splitlines()[0][:300],
            len(batch.held) + len(self._held),
            delay,
        )
        if batch.generation == self._generation:
            self._held = batch.held + self._held
            self._oldest = batch.oldest

    def _settle(self, held: list[Held], refused: set[int]) -> None:
        """Requeue what MongoDB refused, then acknowledge the rest together (on AMQP one
        `multiple` ack of the last tag: every earlier tag is held here or already settled)."""
        written = []
        for index, item in enumerate(held):
            if item.delivery is None:
                continue
            if index in refused:
                item.delivery.requeue()
                self.counts["refused"] += 1
            else:
                written.append(item.delivery)
        acknowledge(written)

    def run_watchdog(self) -> None:
        """A tick left unfinished goes on after as long again for deliveries."""
        try:
            self.watchdog.tick()
        except PyMongoError as error:
            log.warning("watchdog skipped: MongoDB unavailable (%s)", str(error)[:300])
        if self.watchdog.unfinished:
            self._next_watchdog = time.monotonic() + self.watchdog.budget

    def queue_depth(self) -> int | None:
        """Messages waiting in `muster.reporter` (not those delivered and unacknowledged),
        by a passive declare on the consuming channel (the connection's own before
        consuming starts); None when the broker cannot say."""
        channel = self._channel or self.connection.default_channel
        try:
            declared = channel.queue_declare(queue=REPORTER_QUEUE.name, passive=True)
        except Exception as error:  # the broker is away: judge by the wall clock
            log.warning("cannot read the depth of %s: %s", REPORTER_QUEUE.name, error)
            return None
        return declared.message_count

    def stop(self) -> None:
        self.should_stop = True
