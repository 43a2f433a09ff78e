"""`muster forget`: drop the snapshots a job's retention no longer keeps, and their data.

Order is what makes an interruption harmless. The records of the forgotten snapshots go
first: from then on no reader sees those snapshots, and no remaining record points at
anything that is deleted later. Their catalogs go next, then every volume that no
remaining snapshot refers to (its own volumes and its `references`). A volume shared
with a kept incremental snapshot stays, whichever snapshot wrote it. A run that stops
half-way leaves only objects no record needs, which the next forget removes.

Objects of a snapshot that has no record and did not start before the last committed
snapshot finished may belong to a backup still being written, so they are left alone
(the backup itself removes them if it was interrupted). `dry_run` deletes nothing and
reports what would go.
"""

from dataclasses import dataclass, field
from datetime import datetime

from agent.repository import Repository
from agent.retention import select_kept, utc
from agent.storage import NotFound
from broker.plan import Retention
from broker.snapshot import SnapshotRecord, catalog_name, job_prefix, record_name, snapshot_of


@dataclass
class ForgetOutcome:
    kept: list[SnapshotRecord] = field(default_factory=list)  # oldest first
    forgotten: list[SnapshotRecord] = field(default_factory=list)  # oldest first
    deleted_objects: list[str] = field(default_factory=list)  # names under the job, in order
    freed_bytes: int = 0
    reasons: dict[str, list[str]] = field(default_factory=dict)  # kept id -> rules
    dry_run: bool = False


def run_forget(
    repo: Repository, retention: Retention, dry_run: bool, now: datetime | None = None
) -> ForgetOutcome:
    records = repo.snapshots()
    kept, forgotten, reasons = select_kept(records, retention, now)
    outcome = ForgetOutcome(kept, forgotten, reasons=reasons, dry_run=dry_run)
    newest = max((utc(r.finished) for r in records), default=None)
    sizes = _sizes(repo, "snapshots/")
    for record in forgotten:
        _delete(repo, outcome, record_name(record.id), sizes)
    remaining = kept if dry_run else repo.snapshots()  # a backup may have committed since
    committed = {r.id for r in remaining}
    gone = {r.id for r in forgotten}
    needed = set().union(*(r.all_volumes() for r in remaining))

    def garbage(name: str) -> bool:
        owner = snapshot_of(name)
        if owner is None or owner in committed:
            return False
        return owner in gone or _older(owner, newest)

    catalogs = _sizes(repo, "catalogs/")
    for name in [catalog_name(r.id) for r in forgotten] + sorted(catalogs):
        if name in catalogs and garbage(name) and name not in outcome.deleted_objects:
            _delete(repo, outcome, name, catalogs)
    volumes = _sizes(repo, "volumes/")
    for name in volumes:
        if name not in needed and (snapshot_of(name) in committed or garbage(name)):
            _delete(repo, outcome, name, volumes)
    return outcome


def _sizes(repo: Repository, folder: str) -> dict[str, int]:
    """Object name (relative to the job) -> stored bytes, for one folder of the job."""
    prefix = job_prefix(repo.node, repo.job)
    return {
        info.name.removeprefix(prefix): info.size for info in repo.storage.list(prefix + folder)
    }


def _delete(repo: Repository, outcome: ForgetOutcome, name: str, sizes: dict[str, int]) -> None:
    if not outcome.dry_run:
        try:
            repo.delete(name)
        except NotFound:
            return
    outcome.deleted_objects.append(name)
    outcome.freed_bytes += sizes.get(name, 0)


def _older(snapshot_id: str, newest: datetime | None) -> bool:
    """Whether a snapshot id's time (its start, to the second) lies before the second in
    which the last committed snapshot finished: then no backup can still be writing it,
    since a backup starts after every committed record was written (one writer a job)."""
    if newest is None:
        return False
    started = datetime.strptime(snapshot_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=newest.tzinfo)
    return started < newest.replace(microsecond=0)
