"""MongoDB: the reporter's collections, their indexes, durable writes.

Collections (one database, `ReporterSettings.database`):

| collection | one document per | `_id` |
| --- | --- | --- |
| `nodes` | node that announced or kept alive | node id |
| `jobs` | node and job that reported a backup or restore test | `<node>/<job>` |
| `runs` | run (backup, verify, forget, restore) | `<node>/<run_id>` |
| `alerts` | alert condition, open or resolved | the alert key |
| `alert_history` | alert message (every state change) | the message id |
| `snapshots` | snapshot record found in storage by `reindex` | `<node>/<job>/<snapshot>` |
| `reporter_meta` | reporter instance (its journal barrier) | `barrier:<instance>` |

Node ids and job names never contain `/`, so the compound ids are unambiguous. Every write
is an upsert keyed by `_id` (or an insert keyed by message id), so a redelivered message
never adds a document.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from pymongo import ASCENDING, DESCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.write_concern import WriteConcern

from broker.reporter_config import ReporterSettings

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Each batch is written on this many connections at once (reporter.service.write_batch):
# the MongoDB-protocol server serves each on a thread of its own and overlaps their work.
LANES = 2

COLLECTIONS = ("nodes", "jobs", "runs", "alerts", "alert_history", "snapshots", "reporter_meta")

INDEXES: dict[str, list[tuple[list[tuple[str, int]], str]]] = {
    # nodes: none but _id. The watchdog's scan for silent nodes reads them all anyway (the
    # threshold depends on each node's interval), and an index on last_seen would be
    # rewritten by every keepalive.
    "jobs": [([("node", ASCENDING), ("job", ASCENDING)], "node_job")],
    # `muster report --since`, and a job's run history
    "runs": [
        ([("finished", DESCENDING)], "finished"),
        ([("node", ASCENDING), ("job", ASCENDING), ("started", DESCENDING)], "node_job_started"),
    ],
    # open alerts by kind (watchdog, status, metrics); an outbox of unpublished ones
    "alerts": [
        ([("state", ASCENDING), ("kind", ASCENDING)], "state_kind"),
        ([("published", ASCENDING), ("source", ASCENDING)], "published"),
    ],
    "alert_history": [([("key", ASCENDING), ("time", DESCENDING)], "key_time")],
    "snapshots": [
        ([("node", ASCENDING), ("job", ASCENDING), ("started", DESCENDING)], "node_job_started"),
        ([("repo", ASCENDING), ("node", ASCENDING)], "repo_node"),
    ],
}


def as_utc(value: datetime | None) -> datetime | None:
    """MongoDB keeps milliseconds in UTC; the client hands them back aware (tz_aware)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Store:
    """One MongoDB database with the reporter's write concern.

    `w` applies to every write; with `journal`, each batch ends with one `j: true` write
    (a *barrier*): a server journals in order, so once it returns, everything written
    before it on that server is on disk too. That costs one journal flush per batch
    instead of one per document.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        w: int | str = "majority",
        journal: bool = True,
        timeout: float = 5.0,
        instance: str = "reporter",
        client: MongoClient | None = None,
    ) -> None:
        millis = int(timeout * 1000)
        self.client: MongoClient = client or MongoClient(
            url,
            tz_aware=True,
            serverSelectionTimeoutMS=millis,
            connectTimeoutMS=millis,
            socketTimeoutMS=max(millis * 6, 30_000),
            retryWrites=True,
            appname="muster-reporter",
        )
        self.db: Database = self.client.get_database(database, write_concern=WriteConcern(w=w))
        self.journal = journal
        self.instance = instance
        self._barrier = self.db.get_collection(
            "reporter_meta", write_concern=WriteConcern(w=w, j=True)
        )
        # Threads for writing parts of one batch at once (reporter.service.write_batch).
        self.lanes = ThreadPoolExecutor(max_workers=LANES - 1, thread_name_prefix="reporter-lane")

    @classmethod
    def from_settings(cls, settings: ReporterSettings, instance: str = "reporter") -> Store:
        return cls(
            settings.mongo_url,
            settings.database,
            w=settings.w,
            journal=settings.journal,
            timeout=settings.mongo_timeout,
            instance=instance,
        )

    def __getattr__(self, name: str) -> Collection:
        if name in COLLECTIONS:
            return self.db[name]
        raise AttributeError(name)

    def ensure_indexes(self) -> None:
        """Create every index the queries need; idempotent, so run on every start."""
        for collection, indexes in INDEXES.items():
            for keys, name in indexes:
                self.db[collection].create_index(keys, name=name)

    def barrier(self) -> None:
        """Return once everything this client wrote before is journaled (see the class)."""
        if self.journal:
            self._barrier.update_one(
                {"_id": f"barrier:{self.instance}"}, {"$inc": {"batches": 1}}, upsert=True
            )

    def ping(self) -> bool:
        try:
            self.client.admin.command("ping")
        except Exception:
            return False
        return True

    def close(self) -> None:
        self.lanes.shutdown(wait=True)
        self.client.close()
