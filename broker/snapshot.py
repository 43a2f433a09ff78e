"""The repository's public layout and the snapshot record, the commit point of a backup.

Under a target's prefix, each node writes only `<node>/<job>/`:

    snapshots/<id>.json              the record, written last: no record, no snapshot
    catalogs/<id>.jsonl.zst.age      every entry of the snapshot, one JSON object per line
    volumes/<id>/<n>.tar.zst.age     pax tar streams, zstd frames, age encryption

The record is plain JSON and names no file, so the reporter can rebuild history from
storage without any key, while everything that reveals content stays encrypted.
"""

import re
from datetime import datetime
from typing import Literal

from pydantic import Field

from broker.plan import ContractModel
from broker.types import AgeRecipient, JobName, NodeId, UtcDatetime

FORMAT = "muster/1"
SNAPSHOT_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_snapshot_id(when: datetime) -> str:
    """The start time to the microsecond, so that ids sort as snapshots were taken (one
    writer per job: two runs never start in the same microsecond)."""
    return when.strftime("%Y%m%dT%H%M%SZ") + f"-{when.microsecond:06d}"


def job_prefix(node: str, job: str) -> str:
    return f"{node}/{job}/"


def record_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json"


def catalog_name(snapshot_id: str) -> str:
    return f"catalogs/{snapshot_id}.jsonl.zst.age"


def volume_name(snapshot_id: str, number: int) -> str:
    return f"volumes/{snapshot_id}/{number:05d}.tar.zst.age"


def snapshot_of(name: str) -> str | None:
    """The snapshot id an object name belongs to, or None for foreign objects."""
    for part in re.split(r"[/.]", name):
        if SNAPSHOT_ID.match(part):
            return part
    return None


class ObjectInfo(ContractModel):
    name: str
    size: int = Field(ge=0, description="bytes stored, i.e. ciphertext")
    sha256: str = Field(description="of the stored bytes: integrity checks need no key")


class VolumeInfo(ObjectInfo):
    header_length: int = Field(gt=0, description="age header + nonce: where chunk 0 starts")
    members: int = Field(ge=0)


class SnapshotStats(ContractModel):
    files: int = 0
    directories: int = 0
    bytes: int = Field(default=0, description="logical size of every file in the snapshot")
    files_new: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    bytes_new: int = Field(default=0, description="file bytes read and stored by this run")
    bytes_stored: int = Field(default=0, description="volume and catalog bytes written")


class SnapshotRecord(ContractModel):
    format: Literal["muster/1"] = FORMAT
    id: str = Field(pattern=SNAPSHOT_ID.pattern)
    node: NodeId
    job: JobName
    started: UtcDatetime
    finished: UtcDatetime
    full: bool
    parent: str | None = None
    chain: int = Field(default=0, ge=0, description="incrementals since the last full")
    paths: list[str]
    catalog: ObjectInfo
    volumes: list[VolumeInfo] = []
    references: list[str] = Field(
        default=[], description="volumes of earlier snapshots that this catalog points into"
    )
    recipients: list[AgeRecipient]
    stats: SnapshotStats = SnapshotStats()
    agent_version: str

    def all_volumes(self) -> set[str]:
        """Every volume this snapshot needs: its own and those it shares with its parents."""
        return {volume.name for volume in self.volumes} | set(self.references)
