"""The reporter's rules without servers: settings, how messages become writes, the
watchdog's decisions, and what the operators' commands print."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pymongo import InsertOne, UpdateOne

from broker.errors import InvalidMessage
from broker.messages import Alert, Announce, Keepalive, RunResult, RunStats, RunStatus
from broker.plan import Plan
from broker.reporter_config import ReporterSettings
from reporter.cli import describe, parse_since
from reporter.ingest import build_writes, empty_plan_hash
from reporter.watchdog import (
    Verdict,
    advance_watermark,
    allowed_age,
    judging_time,
    keepalive_verdict,
    lowers,
    overdue_verdict,
    restore_test_verdict,
    unprotected_verdict,
    usual_interval,
)
from tests.examples import RECIPIENT, facts

T = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def keepalive(node: str = "web1", at: datetime = T, **fields) -> Keepalive:
    return Keepalive(node=node, uptime=1, time=at, **fields)


def status(run_id: str = "r1", at: datetime = T, done: int = 1) -> RunStatus:
    return RunStatus(node="web1", job="etc", run_id=run_id, kind="backup", time=at, files_done=done)


def result(
    run_id: str = "r1",
    finished: datetime = T,
    kind: str = "backup",
    state: str = "success",
    node: str = "web1",
) -> RunResult:
    return RunResult(
        node=node,
        job="etc",
        run_id=run_id,
        kind=kind,
        status=state,
        started=finished - timedelta(seconds=30),
        finished=finished,
        time=finished,
        stats=RunStats(files=3, bytes_read=10, bytes_stored=5),
    )


def settings(**values) -> ReporterSettings:
    return ReporterSettings(**values)


# -- settings ---------------------------------------------------------------------------------


def test_settings_come_from_flags_then_environment_then_file(tmp_path, monkeypatch):
    config = tmp_path / "reporter.yaml"
    config.write_text("mongo_url: mongodb://file/\ndatabase: fromfile\nbatch_size: 7\n")
    monkeypatch.setenv("MUSTER_MONGO_URL", "mongodb://env/")
    loaded = ReporterSettings.load(config, database="fromflag")
    assert loaded.mongo_url == "mongodb://env/"
    assert loaded.database == "fromflag"
    assert loaded.batch_size == 7
    assert loaded.effective_prefetch == 14


def test_max_age_accepts_globs_and_durations_from_the_environment(monkeypatch):
    monkeypatch.setenv("MUSTER_MAX_AGE", "db*/pg=2h, etc=26h")
    loaded = ReporterSettings.load(None)
    assert loaded.max_age == {"db*/pg": 7200, "etc": 93600}
    assert loaded.max_age_for("db1", "pg") == 7200
    assert loaded.max_age_for("web1", "etc") == 93600
    assert loaded.max_age_for("web1", "www") is None


def test_thresholds_must_be_ordered():
    with pytest.raises(InvalidMessage, match="keepalive_critical"):
        ReporterSettings.load(None, keepalive_warning=5, keepalive_critical=2)


# -- ingest -----------------------------------------------------------------------------------


def test_an_empty_plan_hash_is_computable_for_any_node():
    later = Plan(node="web1", issued=T + timedelta(days=3), jobs=[])
    assert empty_plan_hash("web1") == later.content_hash()
    assert empty_plan_hash("web2") != empty_plan_hash("web1")


def test_messages_about_one_document_become_one_write():
    messages = [
        keepalive(at=T),
        keepalive(at=T + timedelta(seconds=20)),
        Announce(node="web1", facts=facts("web1"), agent_version="1", recipient=RECIPIENT, time=T),
        keepalive(node="web2"),
        status("r1", T),
        status("r1", T + timedelta(seconds=2)),
        result("r1", T + timedelta(seconds=3)),
        status("r2", T),
    ]
    writes = build_writes(messages, T + timedelta(minutes=1))
    assert len(writes.by_collection["nodes"]) == 2
    assert len(writes.by_collection["runs"]) == 2
    assert len(writes.by_collection["jobs"]) == 1
    first = writes.by_collection["nodes"][0]
    assert first.messages == [0, 1, 2]
    run = writes.by_collection["runs"][0].operation
    assert isinstance(run, UpdateOne)
    document = run._doc["$set"]  # a result: a plain $set that finalises the run
    assert document["final"] is True and document["state"] == "success"


def test_user_strings_stay_literal_in_update_pipelines():
    node = keepalive(plan_hash="$where")
    update = build_writes([node], T).by_collection["nodes"][0].operation._doc
    assert {"$literal": "$where"} in update[0]["$set"]["plan_hash"]["$cond"]


def test_alerts_keep_history_by_message_id_and_echoes_only_confirm():
    own = Alert(key="keepalive:web1", kind="keepalive", state="open", source="reporter",
                node="web1", summary="silent")  # fmt: skip
    agent = Alert(key="plan_rejected:web1", kind="plan_rejected", state="open", source="agent",
                  node="web1", summary="bad plan")  # fmt: skip
    writes = build_writes([own, agent], T)
    history = writes.by_collection["alert_history"]
    assert [w.operation._doc["_id"] for w in history] == [own.id, agent.id]
    assert all(isinstance(w.operation, InsertOne) and w.duplicate_ok for w in history)
    echo, forwarded = (w.operation for w in writes.by_collection["alerts"])
    assert echo._filter == {"_id": own.key, "message_id": {"$in": [own.id]}}
    assert echo._doc == {"$set": {"published": True}} and not echo._upsert
    assert forwarded._upsert


# -- watchdog decisions -----------------------------------------------------------------------


def test_keepalive_warning_then_critical_in_intervals_of_the_node():
    rules = settings(keepalive_warning=3, keepalive_critical=5)
    node = {"_id": "web1", "last_seen": T, "keepalive_interval": 10}
    assert keepalive_verdict(node, T + timedelta(seconds=29), rules) is None
    warning = keepalive_verdict(node, T + timedelta(seconds=31), rules)
    assert warning and warning.severity == "warning" and "web1 silent for 31 s" in warning.summary
    critical = keepalive_verdict(node, T + timedelta(seconds=51), rules)
    assert critical and critical.severity == "critical"
    unknown_interval = {"_id": "web1", "last_seen": T}
    assert keepalive_verdict(unknown_interval, T + timedelta(seconds=59), rules) is None


def test_the_watermark_is_the_median_sender_time_clamped_to_reception_and_never_goes_back():
    batch = [keepalive(at=T + timedelta(seconds=s)) for s in (0, 10, 20)]
    ahead = [*batch, *(keepalive(at=T + timedelta(hours=5)) for _ in range(2))]
    received = T + timedelta(minutes=10)
    assert advance_watermark(None, batch, received) == T + timedelta(seconds=10)
    assert advance_watermark(None, ahead, received) == T + timedelta(seconds=20)
    assert advance_watermark(None, [keepalive(at=T + timedelta(hours=5))], received) == received
    later = T + timedelta(minutes=1)
    assert advance_watermark(later, batch, received) == later, "it never moves back"
    assert advance_watermark(later, [], received) == later
    assert advance_watermark(None, [], received) is None


def test_silence_is_judged_by_the_watermark_only_while_more_than_a_batch_waits():
    wall, mark = T + timedelta(minutes=5), T
    assert judging_time(wall, mark, backlog=20, batch_size=20) == wall
    assert judging_time(wall, mark, backlog=21, batch_size=20) == mark
    assert judging_time(wall, mark, backlog=None, batch_size=20) == wall, "depth unknown"
    assert judging_time(wall, None, backlog=21, batch_size=20) is None, "nothing to judge by"
    assert judging_time(T, wall, backlog=21, batch_size=20) == T, "never after the wall clock"


def test_by_the_watermark_an_alert_is_lowered_only_for_a_node_heard_of_since():
    alert = {"severity": "critical", "details": {"last_seen": T.isoformat()}}
    silent, heard = {"last_seen": T}, {"last_seen": T + timedelta(seconds=1)}
    warning, critical = Verdict("warning", "", {}), Verdict("critical", "", {})
    assert lowers(alert, None, silent) and lowers(alert, warning, silent)
    assert not lowers(alert, None, heard) and not lowers(alert, warning, heard)
    assert not lowers(alert, critical, silent)
    assert not lowers({**alert, "severity": "warning"}, critical, silent), "escalating"
    assert not lowers(None, warning, silent), "raising"


def test_usual_interval_is_the_upper_median_of_at_least_two_gaps():
    hourly = [T + timedelta(hours=h) for h in range(4)]
    assert usual_interval(hourly) == 3600
    assert usual_interval(hourly[:2]) is None
    with_manual_run = [*hourly, hourly[-1] + timedelta(minutes=5)]
    assert usual_interval(with_manual_run) == 3600
    assert usual_interval([T, T, T + timedelta(hours=1), T + timedelta(hours=2)]) == 3600


def test_allowed_age_prefers_max_age_then_history_then_the_default():
    job = {"node": "db1", "job": "pg", "success_times": [T + timedelta(hours=h) for h in range(3)]}
    assert allowed_age(job, settings(max_age={"db*/pg": 600}))[0] == 600
    assert allowed_age(job, settings(overdue_margin=60))[0] == 3660
    young = {"node": "db1", "job": "pg", "success_times": [T]}
    assert allowed_age(young, settings()) is None
    assert allowed_age(young, settings(default_max_age=86400))[0] == 86400


def test_overdue_warning_then_critical_and_never_succeeded_jobs():
    rules = settings(max_age={"etc": 3600}, overdue_critical=2)
    job = {"node": "web1", "job": "etc", "last_success": {"time": T}, "first_result": T}
    assert overdue_verdict(job, T + timedelta(minutes=59), rules) is None
    warning = overdue_verdict(job, T + timedelta(minutes=61), rules)
    assert warning and warning.severity == "warning"
    assert "last successful backup" in warning.summary
    critical = overdue_verdict(job, T + timedelta(hours=2, seconds=1), rules)
    assert critical and critical.severity == "critical"
    never = {"node": "web1", "job": "etc", "first_result": T, "last_backup": {"status": "failure"}}
    verdict = overdue_verdict(never, T + timedelta(hours=3), rules)
    assert verdict and "no successful backup" in verdict.summary
    assert verdict.details["last_status"] == "failure"


def test_restore_test_verdicts():
    assert restore_test_verdict({"node": "a", "job": "b"}) is False
    failed = {"node": "a", "job": "b", "last_verify": {"status": "failure", "error": "bad mac"}}
    verdict = restore_test_verdict(failed)
    assert verdict and verdict.severity == "critical" and "bad mac" in verdict.summary
    assert (
        restore_test_verdict({"node": "a", "job": "b", "last_verify": {"status": "success"}})
        is None
    )
    interrupted = {"node": "a", "job": "b", "last_verify": {"status": "interrupted"}}
    assert restore_test_verdict(interrupted) is False


def test_unprotected_verdicts():
    rules = settings(unprotected_grace=300)
    assert unprotected_verdict({"_id": "a", "unprotected": True}, T, rules)
    fresh = {"_id": "a", "plan_hash": None, "first_seen": T}
    assert unprotected_verdict(fresh, T + timedelta(seconds=299), rules) is None
    assert unprotected_verdict(fresh, T + timedelta(seconds=301), rules)
    assert (
        unprotected_verdict({"_id": "a", "plan_hash": "sha256:1", "first_seen": T}, T, rules)
        is None
    )


# -- commands ---------------------------------------------------------------------------------


def test_since_reads_durations_phrases_and_dates():
    assert parse_since("7d", T) == T - timedelta(days=7)
    assert parse_since("90m", T) == T - timedelta(minutes=90)
    assert parse_since("3 days ago", T) == T - timedelta(days=3)
    assert parse_since("2026-11-20", T) == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_since("2026-11-20T10:00:00+01:00", T) == datetime(2026, 11, 20, 9, tzinfo=UTC)


def test_follow_lines_read_as_sentences():
    progress = RunStatus(node="web1", job="etc", run_id="r", kind="backup", time=T,
                         files_done=3, bytes_done=1024, bytes_total=4096)  # fmt: skip
    line = describe(progress.model_dump(mode="json"))
    assert line == "12:00:00 web1 etc backup running: 3 files, 1.0 KiB / 4.0 KiB (25%)"
    done = describe(result("r", T, state="failure").model_dump(mode="json") | {"error": "boom"})
    assert done.startswith("12:00:00 web1 etc backup failure in 30.0 s, 5 B stored")
    assert done.endswith(": boom")
    tested = result("r", T, kind="verify").model_dump(mode="json")
    tested["stats"] |= {"files_checked": 120, "files_failed": 2}
    assert describe(tested).startswith("12:00:00 web1 etc verify success in 30.0 s, 120 files "
                                       "checked, 2 failed")  # fmt: skip
    alert = Alert(key="keepalive:web1", kind="keepalive", state="open", severity="critical",
                  source="reporter", node="web1", summary="web1 silent", time=T)  # fmt: skip
    assert describe(alert.model_dump(mode="json")) == (
        "12:00:00 ALERT open critical keepalive:web1: web1 silent"
    )


def test_the_fast_path_is_guarded_by_the_oldest_message_of_the_batch():
    messages = [keepalive(at=T + timedelta(seconds=20)), keepalive(at=T), status("r1", T)]
    writes = build_writes([*messages, result("r2", T)], T + timedelta(seconds=10))
    node = writes.by_collection["nodes"][0].fast
    assert node._filter == {"_id": "web1", "state_time": {"$not": {"$gte": T}}} and node._upsert
    assert node._doc["$set"]["uptime"] == 1 and node._doc["$min"] == {"first_seen": T}
    assert node._doc["$max"]["last_seen"] == T + timedelta(seconds=10), "never after received"
    progress, final = writes.by_collection["runs"]
    assert progress.fast._filter["final"] == {"$ne": True}
    assert final.fast is None, "a result always takes its plain $set"
    unguarded = build_writes(messages, T, fast=False)
    assert all(w.fast is None for ws in unguarded.by_collection.values() for w in ws)


def test_the_fast_job_write_pushes_each_success_once_in_order():
    later, earlier = result("r2", T + timedelta(hours=1)), result("r1", T)
    job = build_writes([later, earlier, later], T, history=3).by_collection["jobs"][0].fast
    assert job._filter["last_success.time"] == {"$not": {"$gte": T}}
    push = job._doc["$push"]["success_times"]
    assert push == {"$each": [T, T + timedelta(hours=1)], "$sort": 1, "$slice": -3}
    assert job._doc["$set"]["last_success"]["run_id"] == "r2"
