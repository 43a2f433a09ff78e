"""The few exception types that cross the contract boundary."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is not loaded for this: `muster` imports this module first
    from pydantic import ValidationError


class ContractError(Exception):
    """Base for every error raised by the wire contract."""


class InvalidMessage(ContractError):
    """A message (or plan, or config) does not match its schema.

    The text names every offending field, so a dead-lettered message carries a reason an
    operator can act on without reading Python tracebacks.
    """

    @classmethod
    def from_validation(cls, what: str, error: "ValidationError") -> "InvalidMessage":
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(root)'}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        return cls(f"invalid {what}: {problems}")


class SignatureError(ContractError):
    """A plan's signature is missing, forged, from an unknown key or meant for another node."""
