import json
from datetime import datetime, timedelta, timezone

import pytest

from broker.codec import MAX_MESSAGE_BYTES, decode, encode, parse_json, validate
from broker.errors import InvalidMessage
from broker.messages import Keepalive
from tests.examples import every_message


@pytest.mark.parametrize("message", every_message(), ids=lambda m: m.type)
def test_every_message_round_trips_through_json(message):
    decoded = decode(encode(message))
    assert type(decoded) is type(message)
    assert decoded.model_dump() == message.model_dump()


@pytest.mark.parametrize("message", every_message(), ids=lambda m: m.type)
def test_one_pass_decode_agrees_with_parse_then_validate(message):
    """decode validates the raw bytes with pydantic's JSON parser; it must give what
    json.loads then validate gives, extra fields and a plan's signed bytes included."""
    data = json.loads(encode(message))
    data["newer"] = {"ratio": 0.1, "big": 2**70, "text": "\u00e9"}
    body = json.dumps(data).encode()
    one_pass, two_step = decode(body), validate(parse_json(body))
    assert one_pass.model_dump() == two_step.model_dump()
    assert getattr(one_pass, "signed_body", None) == getattr(two_step, "signed_body", None)


def test_every_message_carries_schema_id_and_utc_time():
    messages = every_message()
    assert len({m.id for m in messages}) == len(messages)
    for message in messages:
        data = json.loads(encode(message))
        assert data["schema_version"] == 1
        assert data["time"].endswith("Z")


def test_unknown_fields_from_newer_senders_are_tolerated():
    data = json.loads(encode(Keepalive(node="db1", uptime=3)))
    data["gpu_temperature"] = 71
    data["schema_version"] = 2
    message = decode(json.dumps(data).encode())
    assert message.node == "db1"


def test_time_is_normalised_to_utc_and_naive_time_refused():
    local = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert Keepalive(node="a", uptime=1, time=local).time.hour == 10
    with pytest.raises(InvalidMessage, match="time"):
        decode(
            json.dumps(
                {"type": "keepalive", "node": "a", "uptime": 1, "time": "2026-01-01T12:00:00"}
            ).encode()
        )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list"),
        (b'{"type": "telegram"}', "type"),
        (b'{"node": "x"}', "type"),
        (b'{"type": "keepalive", "node": "a", "uptime": "long"}', "keepalive.uptime"),
        (b'{"type": "announce", "node": "../etc", "facts": {}}', "announce.node"),
        (b'{"type": "run_result", "node": "a"}', "run_result.status"),
    ],
)
def test_invalid_messages_raise_one_error_naming_the_field(body, names):
    with pytest.raises(InvalidMessage, match=names.replace(".", r"\.")):
        decode(body)


def test_oversized_message_is_refused_before_parsing():
    body = b'{"type": "keepalive", "pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode(body)
