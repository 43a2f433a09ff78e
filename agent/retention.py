"""Which snapshots a job's `Retention` keeps: restic's `forget --keep-*` rules, exactly.

Snapshots are taken newest first. `keep_last` keeps the N most recent. Each of
`keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly` and `keep_yearly` keeps, for
each of the last N periods *that have snapshots* (empty periods are skipped, not counted),
the newest snapshot of that period. Periods are calendar periods in UTC: hours, days, ISO
weeks (Monday to Sunday, numbered by ISO year), months and years. One snapshot may be kept
for several reasons, and then it counts towards every rule that chose it, as in restic.
A retention whose counts are all zero keeps everything. Any other retention always keeps
the newest snapshot (it opens a period for every rule), so an incremental backup always
finds its parent.

Incrementals need nothing beyond this. A catalog names, for every entry, the volume that
holds its data, so a kept incremental snapshot refers to the volumes of earlier snapshots
directly (its record's `references`): nothing is replayed along a chain, and forgetting
the full snapshot it was built on loses nothing it needs. `run_forget` deletes a volume
only when no kept snapshot refers to it, so no extra snapshot has to be kept here.
"""

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from broker.plan import Retention
from broker.snapshot import SnapshotRecord

Period = Callable[[datetime], tuple[int, ...]]

POLICY_EMPTY = "policy is empty"


def _hour(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day)


def _week(t: datetime) -> tuple[int, ...]:
    year, week, _ = t.isocalendar()
    return (year, week)


def _month(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month)


def _year(t: datetime) -> tuple[int, ...]:
    return (t.year,)


# (field of Retention, period of a time or None for "every snapshot", reason as restic says)
RULES: list[tuple[str, Period | None, str]] = [
    ("keep_last", None, "last snapshot"),
    ("keep_hourly", _hour, "hourly snapshot"),
    ("keep_daily", _day, "daily snapshot"),
    ("keep_weekly", _week, "weekly snapshot"),
    ("keep_monthly", _month, "monthly snapshot"),
    ("keep_yearly", _year, "yearly snapshot"),
]


def utc(moment: datetime) -> datetime:
    """The moment in UTC; a naive time is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def select_kept(
    records: Iterable[SnapshotRecord], retention: Retention, now: datetime | None = None
) -> tuple[list[SnapshotRecord], list[SnapshotRecord], dict[str, list[str]]]:
    """Split `records` into (keep, forget, reasons): both lists oldest first, and for each
    kept snapshot id the rules that keep it, in the order above.

    A snapshot's time is its `started`; snapshots started in the same instant are ordered
    by id. `now` does not move any period: as in restic, the rules count the periods that
    have snapshots, not calendar periods back from today, so a job that stopped backing up
    a year ago still keeps its last daily snapshots. It is accepted (and ignored) so that
    callers can pass the clock they use everywhere else.
    """
    del now
    newest_first = sorted(records, key=lambda r: (utc(r.started), r.id), reverse=True)
    counts = {name: getattr(retention, name) for name, _, _ in RULES}
    if not any(counts.values()):
        reasons = {record.id: [POLICY_EMPTY] for record in newest_first}
        return newest_first[::-1], [], reasons
    last_period: dict[str, tuple[int, ...] | None] = dict.fromkeys(counts)
    reasons = {}
    keep, forget = [], []
    for index, record in enumerate(newest_first):
        moment = utc(record.started)
        matched = []
        for name, period, reason in RULES:
            if counts[name] <= 0:
                continue
            value = (index,) if period is None else period(moment)
            if value != last_period[name]:
                last_period[name] = value
                counts[name] -= 1
                matched.append(reason)
        if matched:
            keep.append(record)
            reasons[record.id] = matched
        else:
            forget.append(record)
    return keep[::-1], forget[::-1], reasons
