"""Small helpers for tests that read queues on the real RabbitMQ."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kombu import Connection, Queue

from broker.connection import ContractConsumer, Handler


def drain(connection: Connection, queue: Queue, expected: int, timeout: float = 10) -> list:
    """Take up to `expected` messages off `queue`, waiting up to `timeout` seconds."""
    deadline, received = time.monotonic() + timeout, []
    with connection.channel() as channel:
        bound = queue(channel)
        while len(received) < expected and time.monotonic() < deadline:
            delivery = bound.get(no_ack=True)
            if delivery is None:
                time.sleep(0.05)
            else:
                received.append(delivery)
    return received


def wait_for(condition: Callable[[], object], timeout: float = 10) -> None:
    """Poll `condition` until it holds; a timeout is the test's failure, not a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting after {timeout} s"
        time.sleep(0.05)


@contextmanager
def consuming(connection: Connection, queue: Queue, handler: Handler) -> Iterator[None]:
    """A ContractConsumer running in a thread for the duration of the block."""
    consumer = ContractConsumer(connection, [queue], handler)
    worker = threading.Thread(target=consumer.run, daemon=True)
    worker.start()
    try:
        yield
    finally:
        consumer.should_stop = True
        worker.join(timeout=10)


def depth(connection: Connection, queue: Queue) -> int:
    return queue(connection.default_channel).queue_declare(passive=True).message_count
