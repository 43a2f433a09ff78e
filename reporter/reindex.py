"""`muster reporter reindex`: snapshot history rebuilt from storage, never the other way.

Storage is the source of truth: under a target's prefix every node writes
`<node>/<job>/snapshots/<id>.json`, a plain JSON record that needs no key to read. Reindex
lists those records, upserts one `snapshots` document per record, and removes documents of
that repository (and node glob) whose record is gone (forgotten snapshots).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from pymongo import ReplaceOne

from agent.storage import NotFound, Storage
from broker.snapshot import SNAPSHOT_ID, SnapshotRecord
from reporter.store import Store

log = logging.getLogger(__name__)

RECORD = re.compile(r"^(?P<node>[^/]+)/(?P<job>[^/]+)/snapshots/(?P<id>[^/]+)\.json$")
BATCH = 500


@dataclass
class Outcome:
    found: int = 0
    written: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)


def repo_key(url: str) -> str:
    """The repository URL without its query (which may name credentials files)."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def record_names(storage: Storage, node_glob: str | None) -> Iterator[tuple[str, str, str, str]]:
    """(name, node, job, snapshot id) of every snapshot record; a glob without wildcards
    lists only that node's objects."""
    literal = node_glob and not any(c in node_glob for c in "*?[")
    for info in storage.list(f"{node_glob}/" if literal else ""):
        match = RECORD.match(info.name)
        if not match or not SNAPSHOT_ID.match(match["id"]):
            continue
        if node_glob and not fnmatch.fnmatchcase(match["node"], node_glob):
            continue
        yield info.name, match["node"], match["job"], match["id"]


def snapshot_document(record: SnapshotRecord, repo: str) -> dict[str, Any]:
    volumes_bytes = sum(volume.size for volume in record.volumes)
    return {
        "_id": f"{record.node}/{record.job}/{record.id}",
        "repo": repo,
        "node": record.node,
        "job": record.job,
        "snapshot": record.id,
        "started": record.started,
        "finished": record.finished,
        "duration": round((record.finished - record.started).total_seconds(), 3),
        "full": record.full,
        "parent": record.parent,
        "chain": record.chain,
        "paths": record.paths,
        "volumes": len(record.volumes),
        "references": len(record.references),
        "bytes_stored": volumes_bytes + record.catalog.size,
        "stats": record.stats.model_dump(mode="json"),
        "agent_version": record.agent_version,
        "format": record.format,
    }


def reindex(store: Store, storage: Storage, repo_url: str, node_glob: str | None) -> Outcome:
    repo = repo_key(repo_url)
    outcome = Outcome()
    seen: set[str] = set()
    pending: list[ReplaceOne] = []
    for name, node, job, snapshot_id in record_names(storage, node_glob):
        outcome.found += 1
        try:
            with storage.get(name) as stream:
                record = SnapshotRecord.model_validate_json(stream.read())
        except NotFound:
            continue  # forgotten between listing and reading
        except ValidationError as error:
            outcome.errors.append(f"{name}: not a snapshot record ({error.error_count()} errors)")
            continue
        if (record.node, record.job, record.id) != (node, job, snapshot_id):
            outcome.errors.append(
                f"{name}: the record names {record.node}/{record.job}/{record.id}"
            )
            continue
        document = snapshot_document(record, repo)
        seen.add(document["_id"])
        pending.append(ReplaceOne({"_id": document["_id"]}, document, upsert=True))
        if len(pending) >= BATCH:
            outcome.written += _write(store, pending)
    outcome.written += _write(store, pending)
    gone = [
        doc["_id"]
        for doc in store.snapshots.find({"repo": repo}, {"_id": 1, "node": 1})
        if doc["_id"] not in seen
        and (not node_glob or fnmatch.fnmatchcase(doc.get("node", ""), node_glob))
    ]
    if gone:
        outcome.removed = store.snapshots.delete_many({"_id": {"$in": gone}}).deleted_count
    store.barrier()
    return outcome


def _write(store: Store, pending: list[ReplaceOne]) -> int:
    if not pending:
        return 0
    result = store.snapshots.bulk_write(pending, ordered=False)
    count = result.upserted_count + result.matched_count
    pending.clear()
    return count
