from broker.topology import (
    EVENTS,
    PLANS,
    REPORTER_QUEUE,
    RULEENGINE_QUEUE,
    plan_queue,
    routing_key,
)
from tests.examples import every_message


def test_routing_keys_put_the_type_first():
    keys = {m.type: routing_key(m) for m in every_message("db1.example.org")}
    assert keys == {
        "announce": "announce.db1.example.org",
        "keepalive": "keepalive.db1.example.org",
        "plan": "db1.example.org",
        "run_status": "run_status.db1.example.org",
        "run_result": "run_result.db1.example.org",
        "alert": "alert.db1.example.org",
    }


def test_rule_engine_hears_only_what_decides_a_plan_and_reporter_hears_all_events():
    assert {b.routing_key for b in RULEENGINE_QUEUE.bindings} == {"announce.#", "keepalive.#"}
    reporter = {b.routing_key for b in REPORTER_QUEUE.bindings}
    for message in every_message():
        if message.type != "plan":
            assert f"{message.type}.#" in reporter
    assert all(b.exchange == EVENTS for b in REPORTER_QUEUE.bindings)


def test_node_plan_queue_is_bound_by_node_and_expires():
    queue = plan_queue("web1")
    assert (queue.name, queue.exchange, queue.routing_key) == ("muster.plan.web1", PLANS, "web1")
    assert queue.queue_arguments["x-expires"] > 0
    assert queue.queue_arguments["x-max-length"] == 1
