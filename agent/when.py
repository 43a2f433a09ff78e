"""Understands the `--at WHEN` people type: a snapshot id, a date, or "2 days ago"."""

import re
from datetime import UTC, datetime, timedelta

from broker.snapshot import SNAPSHOT_ID

_AGO = re.compile(r"^(\d+)\s*(minute|hour|day|week)s?\s+ago$")


class BadWhen(ValueError):
    pass


def parse_when(text: str, now: datetime | None = None) -> str | datetime:
    """A snapshot id (or a unique prefix of one) stays a string; anything else is a time.

    Dates without a zone are local time; a bare date means the end of that day.
    """
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    if SNAPSHOT_ID.match(text) or re.match(r"^\d{8}t\d{6}z", value):
        return text
    if value in ("now", "latest"):
        return now
    if value == "yesterday":
        return now - timedelta(days=1)
    if match := _AGO.match(value):
        return now - timedelta(**{match.group(2) + "s": int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadWhen(
            f"cannot read {text!r} as a time: use a snapshot id, a date like 2026-11-20 "
            "or '2026-11-20 14:00', or '3 days ago'"
        ) from None
    if len(text.strip()) == 10:  # a bare date: the state at the end of that day
        moment += timedelta(days=1, microseconds=-1)
    return moment.astimezone(UTC) if moment.tzinfo is None else moment
