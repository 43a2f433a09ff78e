"""Constrained scalar types shared by messages, plans and config files."""

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    ByteSize,
    Field,
    PlainSerializer,
)

# A node id names a queue and a storage prefix, so it must be safe in both.
NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")]

# Job names become path segments in the repository: keep them boring.
JobName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]

AgeRecipient = Annotated[str, Field(pattern=r"^age1[02-9ac-hj-np-z]{58}$")]

_DURATION = re.compile(r"(\d+)\s*(w|d|h|m|s)", re.IGNORECASE)
_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any) -> Any:
    """Accept `90`, `"90s"`, `"1h30m"` or `"7d"`; anything else is left for int validation."""
    if not isinstance(value, str) or value.strip().isdigit():
        return value
    text = value.replace(" ", "")
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts).lower() != text.lower():
        raise ValueError(f"not a duration: {value!r} (use e.g. 90, '30s', '15m', '1h30m', '7d')")
    return sum(int(n) * _SECONDS[u.lower()] for n, u in parts)


# Durations travel as whole seconds so that a plan's canonical form never holds a float.
Duration = Annotated[int, BeforeValidator(parse_duration), Field(ge=0)]

# Sizes accept "256MiB" or "10MB" in rules files and travel as plain byte counts.
Size = Annotated[ByteSize, PlainSerializer(int, return_type=int)]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


# Naive datetimes are refused: a fleet spans time zones and a guess would be wrong somewhere.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def utcnow() -> datetime:
    return datetime.now(UTC)
