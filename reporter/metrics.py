"""Prometheus metrics at /metrics, served by every reporter instance.

The fleet's metrics are read from MongoDB at scrape time (reused for `metrics_cache`
seconds), so every instance shows the whole fleet and a scrape of any one of them is
enough; the `muster_reporter_*` metrics describe the instance scraped.

    muster_node_last_seen_timestamp_seconds{node}
    muster_node_unprotected{node}
    muster_job_last_success_timestamp_seconds{node,job}
    muster_job_last_backup_timestamp_seconds{node,job}
    muster_job_last_backup_success{node,job}                     1 success/warning, 0 otherwise
    muster_job_last_backup_duration_seconds{node,job}
    muster_job_last_backup_bytes_read{node,job}
    muster_job_last_backup_bytes_stored{node,job}
    muster_job_last_restore_test_timestamp_seconds{node,job}
    muster_job_last_restore_test_success{node,job}
    muster_alerts_open{kind,severity}
    muster_reporter_messages_total{type}, muster_reporter_batches_total,
    muster_reporter_mongo_failures_total, muster_reporter_mongo_up,
    muster_reporter_held_messages, muster_reporter_last_batch_size,
    muster_reporter_last_batch_seconds
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reporter.ingest import SUCCESSFUL
from reporter.store import Store, as_utc

log = logging.getLogger(__name__)

KINDS = ("keepalive", "overdue", "restore_test", "unprotected", "plan_rejected", "rules_invalid")


def timestamp(value: datetime | None) -> float | None:
    value = as_utc(value)
    return value.timestamp() if value is not None else None


class FleetCollector(Collector):
    """Fleet state from MongoDB, plus the counters of one reporter instance."""

    def __init__(
        self, store: Store, reporter: Any | None = None, cache_seconds: float = 5.0
    ) -> None:
        self.store = store
        self.reporter = reporter
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._instance()

    def _fleet(self) -> list[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            try:
                metrics = self._read()
            except Exception as error:  # MongoDB away: serve the instance metrics only
                log.warning("metrics: cannot read MongoDB: %s", str(error)[:300])
                return self._cached[1] if self._cached else []
            self._cached = (now, metrics)
            return metrics

    def _read(self) -> list[Metric]:
        def gauge(name: str, text: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=labels)

        seen = gauge(
            "muster_node_last_seen_timestamp_seconds", "last keepalive or announce", ["node"]
        )
        unprotected = gauge("muster_node_unprotected", "1 when the node's plan is empty", ["node"])
        for node in self.store.nodes.find({}, {"last_seen": 1, "unprotected": 1}):
            if (value := timestamp(node.get("last_seen"))) is not None:
                seen.add_metric([node["_id"]], value)
            unprotected.add_metric([node["_id"]], 1.0 if node.get("unprotected") else 0.0)
        labels = ["node", "job"]
        success = gauge(
            "muster_job_last_success_timestamp_seconds", "end of the last good backup", labels
        )
        backup = gauge("muster_job_last_backup_timestamp_seconds", "end of the last backup", labels)
        ok = gauge("muster_job_last_backup_success", "1 if the last backup succeeded", labels)
        duration = gauge(
            "muster_job_last_backup_duration_seconds", "run time of the last backup", labels
        )
        read = gauge("muster_job_last_backup_bytes_read", "bytes read by the last backup", labels)
        stored = gauge(
            "muster_job_last_backup_bytes_stored", "bytes stored by the last backup", labels
        )
        verify_time = gauge(
            "muster_job_last_restore_test_timestamp_seconds", "end of the last restore test", labels
        )
        verify_ok = gauge(
            "muster_job_last_restore_test_success", "1 if the last restore test passed", labels
        )
        projection = {"node": 1, "job": 1, "last_success": 1, "last_backup": 1, "last_verify": 1}
        for job in self.store.jobs.find({}, projection):
            key = [job["node"], job["job"]]
            good = job.get("last_success") or {}
            if (value := timestamp(good.get("time"))) is not None:
                success.add_metric(key, value)
            last = job.get("last_backup") or {}
            if (value := timestamp(last.get("time"))) is not None:
                backup.add_metric(key, value)
                ok.add_metric(key, 1.0 if last.get("status") in SUCCESSFUL else 0.0)
                duration.add_metric(key, float(last.get("duration") or 0))
                read.add_metric(key, float(last.get("bytes_read") or 0))
                stored.add_metric(key, float(last.get("bytes_stored") or 0))
            verify = job.get("last_verify") or {}
            if (value := timestamp(verify.get("time"))) is not None:
                verify_time.add_metric(key, value)
                verify_ok.add_metric(key, 1.0 if verify.get("status") in SUCCESSFUL else 0.0)
        alerts = gauge("muster_alerts_open", "open alerts", ["kind", "severity"])
        counted = {(kind, severity): 0 for kind in KINDS for severity in ("warning", "critical")}
        pipeline = [
            {"$match": {"state": "open"}},
            {"$group": {"_id": {"kind": "$kind", "severity": "$severity"}, "n": {"$sum": 1}}},
        ]
        for row in self.store.alerts.aggregate(pipeline):
            counted[(row["_id"]["kind"], row["_id"].get("severity") or "warning")] = row["n"]
        for (kind, severity), count in sorted(counted.items()):
            alerts.add_metric([kind, severity], float(count))
        return [seen, unprotected, success, backup, ok, duration, read, stored, verify_time,
                verify_ok, alerts]  # fmt: skip

    def _instance(self) -> Iterator[Metric]:
        reporter = self.reporter
        if reporter is None:
            return
        messages = CounterMetricFamily(
            "muster_reporter_messages", "messages written, by type", labels=["type"]
        )
        for kind in ("announce", "keepalive", "run_status", "run_result", "alert"):
            messages.add_metric([kind], float(reporter.counts.get(kind, 0)))
        yield messages
        yield CounterMetricFamily(
            "muster_reporter_batches", "batches written", value=reporter.counts.get("batches", 0)
        )
        yield CounterMetricFamily(
            "muster_reporter_mongo_failures",
            "batch writes that failed and were retried",
            value=reporter.counts.get("mongo_failures", 0),
        )
        yield CounterMetricFamily(
            "muster_reporter_dead_lettered",
            "invalid messages dead-lettered",
            value=reporter.counts.get("dead_lettered", 0),
        )
        yield GaugeMetricFamily(
            "muster_reporter_mongo_up",
            "1 if the last batch write worked",
            value=float(reporter.mongo_up),
        )
        yield GaugeMetricFamily(
            "muster_reporter_held_messages",
            "messages held unacknowledged: the next batch and the one writing",
            value=reporter.held_count(),
        )
        last = reporter.last_flush
        yield GaugeMetricFamily(
            "muster_reporter_last_batch_size",
            "messages in the last batch",
            value=last.get("size", 0),
        )
        yield GaugeMetricFamily(
            "muster_reporter_last_batch_seconds",
            "time the last batch write took",
            value=last.get("seconds", 0.0),
        )


def serve(
    store: Store, reporter: Any | None, host: str, port: int, cache_seconds: float = 5.0
) -> Callable[[], None]:
    """Serve /metrics on a thread of its own; returns a function that stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, reporter, cache_seconds))
    server, thread = start_http_server(port, host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    stop.port = server.server_port  # type: ignore[attr-defined]
    return stop
