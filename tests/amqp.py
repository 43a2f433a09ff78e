"""Small helpers for tests that read queues on the real RabbitMQ."""

import time

from kombu import Connection, Queue


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
