"""What operators read: the fleet's status, and reports over a period (aggregations)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from reporter.ingest import SUCCESSFUL
from reporter.store import Store, as_utc


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _backup(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {
        "time": iso(summary.get("time")),
        "status": summary.get("status"),
        "duration": summary.get("duration"),
        "bytes_read": summary.get("bytes_read"),
        "bytes_stored": summary.get("bytes_stored"),
        "files": summary.get("files"),
        "snapshot": summary.get("snapshot"),
        "error": summary.get("error"),
    }


def _verify(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {
        "time": iso(summary.get("time")),
        "status": summary.get("status"),
        "files_checked": summary.get("files_checked"),
        "files_failed": summary.get("files_failed"),
        "error": summary.get("error"),
    }


def fleet_status(store: Store) -> list[dict[str, Any]]:
    """One entry per node (nodes that only sent results included), sorted by node, each
    with its jobs, open alerts and the running runs."""
    nodes: dict[str, dict[str, Any]] = {}
    projection = {"facts": 0}
    for doc in store.nodes.find({}, projection):
        nodes[doc["_id"]] = {
            "node": doc["_id"],
            "last_seen": iso(doc.get("last_seen")),
            "first_seen": iso(doc.get("first_seen")),
            "keepalive_interval": doc.get("keepalive_interval"),
            "plan_hash": doc.get("plan_hash"),
            "unprotected": bool(doc.get("unprotected")),
            "agent_version": doc.get("agent_version"),
            "running": doc.get("running") or [],
            "jobs": [],
            "alerts": [],
        }

    def entry(node: str) -> dict[str, Any]:
        if node not in nodes:
            nodes[node] = {"node": node, "last_seen": None, "jobs": [], "alerts": [], "running": []}
        return nodes[node]

    for job in store.jobs.find({}).sort([("node", 1), ("job", 1)]):
        entry(job["node"])["jobs"].append(
            {
                "job": job["job"],
                "last_backup": _backup(job.get("last_backup")),
                "last_success": _backup(job.get("last_success")),
                "last_restore_test": _verify(job.get("last_verify")),
            }
        )
    for alert in store.alerts.find({"state": "open"}).sort("_id", 1):
        target = entry(alert["node"]) if alert.get("node") else None
        item = {
            "key": alert["_id"],
            "kind": alert.get("kind"),
            "severity": alert.get("severity"),
            "source": alert.get("source"),
            "summary": alert.get("summary"),
            "since": iso(alert.get("opened") or alert.get("change_time")),
        }
        if target is not None:
            target["alerts"].append(item)
        else:
            entry("(fleet)")["alerts"].append(item)
    return [nodes[name] for name in sorted(nodes)]


def report(store: Store, since: datetime) -> dict[str, Any]:
    """Success rate, bytes, durations and restore-test coverage per job and for the fleet,
    over the runs that finished since `since` (MongoDB aggregation pipelines)."""
    match = {"$match": {"final": True, "finished": {"$gte": since}}}
    per_job = [
        match,
        {
            "$group": {
                "_id": {"node": "$node", "job": "$job", "kind": "$kind"},
                "runs": {"$sum": 1},
                "succeeded": {"$sum": {"$cond": [{"$in": ["$state", list(SUCCESSFUL)]}, 1, 0]}},
                "warnings": {"$sum": {"$cond": [{"$eq": ["$state", "warning"]}, 1, 0]}},
                "failed": {"$sum": {"$cond": [{"$eq": ["$state", "failure"]}, 1, 0]}},
                "interrupted": {"$sum": {"$cond": [{"$eq": ["$state", "interrupted"]}, 1, 0]}},
                "bytes_read": {"$sum": "$stats.bytes_read"},
                "bytes_stored": {"$sum": "$stats.bytes_stored"},
                "duration_total": {"$sum": "$duration"},
                "duration_max": {"$max": "$duration"},
                "last": {"$max": "$finished"},
            }
        },
        {"$sort": {"_id.node": 1, "_id.job": 1, "_id.kind": 1}},
    ]
    fleet_pipeline = [
        match,
        {
            "$group": {
                "_id": "$kind",
                "runs": {"$sum": 1},
                "succeeded": {"$sum": {"$cond": [{"$in": ["$state", list(SUCCESSFUL)]}, 1, 0]}},
                "bytes_read": {"$sum": "$stats.bytes_read"},
                "bytes_stored": {"$sum": "$stats.bytes_stored"},
                "duration_total": {"$sum": "$duration"},
                "duration_max": {"$max": "$duration"},
            }
        },
        {"$sort": {"_id": 1}},
    ]
    jobs: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    for row in store.runs.aggregate(per_job):
        key = (row["_id"]["node"], row["_id"]["job"])
        jobs[key][row["_id"]["kind"]] = _rates(row)
    rows = []
    for (node, job), kinds in sorted(jobs.items()):
        rows.append(
            {
                "node": node,
                "job": job,
                "backup": kinds.get("backup"),
                "restore_test": kinds.get("verify"),
                "restore_tested": bool(kinds.get("verify", {}).get("succeeded")),
                **{
                    kind: value for kind, value in kinds.items() if kind not in ("backup", "verify")
                },
            }
        )
    fleet = {row["_id"]: _rates(row) for row in store.runs.aggregate(fleet_pipeline)}
    backed_up = [row for row in rows if row["backup"]]
    tested = [row for row in backed_up if row["restore_tested"]]
    return {
        "since": iso(since),
        "jobs": rows,
        "fleet": {
            "nodes": len({row["node"] for row in rows}),
            "jobs": len(rows),
            "backup": fleet.get("backup"),
            "restore_test": fleet.get("verify"),
            **{kind: value for kind, value in fleet.items() if kind not in ("backup", "verify")},
            "restore_test_coverage": round(len(tested) / len(backed_up), 4) if backed_up else None,
            "jobs_without_restore_test": [
                f"{r['node']}/{r['job']}" for r in backed_up if not r["restore_tested"]
            ],
        },
    }


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    runs = row["runs"] or 0
    result = {
        "runs": runs,
        "succeeded": row["succeeded"],
        "success_rate": round(row["succeeded"] / runs, 4) if runs else None,
        "bytes_read": row.get("bytes_read") or 0,
        "bytes_stored": row.get("bytes_stored") or 0,
        "duration_avg": round((row.get("duration_total") or 0) / runs, 3) if runs else None,
        "duration_max": row.get("duration_max"),
    }
    for name in ("warnings", "failed", "interrupted"):
        if name in row:
            result[name] = row[name]
    if "last" in row:
        result["last"] = iso(row["last"])
    return result
