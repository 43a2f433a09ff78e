"""docs/ARCHITECTURE.md shows every message shape; keep each example valid."""

import json
import re
from pathlib import Path

from broker.codec import decode
from broker.messages import AnyMessage
from broker.topology import DEAD, EVENTS, PLANS, REPORTER_QUEUE, RULEENGINE_QUEUE

DOC = Path(__file__).parents[2] / "docs" / "ARCHITECTURE.md"


def json_examples() -> list[str]:
    return re.findall(r"```json\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_every_message_type_has_a_valid_example():
    types = {decode(json.dumps(json.loads(block)).encode()).type for block in json_examples()}
    union = AnyMessage.__origin__.__args__  # the discriminated union's members
    assert types == {member.model_fields["type"].default for member in union}


def test_every_exchange_and_queue_is_documented():
    text = DOC.read_text()
    for name in (EVENTS.name, PLANS.name, DEAD.name, RULEENGINE_QUEUE.name, REPORTER_QUEUE.name):
        assert f"`{name}`" in text
    for binding in [*RULEENGINE_QUEUE.bindings, *REPORTER_QUEUE.bindings]:
        assert f"`{binding.routing_key}`" in text
