"""kombu connections, publishing and safe consuming, the same for every process.

Every publish waits for the broker's confirm, so "published" means "stored by RabbitMQ".
Every consumer goes through `ContractConsumer`, so a malformed message is dead-lettered
with its reason instead of crashing a process or looping forever.
"""

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from amqp.exceptions import MessageNacked
from kombu import Connection, Producer, Queue
from kombu.message import Message as Delivery
from kombu.mixins import ConsumerMixin

from broker.codec import CONTENT_TYPE, decode, encode
from broker.errors import InvalidMessage
from broker.messages import AnyMessage, Message
from broker.topology import DEAD, EVENTS, PERSISTENT_TYPES, PLANS, routing_key

log = logging.getLogger(__name__)

# Back off 0.5 s, 1.5 s, 2.5 s ... up to 10 s between attempts.
RETRY_POLICY: dict[str, Any] = {
    "interval_start": 0.5,
    "interval_step": 1,
    "interval_max": 10,
    "max_retries": 5,
}
REASON_HEADER = "x-muster-reason"
QUEUE_HEADER = "x-muster-queue"


def connect(urls: Sequence[str], heartbeat: int = 20, connect_timeout: float = 10) -> Connection:
    """A lazy connection that fails over round-robin across the given broker URLs."""
    return Connection(
        ";".join(urls),
        heartbeat=heartbeat,
        connect_timeout=connect_timeout,
        failover_strategy="round-robin",
        transport_options={"confirm_publish": True, **RETRY_POLICY},
    )


class _TracksReturns:
    """Mandatory publishing: RabbitMQ hands an unroutable message back before it confirms
    it; its id is kept in `_returned` (each class makes the set)."""

    _returned: set[str]

    def _on_return(self, error: Exception, exchange: str, key: str, returned: Any) -> None:
        self._returned.add(returned.properties.get("message_id", ""))


class Publisher(_TracksReturns):
    """Publishes contract messages with confirms, persistence and retries."""

    def __init__(self, channel: Any, retry_policy: dict[str, Any] | None = None):
        self._producer = Producer(channel, on_return=self._on_return)
        self._retry_policy = retry_policy or RETRY_POLICY
        self._returned: set[str] = set()

    def publish(self, message: Message, mandatory: bool = False) -> bool:
        """Publish and wait for the confirm. With `mandatory`, returns False when no queue
        took the message: RabbitMQ hands an unroutable mandatory message back before it
        confirms it, so the answer is known without asking whether the queue exists."""
        self._send(encode(message), mandatory=mandatory, **publish_options(message))
        if message.id in self._returned:
            self._returned.discard(message.id)
            return False
        return True

    def dead_letter(self, delivery: Delivery, reason: str, queue: str) -> None:
        """Park a message we cannot process, byte for byte, with the reason an operator
        needs. It may not even be text, so it travels as binary."""
        headers = dict(delivery.headers or {})
        headers.update({REASON_HEADER: reason[:2000], QUEUE_HEADER: queue})
        self._send(
            body_bytes(delivery),
            content_type=delivery.content_type or "application/octet-stream",
            content_encoding="binary",
            exchange=DEAD.name,
            routing_key=delivery.delivery_info.get("routing_key", ""),
            headers=headers,
            delivery_mode=2,
        )

    def _send(self, body: bytes, **options: Any) -> None:
        options = {"content_type": CONTENT_TYPE, "content_encoding": "utf-8", **options}
        self._producer.publish(body, retry=True, retry_policy=self._retry_policy, **options)


def publish_options(message: Message) -> dict[str, Any]:
    """Where a contract message goes, and whether it must survive a broker restart."""
    exchange = PLANS if message.type == "plan" else EVENTS
    return {
        "content_type": CONTENT_TYPE,
        "content_encoding": "utf-8",
        "exchange": exchange.name,
        "routing_key": routing_key(message),
        "message_id": message.id,
        "type": message.type,
        "delivery_mode": 2 if message.type in PERSISTENT_TYPES else 1,
    }


class BatchPublisher(_TracksReturns):
    """Publishes as mandatory without waiting for each confirm; `confirm()` then waits for
    all of them at once: one round trip for a batch instead of one per message.

    It has a connection of its own, in confirm mode set here rather than by the transport
    (whose publish waits for every confirm). After any failure the connection is dropped
    and made again on the next publish; what was not confirmed is the caller's to send
    again (the rule engine requeues the deliveries it answered).
    """

    def __init__(self, connection: Connection) -> None:
        self._template = connection
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._sent = 0  # the channel's delivery tags are 1, 2, ... in publishing order
        self._unconfirmed: set[int] = set()
        self._nacked = False
        self._lost = False  # the connection went while messages were unconfirmed
        self._returned: set[str] = set()
        self._confirming = True

    def publish(self, message: Message) -> None:
        producer = self._producer or self._open()
        try:
            producer.publish(encode(message), mandatory=True, **publish_options(message))
        except Exception:
            self.reset()
            raise
        if self._confirming:
            self._sent += 1
            self._unconfirmed.add(self._sent)

    def confirm(self, timeout: float = 30) -> set[str]:
        """Wait until RabbitMQ confirmed everything published; returns the ids of messages
        it returned because no queue took them. Raises when it refused one (a nack), on a
        broken connection, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if self._lost:
            self._lost = False
            raise ConnectionError("the connection was lost before every confirm arrived")
        try:
            while self._unconfirmed:
                assert self._connection is not None  # something was sent on it
                self._connection.drain_events(timeout=max(0.01, deadline - time.monotonic()))
            if self._nacked:
                raise MessageNacked("RabbitMQ refused a message (nack)")
        except Exception:
            self.reset()
            self._lost = False  # told now, by this exception
            raise
        returned, self._returned = self._returned, set()
        return returned

    def reset(self) -> None:
        """Drop the connection; the next publish opens a new one."""
        self._lost = self._lost or bool(self._unconfirmed)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        self._connection = self._producer = None
        self._sent = 0
        self._unconfirmed = set()
        self._nacked = False
        self._returned = set()

    def _open(self) -> Producer:
        connection = self._template.clone(heartbeat=0, transport_options=dict(RETRY_POLICY))
        channel = connection.channel()
        # kombu's in-process memory transport (`muster up --embedded`) has no confirms
        # and no returns: a message is in its queue once published.
        self._confirming = hasattr(channel, "confirm_select")
        if self._confirming:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
        self._connection, self._producer = connection, Producer(channel)
        return self._producer

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {tag for tag in self._unconfirmed if tag > delivery_tag}
        else:
            self._unconfirmed.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked = True
        self._on_ack(delivery_tag, multiple)


def acknowledge(deliveries: Sequence[Delivery]) -> None:
    """Acknowledge deliveries received in this order on one channel: one `multiple` ack
    on AMQP; one each on kombu's virtual transports (the memory broker of `muster up
    --embedded`), which ignore `multiple` and would hold the rest unacknowledged."""
    if not deliveries:
        return
    virtual = sys.modules.get("kombu.transport.virtual")  # loaded only where one is in use
    if virtual is not None and isinstance(deliveries[-1].channel, virtual.Channel):
        for delivery in deliveries:
            delivery.ack()
    else:
        deliveries[-1].ack(multiple=True)


def body_bytes(delivery: Delivery) -> bytes:
    """The body as sent: py-amqp hands over text when a sender set a content encoding."""
    body = delivery.body
    return body.encode(delivery.content_encoding or "utf-8") if isinstance(body, str) else body


Handler = Callable[[AnyMessage], None]


class ContractConsumer(ConsumerMixin):
    """Consumes contract messages from queues, reconnecting on its own (kombu's mixin).

    The handler gets decoded models. A message that fails validation goes to the dead
    letter queue with the reason and is acknowledged; the consumer keeps going. A handler
    exception requeues the message (quorum queues dead-letter it after a few tries).

    Everything a consumer publishes (dead letters, and whatever a subclass sends through
    `publisher`) goes out on a connection of its own: waiting for a publisher confirm on
    the consuming channel, inside a delivery callback, dispatches further deliveries
    re-entrantly and can hang for good.
    """

    def __init__(
        self, connection: Connection, queues: Sequence[Queue], handler: Handler, prefetch: int = 50
    ) -> None:
        self.connection = connection
        # Lazy (connects on the first publish) and without heartbeats: nothing reads it
        # between publishes, so missed heartbeats would kill it while the consumer idles;
        # a dropped connection is re-established by the publisher's retries instead.
        self.output = connection.clone(heartbeat=0)
        self.publisher = Publisher(self.output)
        self._queues = list(queues)
        self._handler = handler
        self._prefetch = prefetch

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        try:
            super().run(_tokens, **kwargs)
        finally:
            self.output.release()

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        return [
            consumer_cls(
                queues=[queue],
                on_message=partial(self._on_message, queue.name),
                prefetch_count=self._prefetch,
            )
            for queue in self._queues
        ]

    def decoded(self, queue: str, delivery: Delivery) -> AnyMessage | None:
        """The message; None when it was invalid, and so dead-lettered and acknowledged."""
        try:
            return decode(body_bytes(delivery))
        except InvalidMessage as error:
            log.warning("dead-lettering a message from %s: %s", queue, error)
            self.publisher.dead_letter(delivery, str(error), queue)
            delivery.ack()
            return None

    def _on_message(self, queue: str, delivery: Delivery) -> None:
        message = self.decoded(queue, delivery)
        if message is None:
            return
        try:
            self._handler(message)
        except Exception:
            log.exception("handler failed on %s message %s; requeued", message.type, message.id)
            delivery.requeue()
            return
        self.answered(delivery)

    def answered(self, delivery: Delivery) -> None:
        """The handler is done with `delivery`: acknowledge it (a subclass may batch)."""
        delivery.ack()
