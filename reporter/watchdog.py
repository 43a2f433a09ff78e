"""The watchdog: alerts for silent nodes, overdue backups, failed restore tests and
unprotected nodes, each raised and resolved by the reporter itself.

It runs inside every reporter instance, every `watchdog_interval` seconds, and reads only
MongoDB, so any number of instances may run it. A state change is claimed with one
`findOneAndUpdate` whose filter matches only if the stored alert is not already in the
wanted state: of two instances deciding the same change, one updates the document and
publishes the `Alert`, the other matches nothing and publishes nothing.

The alert document is written before the `Alert` is published, with `published: false`;
a publish that fails (broker away) is retried by the next tick that finds the document
still unpublished after `republish_after` seconds, with the same message id, so a
subscriber that keeps ids sees each change once.

Silence is judged against what the reporter has ingested (`judging_time`): while its
queue holds a backlog, "now" for the keepalive check is the service's watermark (about
the newest sender time it has written), so keepalives still waiting in the queue do not
read as silence. A tick stops once it has spent `budget` seconds on changes and says
`unfinished`; the rest follows on the next ticks, so a mass event never holds ingestion
for long.

The decisions themselves (`keepalive_verdict`, `overdue_verdict`, ...) are pure functions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from broker.messages import Alert, AnyMessage
from broker.reporter_config import ReporterSettings
from reporter.ingest import SUCCESSFUL, alert_fields, history_document
from reporter.store import EPOCH, Store, as_utc

log = logging.getLogger(__name__)

REPORTER_KINDS = ("keepalive", "overdue", "restore_test", "unprotected")
BUDGET = 1.0  # seconds of alert changes per tick, at most (one change always goes through)


def advance_watermark(
    current: datetime | None, messages: Sequence[AnyMessage], received: datetime
) -> datetime | None:
    """The watermark after writing `messages`: their median sender time, each clamped to
    `received` as `last_seen` is, never moving back. The median, not the newest, so that a
    few agents whose clocks run ahead cannot pull it up to the wall clock."""
    if not messages:
        return current
    median = statistics.median_low([min(as_utc(m.time), received) for m in messages])
    return median if current is None else max(current, median)


def judging_time(
    wall: datetime, watermark: datetime | None, backlog: int | None, batch_size: int
) -> datetime | None:
    """The time the keepalive check takes as now: the wall clock when the queue holds at
    most one batch (or its depth is unknown); with a backlog, the watermark (never later
    than the wall clock); with a backlog and no watermark yet, None: nothing to judge by."""
    if backlog is None or backlog <= batch_size:
        return wall
    return None if watermark is None else min(watermark, wall)


@dataclass(frozen=True)
class Verdict:
    """What a condition is now: None when it is clear, else the alert to hold open."""

    severity: str
    summary: str
    details: dict[str, Any]


def seconds(value: float) -> str:
    """A duration for a summary: 45 s, 12 min, 3.5 h, 2.0 d."""
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def keepalive_verdict(
    node: dict[str, Any], now: datetime, settings: ReporterSettings
) -> Verdict | None:
    last_seen = as_utc(node.get("last_seen"))
    if last_seen is None:
        return None
    interval = node.get("keepalive_interval") or settings.default_keepalive_interval
    silence = (now - last_seen).total_seconds()
    missed = silence / interval
    if missed < settings.keepalive_warning:
        return None
    severity = "critical" if missed >= settings.keepalive_critical else "warning"
    summary = f"{node['_id']} silent for {seconds(silence)} ({missed:.1f} keepalive intervals)"
    skew = node.get("skew")
    if isinstance(skew, int | float) and abs(skew) > interval:
        summary += f"; its clock was {skew:+.0f} s off"
    details = {
        "last_seen": last_seen.isoformat(),
        "interval": interval,
        "silent_seconds": round(silence, 1),
    }
    return Verdict(severity, summary, details)


def usual_interval(success_times: list[datetime]) -> float | None:
    """The upper median of the gaps between recent successful backups; None with fewer
    than two gaps (a single gap may be a manual run right after a scheduled one)."""
    times = sorted(as_utc(t) for t in success_times if t is not None)
    gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(times))
    gaps = [gap for gap in gaps if gap > 0]
    if len(gaps) < 2:
        return None
    return gaps[len(gaps) // 2]


def allowed_age(job: dict[str, Any], settings: ReporterSettings) -> tuple[float, str] | None:
    """How old a job's last success may be, and why; None when nothing says."""
    configured = settings.max_age_for(job["node"], job["job"])
    if configured is not None:
        return float(configured), "configured max_age"
    usual = usual_interval(job.get("success_times") or [])
    if usual is not None:
        return usual + settings.overdue_margin, (
            f"usual interval {seconds(usual)} + margin {seconds(settings.overdue_margin)}"
        )
    if settings.default_max_age is not None:
        return float(settings.default_max_age), "default_max_age"
    return None


def overdue_verdict(
    job: dict[str, Any], now: datetime, settings: ReporterSettings
) -> Verdict | None:
    allowed = allowed_age(job, settings)
    if allowed is None:
        return None
    limit, reason = allowed
    success = (job.get("last_success") or {}).get("time")
    reference = as_utc(success) or as_utc(job.get("first_result"))
    if reference is None:
        return None
    age = (now - reference).total_seconds()
    if age <= limit:
        return None
    severity = "critical" if age > limit * settings.overdue_critical else "warning"
    name = f"{job['node']}/{job['job']}"
    if success is None:
        summary = f"{name} has no successful backup; first result {seconds(age)} ago"
    else:
        summary = f"{name}: last successful backup {seconds(age)} ago"
    summary += f" (allowed {seconds(limit)}: {reason})"
    details = {
        "last_success": reference.isoformat() if success is not None else None,
        "age_seconds": round(age, 1),
        "allowed_seconds": limit,
        "rule": reason,
    }
    last_backup = job.get("last_backup") or {}
    if last_backup.get("status") not in (None, *SUCCESSFUL):
        details["last_status"] = last_backup.get("status")
        details["last_error"] = last_backup.get("error")
    return Verdict(severity, summary, details)


def restore_test_verdict(job: dict[str, Any]) -> Verdict | bool | None:
    """A failed last restore test opens the alert, a successful one resolves it; an
    interrupted one (or none yet) decides nothing: False."""
    verify = job.get("last_verify")
    if not verify or verify.get("status") == "interrupted":
        return False
    if verify.get("status") in SUCCESSFUL:
        return None
    name = f"{job['node']}/{job['job']}"
    error = verify.get("error") or f"{verify.get('files_failed', 0)} files failed"
    summary = f"restore test of {name} failed: {error}"
    details = {
        "run_id": verify.get("run_id"),
        "time": as_utc(verify.get("time")).isoformat() if verify.get("time") else None,
        "files_checked": verify.get("files_checked"),
        "files_failed": verify.get("files_failed"),
        "snapshot": verify.get("snapshot"),
    }
    return Verdict("critical", summary[:1000], details)


def unprotected_verdict(
    node: dict[str, Any], now: datetime, settings: ReporterSettings
) -> Verdict | None:
    if node.get("unprotected"):
        summary = f"{node['_id']} holds an empty plan: no rule gives it a backup job"
        return Verdict("warning", summary, {"plan_hash": node.get("plan_hash")})
    first_seen = as_utc(node.get("first_seen"))
    if node.get("plan_hash") is None and first_seen is not None:
        waited = (now - first_seen).total_seconds()
        if waited > settings.unprotected_grace:
            summary = f"{node['_id']} has held no plan for {seconds(waited)}"
            return Verdict("warning", summary, {"plan_hash": None})
    return None


def lowers(
    alert: dict[str, Any] | None, verdict: Verdict | None, node: dict[str, Any] | None
) -> bool:
    """Whether `verdict` would resolve or lower an open keepalive alert although the node
    has not been heard of since the alert recorded its `last_seen`."""
    if alert is None or node is None:
        return False
    lowered = verdict is None or (alert["severity"], verdict.severity) == ("critical", "warning")
    if not lowered:
        return False
    raised = (alert.get("details") or {}).get("last_seen")
    last_seen = as_utc(node.get("last_seen"))
    if raised is None or last_seen is None:
        return False
    return last_seen <= datetime.fromisoformat(raised)


class Watchdog:
    """Evaluates every condition and records (and publishes) each change of an alert."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[Alert], None],
        settings: ReporterSettings,
        clock: Callable[[], datetime],
        *,
        backlog: Callable[[], int | None] = lambda: None,
        watermark: Callable[[], datetime | None] = lambda: None,
        budget: float = BUDGET,
    ) -> None:
        self.store = store
        self.publish = publish
        self.settings = settings
        self.clock = clock
        self.backlog = backlog
        self.watermark = watermark
        self.budget = budget
        self.changes = 0
        self.unfinished = False
        self._deadline = 0.0
        self._tick_start = 0

    def tick(self) -> int:
        """One check, bounded by `budget`; returns how many alert changes this instance
        made. `unfinished` tells whether changes were left for the next tick."""
        now = self.clock()
        before = self._tick_start = self.changes
        self._deadline = time.monotonic() + self.budget
        self.unfinished = False
        silence_now = judging_time(now, self.watermark(), self.backlog(), self.settings.batch_size)
        if silence_now is not None:
            self.check_keepalives(silence_now, judged_by_wall=silence_now == now)
        for check in (self.check_nodes, self.check_jobs, self.republish):
            if not self.unfinished:  # once spent, not even the reads: the next tick redoes them
                check(now)
        return self.changes - before

    def _spent(self) -> bool:
        """True once this tick made a change and used its budget: the rest waits."""
        if self.changes > self._tick_start and time.monotonic() >= self._deadline:
            self.unfinished = True
        return self.unfinished

    # -- conditions ---------------------------------------------------------------------

    def _open_alerts(self, kind: str) -> dict[str, dict[str, Any]]:
        """Open alerts of a kind: {key: {node, severity}} as this tick starts."""
        query = {"state": "open", "kind": kind}
        projection = {"_id": 1, "node": 1, "severity": 1, "details.last_seen": 1}
        return {doc["_id"]: doc for doc in self.store.alerts.find(query, projection)}

    def _decide(
        self,
        open_now: dict[str, dict[str, Any]],
        key: str,
        kind: str,
        node: str | None,
        job: str | None,
        verdict: Verdict | None,
    ) -> None:
        """Change the alert only if the verdict differs from what was open at the start of
        this tick (the claim in raise_/resolve settles races with other instances)."""
        current = open_now.get(key)
        if verdict is None and current is None:
            return
        if verdict is not None and current is not None and current["severity"] == verdict.severity:
            return
        if not self._spent():
            self.apply(key, kind, node, job, verdict)

    def silent_query(self, now: datetime) -> dict[str, Any]:
        """Nodes silent for at least `keepalive_warning` of their own intervals."""
        interval = {"$ifNull": ["$keepalive_interval", self.settings.default_keepalive_interval]}
        limit = {"$multiply": [interval, 1000.0 * self.settings.keepalive_warning]}
        return {"$expr": {"$lt": ["$last_seen", {"$subtract": [now, limit]}]}}

    def check_keepalives(self, now: datetime, judged_by_wall: bool = True) -> None:
        """Raise, escalate or resolve keepalive alerts as of `now`. Judged by a watermark
        (`judged_by_wall` false), which differs a little between instances, an alert is
        lowered or resolved only if its node was heard of since it was raised: otherwise
        an instance a little further behind would undo what another raised, and flap."""
        projection = {"last_seen": 1, "keepalive_interval": 1, "skew": 1}
        open_now = self._open_alerts("keepalive")
        pending = dict(open_now)
        for node in self.store.nodes.find(self.silent_query(now), projection):
            if self.unfinished:
                return
            key = f"keepalive:{node['_id']}"
            pending.pop(key, None)
            verdict = keepalive_verdict(node, now, self.settings)
            if judged_by_wall or not lowers(open_now.get(key), verdict, node):
                self._decide(open_now, key, "keepalive", node["_id"], None, verdict)
        for key, alert in pending.items():  # open, but the node is no longer late
            if self.unfinished:
                return
            node = self.store.nodes.find_one({"_id": alert.get("node")}, projection)
            verdict = keepalive_verdict(node, now, self.settings) if node else None
            if judged_by_wall or not lowers(alert, verdict, node):
                self._decide(open_now, key, "keepalive", alert.get("node"), None, verdict)

    def check_nodes(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.settings.unprotected_grace)
        query = {"$or": [{"unprotected": True}, {"plan_hash": None, "first_seen": {"$lt": cutoff}}]}
        projection = {"unprotected": 1, "plan_hash": 1, "first_seen": 1}
        open_now = self._open_alerts("unprotected")
        pending = dict(open_now)
        for node in self.store.nodes.find(query, projection):
            if self.unfinished:
                return
            key = f"unprotected:{node['_id']}"
            pending.pop(key, None)
            verdict = unprotected_verdict(node, now, self.settings)
            self._decide(open_now, key, "unprotected", node["_id"], None, verdict)
        for key, alert in pending.items():
            if self.unfinished:
                return
            node = self.store.nodes.find_one({"_id": alert.get("node")}, projection)
            verdict = unprotected_verdict(node, now, self.settings) if node else None
            self._decide(open_now, key, "unprotected", alert.get("node"), None, verdict)

    def check_jobs(self, now: datetime) -> None:
        projection = {
            "node": 1,
            "job": 1,
            "last_success": 1,
            "last_backup": 1,
            "first_result": 1,
            "success_times": 1,
            "last_verify": 1,
        }
        overdue_now = self._open_alerts("overdue")
        restore_now = self._open_alerts("restore_test")
        for job in self.store.jobs.find({}, projection):
            if self.unfinished:
                return
            node, name = job["node"], job["job"]
            overdue = overdue_verdict(job, now, self.settings)
            self._decide(overdue_now, f"overdue:{node}/{name}", "overdue", node, name, overdue)
            restore = restore_test_verdict(job)
            if restore is not False:
                key = f"restore_test:{node}/{name}"
                self._decide(restore_now, key, "restore_test", node, name, restore or None)

    # -- state changes ------------------------------------------------------------------

    def apply(
        self, key: str, kind: str, node: str | None, job: str | None, verdict: Verdict | None
    ) -> bool:
        if verdict is None:
            return self.resolve(key, kind, node, job)
        return self.raise_(key, kind, node, job, verdict)

    def raise_(self, key: str, kind: str, node: str | None, job: str | None, v: Verdict) -> bool:
        alert = Alert(
            key=key,
            kind=kind,
            state="open",
            severity=v.severity,  # type: ignore[arg-type]
            source="reporter",
            node=node,
            job=job,
            summary=v.summary,
            details=v.details,
            time=self.clock(),
        )
        fields = alert_fields(alert, published=False)
        fields["opened"] = {"$cond": [{"$eq": ["$state", "open"]}, "$opened", alert.time]}
        fields = {
            name: value if name == "opened" else {"$literal": value}
            for name, value in fields.items()
        }
        claim = {"_id": key, "$or": [{"state": {"$ne": "open"}}, {"severity": {"$ne": v.severity}}]}
        try:
            self.store.alerts.find_one_and_update(
                claim, [{"$set": fields}], upsert=True, return_document=ReturnDocument.BEFORE
            )
        except DuplicateKeyError:
            return False  # open with this severity already: nothing changed
        return self._changed(alert)

    def resolve(self, key: str, kind: str, node: str | None, job: str | None) -> bool:
        current = self.store.alerts.find_one({"_id": key, "state": "open"})
        if current is None:
            return False
        alert = Alert(
            key=key,
            kind=kind,
            state="resolved",
            severity=current.get("severity") or "warning",
            source="reporter",
            node=node,
            job=job,
            summary=f"resolved: {current.get('summary', key)}"[:1000],
            details=current.get("details") or {},
            time=self.clock(),
        )
        claim = {"_id": key, "state": "open", "message_id": current.get("message_id")}
        before = self.store.alerts.find_one_and_update(
            claim, {"$set": alert_fields(alert, published=False)}
        )
        if before is None:
            return False  # another instance changed it first
        return self._changed(alert)

    def _changed(self, alert: Alert) -> bool:
        self.changes += 1
        log.warning("alert %s %s (%s): %s", alert.key, alert.state, alert.severity, alert.summary)
        with contextlib.suppress(DuplicateKeyError):
            self.store.alert_history.insert_one(history_document(alert))
        self._publish(alert)
        return True

    def _publish(self, alert: Alert) -> None:
        try:
            self.publish(alert)
        except Exception as error:  # the broker is away: the outbox retries
            log.warning("cannot publish alert %s yet: %s", alert.key, error)
            return
        self.store.alerts.update_one(
            {"_id": alert.key, "message_id": alert.id}, {"$set": {"published": True}}
        )

    def republish(self, now: datetime) -> None:
        """Publish again what a failed publish left unconfirmed (same message id)."""
        cutoff = now - timedelta(seconds=self.settings.republish_after)
        query = {"published": False, "source": "reporter", "change_time": {"$lt": cutoff}}
        for doc in self.store.alerts.find(query):
            if self._spent():
                return
            alert = Alert(
                id=doc["message_id"],
                time=as_utc(doc["change_time"]) or EPOCH,
                key=doc["_id"],
                kind=doc["kind"],
                state=doc["state"],
                severity=doc.get("severity") or "warning",
                source="reporter",
                node=doc.get("node"),
                job=doc.get("job"),
                summary=doc.get("summary") or doc["_id"],
                details=doc.get("details") or {},
            )
            log.info("publishing alert %s again (%s)", alert.key, alert.id)
            self._publish(alert)
