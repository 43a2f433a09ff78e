"""Ed25519 signatures over plans, so a node runs only what the rule engine decided.

The signature covers the canonical JSON of the plan object exactly as received, not a
re-serialisation of our model of it: a plan from a newer rule engine, with fields this
agent does not know, still verifies.
"""

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.canonical import canonical_json
from broker.errors import SignatureError
from broker.messages import PlanSignature, SignedPlan
from broker.plan import Plan


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a private key file readable by its owner only; never overwrite one."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"not an Ed25519 public key: {type(key).__name__}")
    return key


class TrustedKeys:
    """The rule-engine public keys a node accepts, by key id (several during a rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(key): key for key in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> "TrustedKeys":
        return cls(load_public_key(Path(path).read_bytes()) for path in paths)

    def get(self, kid: str) -> Ed25519PublicKey:
        try:
            return self._keys[kid]
        except KeyError:
            known = ", ".join(sorted(self._keys)) or "none"
            raise SignatureError(
                f"plan signed by unknown key {kid} (trusted: {known}); "
                "pin the rule engine's public key on this node"
            ) from None


def sign_plan(plan: Plan, key: Ed25519PrivateKey) -> SignedPlan:
    body = canonical_json(plan.model_dump(mode="json"))
    signature = PlanSignature(
        key_id=key_id(key.public_key()), value=base64.b64encode(key.sign(body)).decode()
    )
    return SignedPlan.of(plan, signature, body)


def verify_plan(signed: SignedPlan, trusted: TrustedKeys, node: str) -> Plan:
    """Return the plan if it is signed by a trusted key and meant for `node`."""
    public_key = trusted.get(signed.signature.key_id)
    try:
        signature = base64.b64decode(signed.signature.value, validate=True)
        public_key.verify(signature, signed.signed_body)
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"plan for {signed.plan.node} fails its signature check (key "
            f"{signed.signature.key_id}): it was altered or forged"
        ) from None
    if signed.plan.node != node:
        raise SignatureError(f"plan is for node {signed.plan.node!r}, not for this node {node!r}")
    return signed.plan
