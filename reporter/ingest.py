"""Messages to MongoDB writes: a batch of deliveries becomes a few bulk writes.

Everything here is pure (no server), so the unit tests hold the rules directly:

- **Coalescing.** Messages about one document (a node's keepalives, a run's progress) are
  merged into one update per batch: the number of writes follows the number of distinct
  nodes, runs and jobs in a batch, not the number of messages.
- **Idempotence.** Every write is keyed by `_id` (node, `<node>/<job>`, `<node>/<run_id>`,
  alert key) or, for alert history, by message id, so a redelivered message rewrites what
  it wrote before and never adds a document.
- **Monotonic guards.** Each field group remembers the time of the message that set it and
  is replaced only by a newer one (an aggregation-pipeline update with `$cond`), so an old
  message redelivered late (a requeued `run_status`, a spooled keepalive) never overwrites
  a newer state, and a run's result always wins over its progress.
- **Fast path.** Pipelines cost the MongoDB-protocol server about a third more per document
  than operators. Nearly always every message of a batch is newer than what its document
  holds, so a node, a run's progress and a job are first written with plain operators
  (`$set`, `$max`, `$min`, `$push`), filtered on the guard times being older than the
  batch's oldest message. A document that holds something newer does not match that
  filter; the upsert then collides with its `_id` (duplicate key), and only that write is
  sent again in its guarded pipeline form (`Write.fast` first, `Write.operation` then).
  A run whose progress and result arrive in one batch is most likely new: it is first
  tried as an insert (less than half the server's cost of an upsert), and an existing
  document makes that collide the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache, partial
from typing import Any

from pymongo import InsertOne, UpdateOne

from broker.messages import Alert, Announce, AnyMessage, Keepalive, RunResult, RunStatus
from broker.plan import Plan
from reporter.store import EPOCH

SUCCESSFUL = ("success", "warning")  # a backup that exists, possibly with warnings
FAILED = ("failure", "interrupted")
MAX_WARNINGS = 50
MAX_TEXT = 4000


@lru_cache(maxsize=65536)
def empty_plan_hash(node: str) -> str:
    """The hash a node reports when its plan has no job: computable, since `issued` is
    left out of the content hash."""
    return Plan(node=node, issued=EPOCH, jobs=[]).content_hash()


def lit(value: Any) -> dict[str, Any]:
    """A constant inside an update pipeline: strings starting with '$' stay strings."""
    return {"$literal": value}


def newer(time: datetime, stored: str) -> dict[str, Any]:
    """True when `time` is later than the stored time at field path `stored`."""
    return {"$gt": [time, {"$ifNull": [stored, EPOCH]}]}


def pick(condition: dict[str, Any], value: Any, current: str) -> dict[str, Any]:
    return {"$cond": [condition, lit(value), current]}


@dataclass
class Write:
    """One write for one collection, and which messages of the batch it carries.

    `operation` (the write that is always right: a guarded pipeline for the documents that
    have a fast path) is built by `build` when first needed: with the fast path it mostly
    never is, and building the pipelines costs the reporter more than the fast writes.
    """

    collection: str
    build: Callable[[], InsertOne | UpdateOne]
    messages: list[int]
    duplicate_ok: bool = False  # an insert keyed by message id: a duplicate means "done"
    fast: UpdateOne | InsertOne | None = None  # tried first; on a duplicate key, `operation`

    @cached_property
    def operation(self) -> InsertOne | UpdateOne:
        return self.build()


def older_than(path: str, time: datetime) -> dict[str, Any]:
    """A filter clause: the time at `path` is missing or older than `time` (as `newer`)."""
    return {path: {"$not": {"$gte": time}}}


@dataclass
class Writes:
    """All writes for one batch, by collection, plus what was ignored."""

    by_collection: dict[str, list[Write]] = field(default_factory=lambda: defaultdict(list))
    ignored: list[int] = field(default_factory=list)

    def add(self, write: Write) -> None:
        self.by_collection[write.collection].append(write)

    def count(self) -> int:
        return sum(len(writes) for writes in self.by_collection.values())


def build_writes(
    messages: Sequence[AnyMessage],
    received: datetime,
    *,
    history: int = 5,
    fast: bool = True,
) -> Writes:
    """The writes that record `messages`, received at `received` (the reporter's clock);
    without `fast`, guarded pipelines only (what the fast path is measured against)."""
    writes = Writes()
    nodes: dict[str, list[int]] = defaultdict(list)
    runs: dict[tuple[str, str], list[int]] = defaultdict(list)
    jobs: dict[tuple[str, str], list[int]] = defaultdict(list)
    alerts: dict[str, list[int]] = defaultdict(list)
    for index, message in enumerate(messages):
        if isinstance(message, Announce | Keepalive):
            nodes[message.node].append(index)
        elif isinstance(message, RunStatus):
            runs[(message.node, message.run_id)].append(index)
        elif isinstance(message, RunResult):
            runs[(message.node, message.run_id)].append(index)
            if message.kind in ("backup", "verify"):
                jobs[(message.node, message.job)].append(index)
        elif isinstance(message, Alert):
            alerts[message.key].append(index)
            insert = partial(InsertOne, history_document(message))
            writes.add(Write("alert_history", insert, [index], True))
        else:
            writes.ignored.append(index)  # plans: the reporter's queue is not bound to them
    for node, indices in nodes.items():
        group = [messages[i] for i in indices]
        guarded = partial(node_update, node, group, received)
        quick = node_fast(node, group, received) if fast else None
        writes.add(Write("nodes", guarded, indices, fast=quick))
    for (node, run_id), indices in runs.items():
        group = [messages[i] for i in indices]
        quick = run_fast(node, run_id, group) if fast else None
        writes.add(Write("runs", partial(run_update, node, run_id, group), indices, fast=quick))
    for (node, job), indices in jobs.items():
        group = [messages[i] for i in indices]
        guarded = partial(job_update, node, job, group, history)
        quick = job_fast(node, job, group, history) if fast else None
        writes.add(Write("jobs", guarded, indices, fast=quick))
    for key, indices in alerts.items():
        group = [messages[i] for i in indices]
        writes.add(Write("alerts", partial(alert_update, key, group), indices))
    return writes


def newest(messages: Iterable[Any], key: str = "time") -> Any:
    return max(messages, key=lambda message: getattr(message, key))


# -- nodes ----------------------------------------------------------------------------------


Guarded = tuple[str, datetime, dict[str, Any]]


def node_groups(
    node: str, messages: Sequence[Announce | Keepalive], received: datetime
) -> list[Guarded]:
    """A node document's field groups: the field holding the time of the message that set
    the group, that message's time, and the values it sets."""
    state = newest(messages)
    groups: list[Guarded] = [
        (
            "state_time",
            state.time,
            {"plan_hash": state.plan_hash, "unprotected": state.plan_hash == empty_plan_hash(node)},
        )
    ]
    keepalives = [message for message in messages if isinstance(message, Keepalive)]
    if keepalives:
        keepalive = newest(keepalives)
        values = {
            "keepalive_interval": keepalive.interval,
            "uptime": keepalive.uptime,
            "running": list(keepalive.running),
            "skew": round((received - keepalive.time).total_seconds(), 3),
        }
        groups.append(("keepalive_time", keepalive.time, values))
    with_facts = [message for message in messages if message.facts is not None]
    if with_facts:
        latest = newest(with_facts)
        groups.append(("facts_time", latest.time, {"facts": latest.facts.model_dump(mode="json")}))
    announces = [message for message in messages if isinstance(message, Announce)]
    if announces:
        announce = newest(announces)
        values = {"agent_version": announce.agent_version, "recipient": announce.recipient}
        groups.append(("announced", announce.time, values))
    return groups


def node_update(
    node: str, messages: Sequence[Announce | Keepalive], received: datetime
) -> UpdateOne:
    """Announces and keepalives of one node, merged.

    `last_seen` is the newest message's own time, but never later than its reception: an
    agent whose clock runs ahead cannot hide its silence, and a backlog replayed after an
    outage still shows when each node was last heard of.
    """
    times = [message.time for message in messages]
    fields: dict[str, Any] = {
        "node": lit(node),
        "first_seen": {"$min": ["$first_seen", min(times)]},
        "last_seen": {"$max": ["$last_seen", min(max(times), received)]},
        "received": {"$max": ["$received", received]},
    }
    for guard, time, values in node_groups(node, messages, received):
        is_newer = newer(time, f"${guard}")
        fields[guard] = {"$max": [f"${guard}", time]}
        fields.update({name: pick(is_newer, value, f"${name}") for name, value in values.items()})
    return UpdateOne({"_id": node}, [{"$set": fields}], upsert=True)


def node_fast(node: str, messages: Sequence[Announce | Keepalive], received: datetime) -> UpdateOne:
    """`node_update` with operators, for a node whose `state_time` is older than every
    message here. `state_time` is the newest time of any announce or keepalive, so it is
    at least `keepalive_time`, `announced` and `facts_time`: every guard would pass."""
    times = [message.time for message in messages]
    fields: dict[str, Any] = {"node": node}
    for guard, time, values in node_groups(node, messages, received):
        fields[guard] = time
        fields.update(values)
    return UpdateOne(
        {"_id": node, **older_than("state_time", min(times))},
        {
            "$set": fields,
            "$max": {"last_seen": min(max(times), received), "received": received},
            "$min": {"first_seen": min(times)},
        },
        upsert=True,
    )


# -- runs -----------------------------------------------------------------------------------


def run_id_of(node: str, run_id: str) -> str:
    return f"{node}/{run_id}"


def split_run(
    messages: Sequence[RunStatus | RunResult],
) -> tuple[list[RunResult], list[RunStatus]]:
    """A run's results and its progress statuses."""
    results = [message for message in messages if isinstance(message, RunResult)]
    statuses = [message for message in messages if isinstance(message, RunStatus)]
    return results, statuses


def progress_of(status: RunStatus) -> dict[str, Any]:
    return {
        "time": status.time,
        "phase": status.phase,
        "files_done": status.files_done,
        "bytes_done": status.bytes_done,
        "files_total": status.files_total,
        "bytes_total": status.bytes_total,
        "message_id": status.id,
    }


def progress_fast(node: str, run_id: str, statuses: Sequence[RunStatus]) -> UpdateOne:
    """`run_update` for progress only, with operators: for a run not final and whose
    progress is older than every status here (or a run not seen yet)."""
    status = newest(statuses)
    first = min(s.time for s in statuses)
    fields = {
        "node": node,
        "job": status.job,
        "run_id": run_id,
        "kind": status.kind,
        "progress": progress_of(status),
        "state": "running",
        "final": False,
    }
    return UpdateOne(
        {
            "_id": run_id_of(node, run_id),
            "final": {"$ne": True},
            **older_than("progress.time", first),
        },
        {"$set": fields, "$min": {"first_status": first}},
        upsert=True,
    )


def run_fast(
    node: str, run_id: str, messages: Sequence[RunStatus | RunResult]
) -> UpdateOne | InsertOne | None:
    """The fast write for one run: progress with operators; a result with progress in the
    same batch (the whole run, most likely, so no document yet) as an insert, which costs
    SecantusDB less than half an upsert; a lone result has none (its `$set` is plain)."""
    results, statuses = split_run(messages)
    if not results:
        return progress_fast(node, run_id, statuses)
    if not statuses:
        return None
    document = result_document(newest(results))
    first = min(status.time for status in statuses)
    return InsertOne({"_id": run_id_of(node, run_id), **document, "first_status": first})


def run_update(node: str, run_id: str, messages: Sequence[RunStatus | RunResult]) -> UpdateOne:
    """One run: its result, if the batch holds one, else its newest progress."""
    results, statuses = split_run(messages)
    key = {"_id": run_id_of(node, run_id)}
    if results:
        result = newest(results)
        document = result_document(result)
        update: dict[str, Any] = {"$set": document}
        if statuses:
            update["$min"] = {"first_status": min(status.time for status in statuses)}
        return UpdateOne(key, update, upsert=True)
    status = newest(statuses)
    progress = progress_of(status)
    not_final = {"$ne": [{"$ifNull": ["$final", False]}, True]}
    fields = {
        "node": lit(node),
        "job": lit(status.job),
        "run_id": lit(run_id),
        "kind": lit(status.kind),
        "first_status": {"$min": ["$first_status", min(s.time for s in statuses)]},
        "progress": pick(
            {"$and": [not_final, newer(status.time, "$progress.time")]}, progress, "$progress"
        ),
        "state": {"$cond": [not_final, "running", "$state"]},
        "final": {"$ifNull": ["$final", False]},
    }
    return UpdateOne(key, [{"$set": fields}], upsert=True)


def result_document(result: RunResult) -> dict[str, Any]:
    return {
        "node": result.node,
        "job": result.job,
        "run_id": result.run_id,
        "kind": result.kind,
        "state": result.status,
        "final": True,
        "started": result.started,
        "finished": result.finished,
        "duration": round((result.finished - result.started).total_seconds(), 3),
        "snapshot": result.snapshot,
        "full": result.full,
        "stats": result.stats.model_dump(mode="json"),
        "warnings": [text[:MAX_TEXT] for text in result.warnings[:MAX_WARNINGS]],
        "warning_count": len(result.warnings),
        "error": result.error[:MAX_TEXT] if result.error else None,
        "hooks": [hook.model_dump(mode="json") for hook in result.hooks],
        "result_id": result.id,
        "result_time": result.time,
    }


# -- jobs -----------------------------------------------------------------------------------


def backup_summary(result: RunResult) -> dict[str, Any]:
    return {
        "time": result.finished,
        "started": result.started,
        "status": result.status,
        "run_id": result.run_id,
        "duration": round((result.finished - result.started).total_seconds(), 3),
        "files": result.stats.files,
        "bytes_read": result.stats.bytes_read,
        "bytes_stored": result.stats.bytes_stored,
        "snapshot": result.snapshot,
        "full": result.full,
        "error": result.error[:MAX_TEXT] if result.error else None,
    }


def verify_summary(result: RunResult) -> dict[str, Any]:
    return {
        "time": result.finished,
        "status": result.status,
        "run_id": result.run_id,
        "duration": round((result.finished - result.started).total_seconds(), 3),
        "files_checked": result.stats.files_checked,
        "files_failed": result.stats.files_failed,
        "volumes_tested": result.stats.volumes_tested,
        "coverage": result.stats.coverage,
        "snapshot": result.snapshot,
        "error": result.error[:MAX_TEXT] if result.error else None,
    }


Summary = Callable[[RunResult], dict[str, Any]]


def job_summaries(results: Sequence[RunResult]) -> list[tuple[str, list[RunResult], Summary]]:
    """Each summary field of a job document, with the results that may set it."""
    backups = [result for result in results if result.kind == "backup"]
    verifies = [result for result in results if result.kind == "verify"]
    return [
        ("last_backup", backups, backup_summary),
        ("last_success", [r for r in backups if r.status in SUCCESSFUL], backup_summary),
        ("last_failure", [r for r in backups if r.status in FAILED], backup_summary),
        ("last_verify", verifies, verify_summary),
        ("last_verify_success", [r for r in verifies if r.status in SUCCESSFUL], verify_summary),
    ]


def success_times(results: Sequence[RunResult]) -> list[datetime]:
    return sorted({r.finished for r in results if r.kind == "backup" and r.status in SUCCESSFUL})


def job_update(node: str, job: str, results: Sequence[RunResult], history: int) -> UpdateOne:
    """What the watchdog and `muster status` need per job: the newest backup, success,
    failure and restore test, and the finish times of the last `history` successes
    (a set, kept sorted: a redelivered result adds nothing)."""
    fields: dict[str, Any] = {
        "node": lit(node),
        "job": lit(job),
        "first_result": {"$min": ["$first_result", min(r.finished for r in results)]},
    }
    for name, chosen, summary in job_summaries(results):
        if chosen:
            last = newest(chosen, "finished")
            fields[name] = pick(newer(last.finished, f"${name}.time"), summary(last), f"${name}")
    times = success_times(results)
    if times:
        union = {"$setUnion": [{"$ifNull": ["$success_times", []]}, times]}
        fields["success_times"] = {
            "$slice": [{"$sortArray": {"input": union, "sortBy": 1}}, -history]
        }
    return UpdateOne({"_id": f"{node}/{job}"}, [{"$set": fields}], upsert=True)


def job_fast(node: str, job: str, results: Sequence[RunResult], history: int) -> UpdateOne:
    """`job_update` with operators, for a job whose summaries the results here would all
    replace: each summary's stored time is older than the oldest result that sets it.
    Then every new success is newer than `success_times` (none newer than `last_success`),
    so `$push` adds no duplicate."""
    guards: dict[str, Any] = {}
    fields: dict[str, Any] = {"node": node, "job": job}
    for name, chosen, summary in job_summaries(results):
        if chosen:
            guards.update(older_than(f"{name}.time", min(r.finished for r in chosen)))
            fields[name] = summary(newest(chosen, "finished"))
    update: dict[str, Any] = {
        "$set": fields,
        "$min": {"first_result": min(r.finished for r in results)},
    }
    times = success_times(results)
    if times:
        update["$push"] = {"success_times": {"$each": times, "$sort": 1, "$slice": -history}}
    return UpdateOne({"_id": f"{node}/{job}", **guards}, update, upsert=True)


# -- alerts ---------------------------------------------------------------------------------


def _alert_text(alert: Alert) -> dict[str, Any]:
    """What an alert says, as stored both in its document and in its history."""
    return {
        "key": alert.key,
        "kind": alert.kind,
        "state": alert.state,
        "severity": alert.severity,
        "source": alert.source,
        "node": alert.node,
        "job": alert.job,
        "summary": alert.summary[:MAX_TEXT],
        "details": alert.details,
    }


def history_document(alert: Alert) -> dict[str, Any]:
    return {"_id": alert.id, **_alert_text(alert), "time": alert.time}


def alert_fields(alert: Alert, published: bool) -> dict[str, Any]:
    """The alert document's fields that one state change sets."""
    return {
        **_alert_text(alert),
        "change_time": alert.time,
        "message_id": alert.id,
        "published": published,
        "resolved_at": alert.time if alert.state == "resolved" else None,
    }


def alert_update(key: str, alerts: Sequence[Alert]) -> UpdateOne:
    """Alerts received on the broker.

    The reporter's own alerts come back on `alert.#` too: their document was written by the
    watchdog before it published them, so an echo only confirms the publication (and is
    kept in the history). Alerts from agents and rule engines replace the document when
    they are newer than the state it holds; `opened` keeps the time the condition began.
    """
    last = newest(alerts)
    if last.source == "reporter":
        return UpdateOne(
            {"_id": key, "message_id": {"$in": [alert.id for alert in alerts]}},
            {"$set": {"published": True}},
        )
    changes: list[dict[str, Any]] = [lit(alert_fields(last, published=True))]
    if last.state == "open":
        changes.append({"opened": {"$cond": [{"$eq": ["$state", "open"]}, "$opened", last.time]}})
    merged = {"$mergeObjects": ["$$ROOT", *changes]}
    return UpdateOne(
        {"_id": key},
        [{"$replaceWith": {"$cond": [newer(last.time, "$change_time"), merged, "$$ROOT"]}}],
        upsert=True,
    )
