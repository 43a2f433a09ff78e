"""Exchanges, queues and routing keys: the map of who hears what.

    agents ──announce/keepalive/run_status/run_result──▶ muster.events (topic)
        muster.events ──announce.#, keepalive.#──▶ muster.ruleengine   (competing consumers)
        muster.events ──everything──────────────▶ muster.reporter     (competing consumers)
        muster.events ──#──▶ muster.tail.<uuid>  (operators' exclusive, self-deleting queues)
    rule engine ──plan, routing key = node──▶ muster.plans (direct) ──▶ muster.plan.<node>
    any consumer ──invalid message + reason──▶ muster.dead (fanout) ──▶ muster.dead

Central queues are quorum queues (replicated across a RabbitMQ cluster, with a delivery
limit that dead-letters poison messages). Node plan queues are small classic queues that
hold only the newest plan and expire when their node has been gone for a while.
"""

import uuid

from kombu import Connection, Exchange, Queue, binding

from broker.messages import Message

EVENTS = Exchange("muster.events", type="topic", durable=True)
PLANS = Exchange("muster.plans", type="direct", durable=True)
DEAD = Exchange("muster.dead", type="fanout", durable=True)

PLAN_QUEUE_EXPIRES_MS = 3 * 24 * 3600 * 1000
DELIVERY_LIMIT = 5

# What must survive a broker restart; keepalives and progress are stale within seconds.
PERSISTENT_TYPES = frozenset({"announce", "plan", "run_result", "alert"})


def _central_queue(name: str, patterns: list[str]) -> Queue:

    return Queue(
        name,
        bindings=[binding(EVENTS, routing_key=pattern) for pattern in patterns],
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD.name,
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )


RULEENGINE_QUEUE = _central_queue("muster.ruleengine", ["announce.#", "keepalive.#"])
REPORTER_QUEUE = _central_queue(
    "muster.reporter",
    ["announce.#", "keepalive.#", "run_status.#", "run_result.#", "alert.#"],
)
DEAD_QUEUE = Queue("muster.dead", exchange=DEAD, durable=True)


def routing_key(message: Message) -> str:
    """`<type>.<node>`: subscribers filter by type with `<type>.#`; node ids may hold
    dots, so filtering by node is done on the `node` field, not the key."""
    node = getattr(message, "node", None)
    if message.type == "plan":
        return message.plan.node
    return f"{message.type}.{node}" if node else message.type


def plan_queue(node: str) -> Queue:
    return Queue(
        f"muster.plan.{node}",
        exchange=PLANS,
        routing_key=node,
        durable=True,
        queue_arguments={
            "x-expires": PLAN_QUEUE_EXPIRES_MS,
            "x-max-length": 1,
            "x-overflow": "drop-head",
        },
    )


def tail_queue(patterns: list[str] | None = None) -> Queue:
    """A private queue for an operator's terminal; it vanishes with the connection."""

    return Queue(
        f"muster.tail.{uuid.uuid4().hex[:12]}",
        bindings=[binding(EVENTS, routing_key=p) for p in patterns or ["#"]],
        exclusive=True,
        auto_delete=True,
        durable=False,
    )


def declare(connection: Connection) -> None:
    """Declare every shared exchange and queue. Idempotent: safe on every start."""
    channel = connection.default_channel
    for exchange in (EVENTS, PLANS, DEAD):
        exchange(channel).declare()
    for queue in (DEAD_QUEUE, RULEENGINE_QUEUE, REPORTER_QUEUE):
        queue(channel).declare()
