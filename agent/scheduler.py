"""When each job runs: pure timing, no threads, no I/O but one small state file.

Every scheduled task has *slots*, the moments it should run:

* `cron` (five fields, in the time zone of the clock's datetimes; the daemon's clock is the
  node's local time, as with cron(8)): every cron time, shifted by the splay offset;
* `every: N` seconds: the epoch multiples of N, shifted by the splay offset;
* a restore test (`restore_test.every`): the epoch multiples of its period, shifted by an
  offset spread over the whole period.

The splay offset is a hash of node and job modulo `splay`: the same on every start of a
node, different across a fleet, so a thousand nodes with `cron: "0 2 * * *"` and a one-hour
splay do not all hit storage at 02:00, and no node drifts from day to day.

A task is due when its latest slot at or before now is newer than the slot of its last
run. After downtime that spanned several slots, that is true once: the missed run is caught
up once, not once per missed slot. A new task (or one whose schedule changed) starts from
the time it was first seen, so receiving a plan does not set off a run of every job.
The last slot of each task is kept in `schedule.json` in the state directory.

Runs of one job never overlap: while any task of a job runs, none of its others is due.
A run that was interrupted (the agent stopped) does not consume its slot, so it is caught
up when the agent is back. After each successful backup, `finished` hands back the job's
retention (`forget`) as a follow-up task. Restore tests wait for a first successful backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from broker.plan import Job, Plan, Retention

log = logging.getLogger(__name__)

STATE_FILE = "schedule.json"
TaskKind = Literal["backup", "verify", "forget"]
Outcome = Literal["success", "warning", "failure", "interrupted"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)


def splay_offset(node: str, name: str, splay: int) -> int:
    """Seconds in [0, splay): a stable hash, unlike Python's salted `hash()`."""
    if splay <= 0:
        return 0
    digest = hashlib.sha256(f"{node}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % splay


@dataclass(frozen=True)
class Task:
    job: str
    kind: TaskKind
    slot: datetime | None = None  # the slot this run stands for; None for a follow-up

    @property
    def key(self) -> str:
        return f"{self.job}:{self.kind}"


def cron_window(expression: str, at: datetime) -> tuple[datetime, datetime]:
    """The latest time of a cron expression at or before `at`, and the first one after it.
    croniter (with its dateutil, 0.8 MiB) is imported here, on first use: an agent whose
    jobs all run `every:` N seconds never loads it, and the daemon calls this in a child
    process (see CronWindows)."""
    from croniter import croniter

    latest = croniter(expression, at + _TICK).get_prev(datetime)
    return latest, croniter(expression, at).get_next(datetime)


class CronWindows:
    """Cron times, computed by `compute` only when the time asked about leaves the window
    known for that expression: between a cron time and the next, both answers stay the
    same. The daemon passes a `compute` that runs in a forked child, so it never holds
    croniter itself; it forks once per cron time reached, not on every wake-up."""

    def __init__(
        self, compute: Callable[[str, datetime], tuple[datetime, datetime]] = cron_window
    ) -> None:
        self.compute = compute
        self._known: dict[tuple[str, timedelta | None], tuple[datetime, datetime]] = {}

    def window(self, expression: str, at: datetime) -> tuple[datetime, datetime]:
        key = (expression, at.utcoffset())  # cron times are wall-clock times
        known = self._known.get(key)
        if known is None or not known[0] <= at < known[1]:
            known = self._known[key] = self.compute(expression, at)
        return known


_IN_PROCESS = CronWindows()


@dataclass(frozen=True)
class Slots:
    """The slots of one task: a cron expression or a period, plus an offset in seconds."""

    cron: str | None
    every: int | None
    offset: int
    windows: CronWindows = field(default=_IN_PROCESS, compare=False, repr=False)

    @property
    def signature(self) -> str:
        """Changes whenever the slots do (splay included)."""
        what = f"cron={self.cron}" if self.cron is not None else f"every={self.every}"
        return f"{what}+{self.offset}"

    def latest(self, now: datetime) -> datetime:
        """The latest slot at or before `now`."""
        shift = timedelta(seconds=self.offset)
        if self.cron is not None:
            return self.windows.window(self.cron, now - shift)[0] + shift
        assert self.every is not None
        seconds = (now - _EPOCH) // timedelta(seconds=1)
        slot = (seconds - self.offset) // self.every * self.every + self.offset
        return (_EPOCH + timedelta(seconds=slot)).astimezone(now.tzinfo)

    def next(self, now: datetime) -> datetime:
        """The first slot strictly after `now`."""
        shift = timedelta(seconds=self.offset)
        if self.cron is not None:
            return self.windows.window(self.cron, now - shift)[1] + shift
        assert self.every is not None
        return self.latest(now) + timedelta(seconds=self.every)


def backup_slots(node: str, job: Job, windows: CronWindows = _IN_PROCESS) -> Slots | None:
    schedule = job.schedule
    if schedule is None:  # on demand only
        return None
    offset = splay_offset(node, job.name, schedule.splay)
    return Slots(schedule.cron, schedule.every, offset, windows)


def restore_test_slots(node: str, job: Job) -> Slots | None:
    test = job.restore_test
    if job.schedule is None or not test.enabled:
        return None
    return Slots(None, test.every, splay_offset(node, f"{job.name}/restore_test", test.every))


def keeps_everything(retention: Retention) -> bool:
    return not any(retention.model_dump().values())


@dataclass
class _TaskState:
    schedule: str
    since: datetime  # when this schedule was first seen: the baseline of a new task
    last_slot: datetime | None = None
    last_run: datetime | None = None
    last_success: datetime | None = None

    def as_json(self) -> dict[str, str | None]:
        return {
            "schedule": self.schedule,
            "since": self.since.isoformat(),
            "last_slot": _iso(self.last_slot),
            "last_run": _iso(self.last_run),
            "last_success": _iso(self.last_success),
        }

    @classmethod
    def from_json(cls, data: dict) -> _TaskState:
        return cls(
            schedule=str(data["schedule"]),
            since=datetime.fromisoformat(data["since"]),
            last_slot=_parse(data.get("last_slot")),
            last_run=_parse(data.get("last_run")),
            last_success=_parse(data.get("last_success")),
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Scheduler:
    """Which tasks are due, given a plan, a clock and what ran before.

    Thread-safe (one lock), but pure otherwise: time only comes from `clock`, and the only
    side effect is the state file (none when `state_path` is None).
    """

    def __init__(
        self,
        node: str,
        clock: Callable[[], datetime],
        state_path: Path | None = None,
        cron: CronWindows = _IN_PROCESS,
    ) -> None:
        self.node = node
        self.clock = clock
        self.state_path = state_path
        self.cron = cron
        self._lock = threading.RLock()
        self._plan: Plan | None = None
        self._slots: dict[str, tuple[Task, Slots]] = {}  # key -> (template task, slots)
        self._running: dict[str, Task] = {}
        self._state: dict[str, _TaskState] = self._load()

    # -- plan --------------------------------------------------------------------------

    def set_plan(self, plan: Plan | None) -> None:
        """Follow a new plan. Tasks keep their history when their schedule is unchanged."""
        with self._lock:
            self._plan = plan
            self._slots = {}
            for job in plan.jobs if plan else []:
                for kind, slots in (
                    ("backup", backup_slots(self.node, job, self.cron)),
                    ("verify", restore_test_slots(self.node, job)),
                ):
                    if slots is not None:
                        task = Task(job.name, kind)  # type: ignore[arg-type]
                        self._slots[task.key] = (task, slots)
            now = self.clock()
            for key, (_, slots) in self._slots.items():
                state = self._state.get(key)
                if state is None or state.schedule != slots.signature:
                    keep = state.last_success if state and key.endswith(":backup") else None
                    self._state[key] = _TaskState(slots.signature, now, last_success=keep)
            for key in [k for k in self._state if k not in self._slots]:
                del self._state[key]
            self._save()

    def job(self, name: str) -> Job | None:
        with self._lock:
            if self._plan is None:
                return None
            with contextlib.suppress(KeyError):
                return self._plan.job(name)
            return None

    # -- queries -----------------------------------------------------------------------

    def due(self) -> list[Task]:
        """Tasks to run now, backups before restore tests, each standing for its latest
        slot. Nothing is marked: call `start` for the task actually started."""
        with self._lock:
            now = self.clock()
            busy = {task.job for task in self._running.values()}
            found = []
            for task, slots, state in self._tasks():
                if task.job in busy or not self._ready(task):
                    continue
                slot = slots.latest(now)
                if slot > (state.last_slot or state.since):
                    found.append(Task(task.job, task.kind, slot))
            return sorted(found, key=lambda t: t.kind != "backup")

    def next_wakeup(self) -> datetime | None:
        """When a task next becomes due (now if one is), or None if nothing is scheduled."""
        with self._lock:
            now = self.clock()
            if self.due():
                return now
            times = [
                slots.next(now) for task, slots, _ in self._tasks() if task.key not in self._running
            ]
            return min(times, default=None)

    @property
    def running(self) -> list[Task]:
        with self._lock:
            return list(self._running.values())

    def last_success(self, job: str, kind: TaskKind = "backup") -> datetime | None:
        with self._lock:
            state = self._state.get(f"{job}:{kind}")
            return state.last_success if state else None

    # -- transitions -------------------------------------------------------------------

    def start(self, task: Task) -> None:
        with self._lock:
            if task.job in {t.job for t in self._running.values()}:
                raise RuntimeError(f"job {task.job} is already running; runs never overlap")
            self._running[task.key] = task

    def finished(self, task: Task, outcome: Outcome) -> list[Task]:
        """Record a run's end. An interrupted run does not consume its slot. Returns the
        follow-up to run next, already started: `forget` after a successful backup whose
        retention drops anything."""
        with self._lock:
            self._running.pop(task.key, None)
            if outcome == "interrupted":
                return []
            now = self.clock()
            state = self._state.get(task.key)
            if state is not None:
                if task.slot is not None and (
                    state.last_slot is None or task.slot > state.last_slot
                ):
                    state.last_slot = task.slot
                state.last_run = now
                if outcome in ("success", "warning"):
                    state.last_success = now
                self._save()
            job = self.job(task.job)
            if (
                task.kind == "backup"
                and outcome in ("success", "warning")
                and job is not None
                and not keeps_everything(job.retention)
            ):
                follow = Task(task.job, "forget")
                self._running[follow.key] = follow
                return [follow]
            return []

    # -- internals ---------------------------------------------------------------------

    def _tasks(self) -> Iterator[tuple[Task, Slots, _TaskState]]:
        for key, (task, slots) in self._slots.items():
            yield task, slots, self._state[key]

    def _ready(self, task: Task) -> bool:
        if task.kind != "verify":
            return True
        backup = self._state.get(f"{task.job}:backup")
        return backup is not None and backup.last_success is not None

    def _load(self) -> dict[str, _TaskState]:
        if self.state_path is None:
            return {}
        try:
            data = json.loads(self.state_path.read_text())
            return {key: _TaskState.from_json(value) for key, value in data["tasks"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable %s (%s): runs start afresh", self.state_path, error)
            return {}

    def _save(self) -> None:
        if self.state_path is None:
            return
        body = json.dumps(
            {"version": 1, "tasks": {k: v.as_json() for k, v in sorted(self._state.items())}},
            indent=1,
        )
        self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(body + "\n")
            out.flush()
            os.fsync(out.fileno())
        temp.replace(self.state_path)
