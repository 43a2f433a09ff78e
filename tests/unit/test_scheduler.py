"""The agent's scheduler, driven by an injected clock: slots, splay, catch-up, no overlap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.scheduler import (
    STATE_FILE,
    CronWindows,
    Scheduler,
    Slots,
    Task,
    cron_window,
    splay_offset,
)
from broker.plan import Plan

T0 = datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC)  # a Monday


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def plan(*jobs: dict, node: str = "web1") -> Plan:
    return Plan.model_validate({"node": node, "issued": T0, "jobs": list(jobs)})


def job(name: str = "etc", **fields) -> dict:
    return {
        "name": name,
        "storage": {"kind": "local", "path": "/srv/backup"},
        "sources": {"paths": ["/etc"]},
        "restore_test": {"enabled": False},
        **fields,
    }


def scheduler(clock: Clock, *jobs: dict, node: str = "web1", state: Path | None = None):
    found = Scheduler(node, clock, state)
    found.set_plan(plan(*jobs, node=node))
    return found


def run(found: Scheduler, task: Task, outcome: str = "success") -> list[Task]:
    found.start(task)
    return found.finished(task, outcome)  # type: ignore[arg-type]


# -- splay ---------------------------------------------------------------------------------


def test_splay_is_deterministic_per_node_and_job_and_spreads_a_fleet():
    assert splay_offset("web1", "etc", 3600) == splay_offset("web1", "etc", 3600)
    # Pinned: a different hash would move every node's backups on upgrade.
    assert splay_offset("web1", "etc", 3600) == 2875
    assert splay_offset("web1", "etc", 0) == 0
    offsets = [splay_offset(f"node{i}", "etc", 3600) for i in range(200)]
    assert all(0 <= offset < 3600 for offset in offsets)
    assert len(set(offsets)) > 150
    assert splay_offset("web1", "etc", 3600) != splay_offset("web1", "var", 3600)


def test_splay_offset_is_the_same_in_a_new_scheduler():
    jobs = [job(schedule={"cron": "0 2 * * *", "splay": 3600})]
    slots = []
    for _ in range(2):
        clock = Clock(T0)
        found = scheduler(clock, *jobs)
        slots.append(found.next_wakeup())
    assert slots[0] == slots[1] == T0.replace(hour=2) + timedelta(seconds=2875)


# -- cron ----------------------------------------------------------------------------------


def test_cron_runs_at_each_cron_time_and_once_per_slot():
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"cron": "15 2 * * *"}))
    assert found.next_wakeup() == T0.replace(hour=2, minute=15)
    clock.set(T0.replace(hour=2, minute=14, second=59))
    assert found.due() == []
    clock.set(T0.replace(hour=2, minute=15))
    assert found.due() == [Task("etc", "backup", T0.replace(hour=2, minute=15))]
    run(found, found.due()[0])
    clock.advance(minutes=30)
    assert found.due() == []
    assert found.next_wakeup() == T0.replace(hour=2, minute=15) + timedelta(days=1)
    clock.set(T0.replace(hour=2, minute=15) + timedelta(days=1, seconds=1))
    assert [t.slot for t in found.due()] == [T0.replace(hour=2, minute=15) + timedelta(days=1)]


def test_cron_with_splay_runs_at_the_nodes_offset():
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"cron": "0 2 * * *", "splay": 1800}))
    offset = splay_offset("web1", "etc", 1800)
    slot = T0.replace(hour=2) + timedelta(seconds=offset)
    clock.set(slot - timedelta(seconds=1))
    assert found.due() == []
    clock.set(slot)
    assert [t.slot for t in found.due()] == [slot]


def test_cron_follows_the_clocks_time_zone():
    local = datetime(2026, 3, 2, 0, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Amsterdam"))
    clock = Clock(local)
    found = scheduler(clock, job(schedule={"cron": "15 2 * * *"}))
    assert found.next_wakeup() == local.replace(hour=2, minute=15)
    assert found.next_wakeup() == datetime(2026, 3, 2, 1, 15, tzinfo=UTC)


# -- interval ------------------------------------------------------------------------------


def test_every_runs_on_epoch_multiples_plus_the_splay_offset():
    clock = Clock(T0 + timedelta(seconds=0.5))
    found = scheduler(clock, job(schedule={"every": 2}))
    assert found.due() == []  # the plan just arrived: no run for the slot before it
    assert found.next_wakeup() == T0 + timedelta(seconds=2)
    clock.set(T0 + timedelta(seconds=2))
    task = found.due()[0]
    assert task.slot == T0 + timedelta(seconds=2)
    run(found, task)
    assert found.due() == []
    clock.advance(seconds=1.9)
    assert found.due() == []
    clock.advance(seconds=0.1)
    assert [t.slot for t in found.due()] == [T0 + timedelta(seconds=4)]

    hourly = scheduler(Clock(T0), job(schedule={"every": "1h", "splay": "10m"}))
    offset = splay_offset("web1", "etc", 600)
    assert hourly.next_wakeup() == T0 + timedelta(seconds=offset)


def test_jobs_without_a_schedule_run_only_on_demand():
    clock = Clock(T0)
    found = scheduler(clock, job())
    clock.advance(days=30)
    assert found.due() == []
    assert found.next_wakeup() is None


# -- catch-up ------------------------------------------------------------------------------


def test_missed_runs_are_caught_up_once_after_downtime(tmp_path):
    state = tmp_path / STATE_FILE
    clock = Clock(T0)
    jobs = [job(schedule={"cron": "15 2 * * *"})]
    first = scheduler(clock, *jobs, state=state)
    clock.set(T0.replace(hour=2, minute=15))
    run(first, first.due()[0])

    clock.set(T0 + timedelta(days=5, hours=10))  # down for five nights
    again = scheduler(clock, *jobs, state=state)  # a new process, same state dir
    due = again.due()
    assert due == [Task("etc", "backup", T0.replace(hour=2, minute=15) + timedelta(days=5))]
    run(again, due[0])
    assert again.due() == []
    clock.advance(hours=16)
    assert again.due() == []
    clock.advance(hours=1)
    assert len(again.due()) == 1  # and then the next night as usual


def test_a_restart_without_a_missed_slot_runs_nothing(tmp_path):
    state = tmp_path / STATE_FILE
    clock = Clock(T0)
    jobs = [job(schedule={"cron": "15 2 * * *"})]
    first = scheduler(clock, *jobs, state=state)
    clock.set(T0.replace(hour=2, minute=15))
    run(first, first.due()[0])
    clock.set(T0.replace(hour=9))
    assert scheduler(clock, *jobs, state=state).due() == []


def test_a_task_never_run_is_caught_up_from_when_it_was_first_seen(tmp_path):
    state = tmp_path / STATE_FILE
    clock = Clock(T0.replace(hour=1))
    jobs = [job(schedule={"cron": "15 2 * * *"})]
    scheduler(clock, *jobs, state=state)  # plan received at 01:00, agent down before 02:15
    clock.set(T0.replace(hour=8))
    assert len(scheduler(clock, *jobs, state=state).due()) == 1


def test_an_interrupted_run_does_not_consume_its_slot(tmp_path):
    state = tmp_path / STATE_FILE
    clock = Clock(T0)
    jobs = [job(schedule={"cron": "15 2 * * *"})]
    found = scheduler(clock, *jobs, state=state)
    clock.set(T0.replace(hour=2, minute=15))
    task = found.due()[0]
    assert run(found, task, "interrupted") == []
    clock.advance(minutes=5)
    assert scheduler(clock, *jobs, state=state).due() == [task]  # after a restart: again


def test_a_failed_run_consumes_its_slot():
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"every": 60}, retention={"keep_last": 3}))
    clock.advance(minutes=1)
    assert run(found, found.due()[0], "failure") == []  # and no retention after a failure
    assert found.due() == []


def test_a_changed_schedule_starts_afresh_without_an_immediate_run(tmp_path):
    state = tmp_path / STATE_FILE
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"cron": "15 2 * * *"}), state=state)
    clock.set(T0.replace(hour=2, minute=15))
    run(found, found.due()[0])
    clock.set(T0.replace(hour=10))
    found.set_plan(plan(job(schedule={"cron": "0 3 * * *"})))
    assert found.due() == []
    assert found.next_wakeup() == T0.replace(hour=3) + timedelta(days=1)
    # an unchanged schedule in a new plan keeps its history
    found.set_plan(plan(job(schedule={"cron": "0 3 * * *"}, full_every=3)))
    assert found.next_wakeup() == T0.replace(hour=3) + timedelta(days=1)


def test_an_unreadable_state_file_starts_afresh(tmp_path):
    state = tmp_path / STATE_FILE
    state.write_text("{not json")
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"every": 60}), state=state)
    assert found.due() == []
    clock.advance(minutes=1)
    run(found, found.due()[0])
    assert '"etc:backup"' in state.read_text()


# -- overlap -------------------------------------------------------------------------------


def test_runs_of_one_job_never_overlap_and_a_long_run_is_followed_by_one_catch_up():
    clock = Clock(T0)
    found = scheduler(
        clock,
        job(schedule={"every": 10}, restore_test={"every": 10}),
        job("var", schedule={"every": 10}),
    )
    clock.advance(seconds=10)
    first = found.due()[0]
    found.start(first)
    assert [t.job for t in found.due()] == ["var"]  # the other job may run
    clock.advance(seconds=95)  # the run takes nine slots
    assert [t.job for t in found.due()] == ["var"]
    with pytest.raises(RuntimeError, match="already running"):
        found.start(Task("etc", "verify", clock.now))
    assert found.finished(first, "success") == []
    due = found.due()
    assert [(t.job, t.kind) for t in due] == [
        ("etc", "backup"),
        ("var", "backup"),
        ("etc", "verify"),
    ]
    assert due[0].slot == T0 + timedelta(seconds=100)  # one run for the nine slots missed
    assert [t.job for t in found.running] == []


# -- restore tests and retention -----------------------------------------------------------


def test_restore_tests_follow_their_own_period_after_a_first_backup():
    clock = Clock(T0)
    found = scheduler(
        clock,
        job(schedule={"cron": "0 * * * *"}, restore_test={"every": "1d", "sample": 5}),
    )
    offset = splay_offset("web1", "etc/restore_test", 86400)
    test_slot = T0 + timedelta(seconds=offset)
    clock.set(test_slot + timedelta(days=1))
    assert [t.kind for t in found.due()] == ["backup"]  # no snapshot yet: nothing to test
    run(found, found.due()[0])
    due = found.due()
    assert due == [Task("etc", "verify", test_slot + timedelta(days=1))]
    run(found, due[0])
    assert found.due() == []
    clock.advance(hours=23)
    assert [t.kind for t in found.due()] == ["backup"]
    run(found, found.due()[0])
    clock.advance(hours=1)
    assert [t.kind for t in found.due()] == ["backup", "verify"]


def test_disabled_restore_tests_are_never_due():
    clock = Clock(T0)
    found = scheduler(clock, job(schedule={"every": 60}, restore_test={"enabled": False}))
    clock.advance(minutes=1)
    run(found, found.due()[0])
    clock.advance(days=30)
    assert [t.kind for t in found.due()] == ["backup"]


def test_retention_follows_each_successful_backup():
    clock = Clock(T0)
    found = scheduler(
        clock,
        job(schedule={"every": 60}, retention={"keep_daily": 7}),
        job("all", schedule={"every": 60}),  # keeps everything: nothing to forget
    )
    clock.advance(minutes=1)
    etc, every = found.due()
    follow = run(found, etc, "warning")
    assert follow == [Task("etc", "forget")]
    assert found.due() == [every]  # etc is busy with its retention
    assert found.finished(follow[0], "success") == []
    assert run(found, every) == []


def test_slots_latest_and_next():
    slots = Slots(None, 60, 7)
    now = T0 + timedelta(seconds=67)
    assert slots.latest(now) == now
    assert slots.next(now) == now + timedelta(seconds=60)
    cron = Slots("*/5 * * * *", None, 30)
    assert cron.latest(T0 + timedelta(minutes=5, seconds=29)) == T0 + timedelta(seconds=30)
    assert cron.next(T0 + timedelta(seconds=30)) == T0 + timedelta(minutes=5, seconds=30)
    assert Slots("*/5 * * * *", None, 30).signature != Slots("*/5 * * * *", None, 31).signature


def test_cron_times_are_computed_again_only_when_a_cron_time_is_reached():
    """The daemon computes cron times in a child process: once per cron time reached, not
    on every wake-up, and the answers are croniter's."""
    asked: list[datetime] = []

    def compute(expression: str, at: datetime) -> tuple[datetime, datetime]:
        asked.append(at)
        return cron_window(expression, at)

    clock = Clock(T0 + timedelta(minutes=1))
    found = Scheduler("web1", clock, cron=CronWindows(compute))
    found.set_plan(plan(job(schedule={"cron": "0 */6 * * *"})))
    for _ in range(50):
        assert found.next_wakeup() == T0 + timedelta(hours=6)
        clock.advance(minutes=7)
    assert len(asked) == 1
    clock.set(T0 + timedelta(hours=6))
    assert [task.slot for task in found.due()] == [T0 + timedelta(hours=6)]
    assert found.next_wakeup() == T0 + timedelta(hours=6)  # due now
    assert len(asked) == 2
    clock.set(T0 + timedelta(hours=5))  # a clock set back leaves the window too
    assert found.next_wakeup() == T0 + timedelta(hours=6)
    assert len(asked) == 3
    local = T0.astimezone(ZoneInfo("Europe/Amsterdam"))
    assert CronWindows(compute).window("0 2 * * *", local) == cron_window("0 2 * * *", local)
