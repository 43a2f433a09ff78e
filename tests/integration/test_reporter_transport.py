"""The reporter's buffered py-amqp transport against a real RabbitMQ: frames cut out of
256 KiB reads must be byte for byte what RabbitMQ sent, however they straddle reads."""

from __future__ import annotations

import socket
import uuid

import pytest
from kombu import Exchange, Queue

from broker.connection import connect
from reporter.transport import CHUNK, BufferedTCPTransport, buffered


def test_bodies_of_every_size_arrive_intact_and_in_order(amqp_url: str) -> None:
    """Small and large bodies (a large one spans several frames and reads) interleaved."""
    sizes = [1, 7, 100, 131_072, CHUNK + 3, 5, 900_000, 2] * 3
    bodies = [uuid.uuid4().hex.encode() * (size // 32 + 1) for size in sizes]
    queue = Queue(f"transport-{uuid.uuid4().hex[:8]}", Exchange(""), auto_delete=True)
    received: list[bytes] = []
    with buffered(connect([amqp_url])) as connection:
        channel = connection.channel()
        bound = queue(channel)
        bound.declare()
        producer = connection.Producer(channel)
        for body in bodies:
            producer.publish(body, routing_key=bound.name, content_type="application/data")
        assert isinstance(connection.connection.transport, BufferedTCPTransport)
        with connection.Consumer(bound, callbacks=[lambda body, m: received.append(body)]):
            while len(received) < len(bodies):
                connection.drain_events(timeout=10)
    assert received == bodies


def test_a_poll_that_finds_nothing_times_out_instead_of_spinning(amqp_url: str) -> None:
    with buffered(connect([amqp_url])) as connection:
        connection.ensure_connection(max_retries=1)
        with pytest.raises(socket.timeout):
            connection.connection.drain_events(timeout=0)
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.2)
        assert connection.connection.connected
