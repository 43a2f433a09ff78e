import json
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.codec import decode, encode
from broker.errors import SignatureError
from broker.messages import SignedPlan
from broker.signing import (
    TrustedKeys,
    generate_signing_key,
    key_id,
    load_signing_key,
    public_pem,
    sign_plan,
    verify_plan,
)
from tests.examples import plan


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def received(signed):
    """What an agent holds after the plan crossed the wire."""
    return decode(encode(signed))


def resigned_body(signed, mutate):
    data = json.loads(encode(signed))
    mutate(data)
    return decode(json.dumps(data).encode())


def test_a_signed_plan_verifies_for_its_node(key):
    signed = sign_plan(plan("web1"), key)
    verified = verify_plan(received(signed), TrustedKeys([key.public_key()]), "web1")
    assert verified.content_hash() == plan("web1").content_hash()


def test_a_tampered_plan_is_rejected(key):
    def add_path(data):
        data["plan"]["jobs"][0]["sources"]["paths"].append("/root")

    tampered = resigned_body(sign_plan(plan(), key), add_path)
    with pytest.raises(SignatureError, match="altered or forged"):
        verify_plan(tampered, TrustedKeys([key.public_key()]), "web1")


def test_another_nodes_plan_is_rejected(key):
    signed = received(sign_plan(plan("db1"), key))
    with pytest.raises(SignatureError, match="for node 'db1', not for this node 'web1'"):
        verify_plan(signed, TrustedKeys([key.public_key()]), "web1")


def test_a_plan_signed_by_an_unknown_key_is_rejected(key):
    signed = received(sign_plan(plan(), Ed25519PrivateKey.generate()))
    with pytest.raises(SignatureError, match="unknown key"):
        verify_plan(signed, TrustedKeys([key.public_key()]), "web1")


def test_a_forged_signature_under_a_trusted_key_id_is_rejected(key):
    forged = sign_plan(plan(), Ed25519PrivateKey.generate())

    def claim_trusted_key(data):
        data["signature"]["key_id"] = key_id(key.public_key())

    with pytest.raises(SignatureError, match="altered or forged"):
        verify_plan(
            resigned_body(forged, claim_trusted_key), TrustedKeys([key.public_key()]), "web1"
        )


def test_fields_unknown_to_this_version_still_verify(key):
    """A newer rule engine signs fields this agent does not know; they must not break it."""
    body = plan().model_dump(mode="json")
    body["jobs"][0]["snapshot_tags"] = ["nightly"]
    body["priority"] = 3
    signed = sign_plan(plan().model_validate(body), key)
    assert verify_plan(received(signed), TrustedKeys([key.public_key()]), "web1")


def test_signing_key_files_are_private_and_reload(tmp_path):
    path = tmp_path / "signing.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_signing_key(path).public_key()) == key_id(key.public_key())
    (tmp_path / "signing.pub").write_bytes(public_pem(key.public_key()))
    trusted = TrustedKeys.from_files([tmp_path / "signing.pub"])
    assert trusted.get(key_id(key.public_key()))
    with pytest.raises(FileExistsError):
        generate_signing_key(path)


def test_a_freshly_signed_plan_is_the_message_validation_would_build(key):
    """sign_plan skips validating the plan it just built again: the message must not change."""
    signed = sign_plan(plan("web1"), key)
    validated = SignedPlan.model_validate(json.loads(encode(signed)))
    assert encode(signed) == encode(validated)
    assert signed.signed_body == validated.signed_body
    trusted = TrustedKeys([key.public_key()])
    assert verify_plan(signed, trusted, "web1").content_hash() == plan("web1").content_hash()
