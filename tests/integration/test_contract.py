"""The wire contract against a real RabbitMQ, read back by Muster and by pika."""

import json
import time
from collections.abc import Iterator

import pika
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Connection

from broker.cli import broker_group
from broker.codec import decode, encode
from broker.connection import REASON_HEADER, BatchPublisher, Publisher, body_bytes, connect
from broker.errors import SignatureError
from broker.messages import Keepalive
from broker.signing import TrustedKeys, sign_plan, verify_plan
from broker.topology import (
    DEAD_QUEUE,
    EVENTS,
    PLANS,
    REPORTER_QUEUE,
    RULEENGINE_QUEUE,
    declare,
    plan_queue,
    tail_queue,
)
from tests.amqp import consuming, depth, drain, wait_for
from tests.examples import every_message, plan

pytestmark = pytest.mark.integration


@pytest.fixture
def connection(amqp_url: str) -> Iterator[Connection]:
    """A connection on a freshly declared topology with empty shared queues."""
    with connect([amqp_url]) as conn:
        declare(conn)
        channel = conn.default_channel
        for queue in (DEAD_QUEUE, RULEENGINE_QUEUE, REPORTER_QUEUE):
            queue(channel).purge()
        yield conn


def pika_channel(amqp_url: str):
    """pika reads the vhost from the path and wants "/" spelt %2F."""
    url = amqp_url.rstrip("/") + "/%2F"
    return pika.BlockingConnection(pika.URLParameters(url)).channel()


def test_every_message_type_round_trips_through_the_broker(connection):
    messages = every_message("web1")
    tail = tail_queue()
    tail(connection.default_channel).declare()
    node_queue = plan_queue("web1")
    node_queue(connection.default_channel).declare()

    publisher = Publisher(connection)
    for message in messages:
        publisher.publish(message)

    events = [decode(body_bytes(d)) for d in drain(connection, tail, len(messages) - 1)]
    plans = [decode(body_bytes(d)) for d in drain(connection, node_queue, 1)]
    sent = {m.id: m for m in messages}
    assert sorted(m.type for m in events + plans) == sorted(m.type for m in messages)
    for received in events + plans:
        assert received.model_dump() == sent[received.id].model_dump()


def test_an_independent_client_reads_a_result_event_as_plain_json(connection, amqp_url):
    channel = pika_channel(amqp_url)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, EVENTS.name, routing_key="run_result.#")

    result = next(m for m in every_message("db7") if m.type == "run_result")
    Publisher(connection).publish(result)

    for _ in range(100):
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method:
            break
        time.sleep(0.05)
    assert method is not None, "pika never saw the result event"
    assert method.routing_key == "run_result.db7"
    assert properties.content_type == "application/json"
    assert properties.message_id == result.id
    assert properties.delivery_mode == 2
    document = json.loads(body)
    assert document["type"] == "run_result"
    assert document["node"] == "db7"
    assert document["status"] == "success"
    assert document["stats"]["files"] == 120
    channel.connection.close()


def test_malformed_messages_are_dead_lettered_with_a_reason_and_consumption_goes_on(
    connection, amqp_url
):
    handled = []
    with consuming(connection.clone(), RULEENGINE_QUEUE, handled.append):
        raw = pika_channel(amqp_url)
        junk = [
            b"{not json",
            b'{"type": "keepalive", "node": "db1", "uptime": "forever"}',
            json.dumps(
                {"type": "keepalive", "node": "db1", "uptime": 1, "pad": "x" * 2**20}
            ).encode(),
        ]
        for body in junk:
            raw.basic_publish(EVENTS.name, "keepalive.db1", body)
        good = Keepalive(node="db1", uptime=5)
        Publisher(connection).publish(good)
        wait_for(lambda: handled)
        raw.connection.close()

    assert [m.id for m in handled] == [good.id]
    letters = drain(connection, DEAD_QUEUE, len(junk))
    reasons = {body_bytes(d): d.headers[REASON_HEADER] for d in letters}
    assert sorted(reasons) == sorted(junk)
    assert "not UTF-8 JSON" in reasons[junk[0]]
    assert "keepalive.uptime" in reasons[junk[1]]
    assert "exceeds" in reasons[junk[2]]
    assert all(d.headers["x-muster-queue"] == RULEENGINE_QUEUE.name for d in letters)


def test_dead_letters_command_shows_the_reason_without_consuming(connection, amqp_url):
    raw = pika_channel(amqp_url)
    raw.basic_publish(EVENTS.name, "announce.x", b'{"type": "announce"}')
    raw.connection.close()
    with consuming(connection.clone(), RULEENGINE_QUEUE, lambda m: None):
        wait_for(lambda: depth(connection, DEAD_QUEUE) == 1)

    runner = CliRunner()
    for _ in range(2):  # peeking twice shows the same letter: nothing was consumed
        output = runner.invoke(broker_group, ["dead-letters", "--json", "--broker-url", amqp_url])
        assert output.exit_code == 0, output.output
        letters = [json.loads(line) for line in output.output.splitlines()]
        assert len(letters) == 1
        assert "announce.node: Field required" in letters[0]["reason"]


def test_a_node_queue_receives_only_its_own_plans(connection):
    key = Ed25519PrivateKey.generate()
    nodes = ["web1", "web2", "db1.example.org"]
    for node in nodes:
        plan_queue(node)(connection.default_channel).declare()
    publisher = Publisher(connection)
    for node in nodes:
        publisher.publish(sign_plan(plan(node), key))

    for node in nodes:
        received = drain(connection, plan_queue(node), 2, timeout=1.5)
        assert [decode(body_bytes(d)).plan.node for d in received] == [node]


def test_a_node_queue_keeps_only_the_newest_plan(connection):
    key = Ed25519PrivateKey.generate()
    plan_queue("web3")(connection.default_channel).declare()
    publisher = Publisher(connection)
    first, second = sign_plan(plan("web3"), key), sign_plan(plan("web3"), key)
    publisher.publish(first)
    publisher.publish(second)
    assert [decode(body_bytes(d)).id for d in drain(connection, plan_queue("web3"), 2, 1.5)] == [
        second.id
    ]


def test_a_batch_of_plans_is_confirmed_at_once_and_unroutable_ones_are_named(connection):
    key = Ed25519PrivateKey.generate()
    plan_queue("web4")(connection.default_channel).declare()
    publisher = BatchPublisher(connection)
    routed, nowhere = sign_plan(plan("web4"), key), sign_plan(plan("no-queue-node"), key)
    publisher.publish(routed)
    publisher.publish(nowhere)
    assert publisher.confirm() == {nowhere.id}
    assert [decode(body_bytes(d)).id for d in drain(connection, plan_queue("web4"), 1)] == [
        routed.id
    ]
    publisher.publish(routed)
    assert publisher.confirm() == set(), "a returned id was reported twice"
    publisher.reset()


def test_a_batch_whose_connection_broke_is_not_reported_confirmed(connection):
    publisher = BatchPublisher(connection)
    publisher.publish(sign_plan(plan("web5"), Ed25519PrivateKey.generate()))
    publisher.reset()  # as after a failed publish: its confirm will never come
    with pytest.raises(ConnectionError):
        publisher.confirm()
    assert publisher.confirm() == set()  # told once; the next batch starts clean


def test_a_plan_signed_with_another_key_is_rejected_by_the_node(connection, amqp_url):
    trusted_key, rogue_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    plan_queue("web4")(connection.default_channel).declare()
    raw = pika_channel(amqp_url)
    raw.basic_publish(PLANS.name, "web4", encode(sign_plan(plan("web4"), rogue_key)))
    raw.connection.close()

    (delivery,) = drain(connection, plan_queue("web4"), 1)
    with pytest.raises(SignatureError, match="unknown key"):
        verify_plan(decode(body_bytes(delivery)), TrustedKeys([trusted_key.public_key()]), "web4")


def test_a_consumer_idle_for_several_heartbeats_still_consumes_and_dead_letters(
    connection, amqp_url
):
    """The publishing side of a consumer is not read between publishes: heartbeats on it
    would be 'missed' while the consumer idles, and the consumer would stop for good."""
    handled = []
    with (
        connect([amqp_url], heartbeat=1) as beating,
        consuming(beating, RULEENGINE_QUEUE, handled.append),
    ):
        raw = pika_channel(amqp_url)
        raw.basic_publish(EVENTS.name, "keepalive.db2", b"{junk")  # uses the output side
        time.sleep(4.5)  # more than two heartbeat intervals of silence
        consumers = RULEENGINE_QUEUE(connection.default_channel).queue_declare(passive=True)
        assert consumers.consumer_count == 1, "the consumer dropped off its queue"
        raw.basic_publish(EVENTS.name, "keepalive.db2", b"{more junk")
        good = Keepalive(node="db2", uptime=1)
        Publisher(connection).publish(good)
        wait_for(lambda: handled)
        raw.connection.close()
    assert [m.id for m in handled] == [good.id]
    assert len(drain(connection, DEAD_QUEUE, 2)) == 2
