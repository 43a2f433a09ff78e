"""agent.retention: restic's --keep-* rules on hand-built snapshot records."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from agent.retention import select_kept
from broker.plan import Retention
from broker.snapshot import ObjectInfo, SnapshotRecord

RULES = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"]
_tails = iter(range(1, 1 << 24))


def snap(when: str, tail: str | None = None) -> SnapshotRecord:
    """A record started at `when` (ISO 8601; UTC unless it says otherwise)."""
    started = datetime.fromisoformat(when)
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    at = started.astimezone(UTC)
    snapshot_id = at.strftime("%Y%m%dT%H%M%SZ") + "-" + (tail or f"{next(_tails):06x}")
    return SnapshotRecord(
        id=snapshot_id,
        node="node1",
        job="job",
        started=started,
        finished=started + timedelta(minutes=1),
        full=True,
        paths=["/data"],
        catalog=ObjectInfo(name=f"catalogs/{snapshot_id}.jsonl.zst.age", size=1, sha256="0"),
        recipients=[],
        agent_version="test",
    )


def times(records: list[SnapshotRecord]) -> list[str]:
    return [r.started.strftime("%Y-%m-%d %H:%M") for r in records]


def run(records: list[SnapshotRecord], **keep: int):
    kept, forgotten, reasons = select_kept(records, Retention(**keep), None)
    assert {r.id for r in kept} | {r.id for r in forgotten} == {r.id for r in records}
    assert not {r.id for r in kept} & {r.id for r in forgotten}
    assert set(reasons) == {r.id for r in kept}
    return kept, forgotten, reasons


def test_no_snapshots() -> None:
    assert select_kept([], Retention(keep_last=3), None) == ([], [], {})
    assert select_kept([], Retention(), None) == ([], [], {})


def test_all_zero_keeps_everything() -> None:
    records = [snap(f"2024-01-0{day}T12:00") for day in range(1, 6)]
    kept, forgotten, reasons = run(records)
    assert kept == records and forgotten == []
    assert all(reason == ["policy is empty"] for reason in reasons.values())


def test_keep_last() -> None:
    records = [snap(f"2024-01-01T{hour:02d}:00") for hour in range(6)]
    kept, forgotten, reasons = run(records, keep_last=3)
    assert times(kept) == ["2024-01-01 03:00", "2024-01-01 04:00", "2024-01-01 05:00"]
    assert times(forgotten) == ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 02:00"]
    assert all(reason == ["last snapshot"] for reason in reasons.values())


def test_keep_last_more_than_there_are() -> None:
    records = [snap("2024-01-01T00:00"), snap("2024-01-02T00:00")]
    kept, forgotten, _ = run(records, keep_last=10)
    assert kept == records and forgotten == []


def test_input_order_does_not_matter_and_output_is_oldest_first() -> None:
    records = [snap(f"2024-01-{day:02d}T08:00") for day in range(1, 11)]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    kept, forgotten, _ = run(shuffled, keep_last=4)
    assert kept == records[-4:]
    assert forgotten == records[:-4]


def test_hourly_newest_of_each_hour_and_empty_hours_skipped() -> None:
    records = [
        snap("2024-05-01T10:05"),
        snap("2024-05-01T10:40"),
        snap("2024-05-01T11:10"),
        # no snapshot at 12:xx: that hour is not counted
        snap("2024-05-01T13:00"),
        snap("2024-05-01T13:59"),
        snap("2024-05-01T14:00"),
    ]
    kept, forgotten, reasons = run(records, keep_hourly=3)
    assert times(kept) == ["2024-05-01 11:10", "2024-05-01 13:59", "2024-05-01 14:00"]
    assert times(forgotten) == ["2024-05-01 10:05", "2024-05-01 10:40", "2024-05-01 13:00"]
    assert all(reason == ["hourly snapshot"] for reason in reasons.values())


def test_hourly_boundary_is_exact() -> None:
    records = [snap("2024-05-01T09:59:59"), snap("2024-05-01T10:00:00")]
    kept, _, _ = run(records, keep_hourly=2)
    assert kept == records


def test_daily_across_days_with_gaps() -> None:
    records = [
        snap("2024-02-27T01:00"),
        snap("2024-02-27T23:00"),
        snap("2024-02-28T12:00"),
        # 29th: nothing
        snap("2024-03-01T00:00"),
        snap("2024-03-01T06:00"),
        snap("2024-03-01T23:59:59"),
    ]
    kept, forgotten, _ = run(records, keep_daily=3)
    assert times(kept) == ["2024-02-27 23:00", "2024-02-28 12:00", "2024-03-01 23:59"]
    assert times(forgotten) == ["2024-02-27 01:00", "2024-03-01 00:00", "2024-03-01 06:00"]


def test_days_are_utc_days() -> None:
    # 01:30 at +02:00 on the 10th is 23:30 UTC on the 9th: the same day as 22:00Z on the 9th
    late = snap("2024-03-10T01:30:00+02:00")
    earlier = snap("2024-03-09T22:00:00Z")
    next_day = snap("2024-03-10T00:30:00Z")
    kept, forgotten, _ = run([earlier, late, next_day], keep_daily=2)
    assert kept == [late, next_day]
    assert forgotten == [earlier]


def test_weekly_uses_iso_weeks_across_the_new_year() -> None:
    records = [
        snap("2020-12-24T12:00"),  # Thursday, 2020-W52
        snap("2020-12-31T12:00"),  # Thursday, 2020-W53
        snap("2021-01-03T12:00"),  # Sunday, still 2020-W53
        snap("2021-01-04T00:00"),  # Monday, 2021-W01
        snap("2021-01-10T23:59"),  # Sunday, 2021-W01
    ]
    kept, forgotten, _ = run(records, keep_weekly=2)
    assert times(kept) == ["2021-01-03 12:00", "2021-01-10 23:59"]
    assert times(forgotten) == ["2020-12-24 12:00", "2020-12-31 12:00", "2021-01-04 00:00"]


def test_weekly_skips_empty_weeks() -> None:
    records = [
        snap("2024-01-01T10:00"),  # W01
        snap("2024-01-15T10:00"),  # W03 (W02 empty)
        snap("2024-02-05T10:00"),  # W06 (W04, W05 empty)
        snap("2024-02-06T10:00"),  # W06
    ]
    kept, forgotten, _ = run(records, keep_weekly=3)
    assert times(kept) == ["2024-01-01 10:00", "2024-01-15 10:00", "2024-02-06 10:00"]
    assert times(forgotten) == ["2024-02-05 10:00"]


def test_monthly_across_months_and_a_gap() -> None:
    records = [
        snap("2023-11-30T23:00"),
        snap("2023-12-01T00:00"),
        snap("2023-12-31T23:59"),
        # January empty
        snap("2024-02-01T00:00"),
        snap("2024-02-29T12:00"),
    ]
    kept, forgotten, _ = run(records, keep_monthly=2)
    assert times(kept) == ["2023-12-31 23:59", "2024-02-29 12:00"]
    assert len(forgotten) == 3


def test_yearly() -> None:
    records = [
        snap("2018-06-01T00:00"),
        snap("2019-01-01T00:00"),
        snap("2019-12-31T23:59"),
        # 2020 empty
        snap("2021-07-01T00:00"),
        snap("2022-01-01T00:00"),
        snap("2022-03-01T00:00"),
    ]
    kept, forgotten, reasons = run(records, keep_yearly=3)
    assert times(kept) == ["2019-12-31 23:59", "2021-07-01 00:00", "2022-03-01 00:00"]
    assert times(forgotten) == ["2018-06-01 00:00", "2019-01-01 00:00", "2022-01-01 00:00"]
    assert set(map(tuple, reasons.values())) == {("yearly snapshot",)}


def test_several_reasons_and_each_rule_counts_its_own_periods() -> None:
    records = [
        snap("2023-12-31T20:00"),
        snap("2024-01-01T09:00"),
        snap("2024-01-02T09:00"),
        snap("2024-01-02T10:00"),
        snap("2024-01-02T11:00"),
    ]
    _, forgotten, reasons = run(records, keep_last=2, keep_daily=2, keep_yearly=2)
    by_time = {r.started.strftime("%m-%d %H"): reasons.get(r.id) for r in records}
    assert by_time == {
        "12-31 20": ["yearly snapshot"],
        "01-01 09": ["daily snapshot"],
        "01-02 09": None,
        "01-02 10": ["last snapshot"],
        "01-02 11": ["last snapshot", "daily snapshot", "yearly snapshot"],
    }
    assert times(forgotten) == ["2024-01-02 09:00"]


def test_any_rule_keeps_the_newest() -> None:
    records = [snap("2020-01-01T00:00"), snap("2024-01-01T00:00"), snap("2024-06-01T00:00")]
    for rule in RULES[:-1]:
        kept, _, _ = run(records, **{rule: 1})
        assert kept == [records[-1]], rule


def test_ties_in_time_are_broken_by_id() -> None:
    first = snap("2024-01-01T10:00:00", tail="aaaaaa")
    second = snap("2024-01-01T10:00:00", tail="bbbbbb")
    kept, forgotten, _ = run([second, first], keep_last=1)
    assert kept == [second] and forgotten == [first]
    kept, forgotten, _ = run([second, first], keep_hourly=5)
    assert kept == [second] and forgotten == [first]
    kept, forgotten, _ = run([first, second], keep_last=2)
    assert kept == [first, second] and forgotten == []


def test_now_does_not_move_periods() -> None:
    records = [snap("2019-01-01T00:00"), snap("2019-01-02T00:00"), snap("2019-01-03T00:00")]
    for now in [None, datetime(2030, 1, 1, tzinfo=UTC)]:
        kept, forgotten, _ = select_kept(records, Retention(keep_daily=2), now)
        assert times(kept) == ["2019-01-02 00:00", "2019-01-03 00:00"]
        assert times(forgotten) == ["2019-01-01 00:00"]


def _reference(records: list[SnapshotRecord], retention: Retention) -> set[str]:
    """The definition, written differently: per rule, group into periods, take the N most
    recent periods, keep the newest snapshot of each."""
    periods = {
        "keep_last": lambda r: (r.started, r.id),
        "keep_hourly": lambda r: r.started.strftime("%Y%m%d%H"),
        "keep_daily": lambda r: r.started.strftime("%Y%m%d"),
        "keep_weekly": lambda r: r.started.isocalendar()[:2],
        "keep_monthly": lambda r: r.started.strftime("%Y%m"),
        "keep_yearly": lambda r: r.started.year,
    }
    kept: set[str] = set()
    for rule, period in periods.items():
        count = getattr(retention, rule)
        groups: dict[object, list[SnapshotRecord]] = {}
        for record in records:
            groups.setdefault(period(record), []).append(record)
        for key in sorted(groups, reverse=True)[:count]:
            kept.add(max(groups[key], key=lambda r: (r.started, r.id)).id)
    return kept


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_definition_on_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    start = datetime(2019, 12, 20, tzinfo=UTC)
    spread = rng.choice([6 * 3600, 10 * 86400, 120 * 86400, 3 * 365 * 86400])
    records = [
        snap((start + timedelta(seconds=rng.randrange(spread))).isoformat())
        for _ in range(rng.randrange(1, 60))
    ]
    retention = Retention(**{rule: rng.choice([0, 0, 1, 2, 3, 7]) for rule in RULES})
    kept, forgotten, _ = run(records, **retention.model_dump())
    if not any(retention.model_dump().values()):
        assert forgotten == []
    else:
        assert {r.id for r in kept} == _reference(records, retention)
