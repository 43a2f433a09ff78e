"""A backup's worker processes: each writes whole volumes while the main process walks.

In one process, the walk, the tar stream and the reading of small files (about 40 us of
Python per file) competed for the GIL with compression, hashing and encryption, and a
backup used a core and a half of two. So the main process only walks, merges with the
previous catalog and writes the catalog; each volume is written by one worker process
(files read, tar headers, zstd frames, sha256, age, upload), the way `tar | zstd | age`
runs three processes.

Workers are forked when the first volume is sent: they start with the plan, the keys and
the storage settings already in memory (nothing is pickled but the work itself), and each
opens its own storage connections (a socket must not be shared across a fork).

Messages, one queue per worker to it, one pipe per worker back:
- `(number, items, mode)`: items of volume `number`, in path order, sent in parts as the
  walk finds them, so a worker starts on a volume at once. `PART` asks for the lines of
  the members written so far (their frames are out: a lag of a few MiB of data, so
  neither process holds a volume's worth of entries, whatever the number of files);
  `FLUSH` for the lines of every member so far (the volume stays open), `FINISH` for
  the rest of them and the committed volume.
- back, once the message's members are written: `(number, Stored, VolumeInfo or None)`,
  or `(None, error, traceback)` when the worker failed (it aborts its volume first).
Progress: each worker counts files and bytes read in shared memory; the main process
sums them. Stopping: SIGTERM makes a worker abort its open volume (storage drops the
upload) and exit. The main process sends it on any failure; the kernel sends it when the
main process dies (PR_SET_PDEATHSIG), so no worker outlives its run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import connection, get_context
from types import FrameType
from typing import Any, NamedTuple

from agent import age
from agent.members import Item, Stored, VolumeMembers
from agent.throttle import OpenWriter
from agent.volumes import VolumeWriter
from broker.snapshot import VolumeInfo, volume_name

_FORK = get_context("fork")
PART, FLUSH, FINISH = 0, 1, 2
_PR_SET_PDEATHSIG = 1
ABORT_WAIT = 60.0  # seconds a worker gets to drop its upload once told to stop


@dataclass
class VolumeSettings:
    """What every worker needs to write volumes; inherited by the fork, never pickled."""

    open_writer: OpenWriter
    snapshot_id: str
    recipients: list[age.Recipient]
    level: int
    target_size: int
    reconnect: Callable[[], None]  # makes the storage's connections anew, in the worker


class WorkerFailed(Exception):
    """A worker process ended without saying why (killed, out of memory, crashed)."""


class RemoteTraceback(Exception):
    """Where a worker's error was raised: the cause of the error re-raised here."""


class Done(NamedTuple):
    worker: int
    number: int
    stored: Stored
    info: VolumeInfo | None  # set once the volume is committed


class Workers:
    """`count` worker processes, forked on first use; see the module docstring."""

    def __init__(self, count: int, settings: VolumeSettings) -> None:
        self.count = count
        self._settings = settings
        self._counters = _FORK.RawArray("q", 2 * count)  # files, bytes read, per worker
        self._queues: list[Any] = []
        self._results: list[connection.Connection] = []
        self._processes: list[Any] = []
        self._answers = [0] * count  # answers each worker owes

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def start(self) -> None:
        """Fork the workers (once): before the walk holds much, which they would share."""
        if self._processes:
            return
        parent = os.getpid()
        # The workers' collections then leave the pages shared with us alone; the run
        # unfreezes at its end (agent.actions.backup.run_backup froze it at its start).
        gc.freeze()
        for index in range(self.count):
            queue = _FORK.Queue()
            results, sink = _FORK.Pipe(duplex=False)
            process = _FORK.Process(
                target=_serve,
                args=(index, parent, self._settings, queue, sink, self._counters),
                name=f"muster-volumes-{index}",
                daemon=True,
            )
            process.start()
            sink.close()
            self._queues.append(queue)
            self._results.append(results)
            self._processes.append(process)

    def send(self, worker: int, number: int, items: list[Item], mode: int) -> None:
        self.start()
        self._queues[worker].put((number, items, mode))
        self._answers[worker] += 1

    @property
    def busy(self) -> bool:
        """Some answer is still to come."""
        return any(self._answers)

    def progress(self) -> tuple[int, int]:
        """Files and bytes read so far by all workers."""
        counters = self._counters
        return sum(counters[0::2]), sum(counters[1::2])

    def receive(self, timeout: float) -> Done | None:
        """The next answer of any worker, None after `timeout` seconds without one; raises
        a worker's error, or WorkerFailed if one died."""
        sentinels = {process.sentinel: index for index, process in enumerate(self._processes)}
        ready = connection.wait([*self._results, *sentinels], timeout)
        for index, results in enumerate(self._results):
            if results in ready:
                return self._answer(index, results)
        for sentinel in ready:
            self._died(sentinels[sentinel])  # type: ignore[index]
        return None

    def _answer(self, index: int, results: connection.Connection) -> Done:
        try:
            number, payload, extra = results.recv()
        except EOFError:
            self._died(index)
        if number is None:
            payload.__cause__ = RemoteTraceback(extra)
            raise payload
        self._answers[index] -= 1
        return Done(index, number, payload, extra)

    def _died(self, index: int) -> None:
        process = self._processes[index]
        process.join(1)
        raise WorkerFailed(
            f"backup worker process {process.pid} ended (exit code {process.exitcode}) "
            "before writing its volume; no snapshot was recorded"
        )

    def close(self) -> None:
        """Let every worker finish what it was sent and end."""
        for queue in self._queues:
            queue.put(None)
        for process in self._processes:
            process.join()
        for queue in self._queues:
            queue.close()
            queue.join_thread()
        self._release()

    def abort(self) -> None:
        """Stop every worker now: each drops its open volume's upload and ends."""
        for process in self._processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(ABORT_WAIT)
            if process.is_alive():
                process.kill()
                process.join()
        for queue in self._queues:
            queue.cancel_join_thread()
            queue.close()
        self._release()

    def _release(self) -> None:
        """Close our ends of the pipes and the processes' handles: a long-lived process
        (the daemon's run, a test session) runs many backups."""
        for results in self._results:
            results.close()
        for process in self._processes:
            process.close()


# -- in a worker ---------------------------------------------------------------------------


class _Cancelled(BaseException):
    """SIGTERM: the run is over, drop the open volume."""


def _cancel(_signum: int, _frame: FrameType | None) -> None:
    raise _Cancelled()


def _stop_with(parent: int) -> None:
    """SIGTERM, from the main process or from the kernel when the main process dies,
    cancels; Ctrl-C reaches the whole process group, but only the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _cancel)
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        raise _Cancelled()


def _serve(
    index: int,
    parent: int,
    settings: VolumeSettings,
    tasks: Any,
    results: connection.Connection,
    counters: Any,
) -> None:
    """A worker's life: volumes from `tasks` until None, answers to `results`. One
    compression thread: the workers are the parallelism (a second one per worker cost
    5% more CPU and 8 MiB more memory, for no gain in time, on two cores)."""
    try:
        _stop_with(parent)
        settings.reconnect()

        def on_file() -> None:
            counters[2 * index] += 1

        def on_read(count: int) -> None:
            counters[2 * index + 1] += count

        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="zstd") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="volume-writer") as writer,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hasher") as hasher,
        ):

            def open_volume(number: int) -> VolumeMembers:
                volume = VolumeWriter(
                    settings.open_writer,
                    volume_name(settings.snapshot_id, number),
                    settings.recipients,
                    level=settings.level,
                    target_size=settings.target_size,
                    pool=pool,
                    writer=writer,
                    hasher=hasher,
                    on_read=on_read,
                )
                return VolumeMembers(volume, on_file)

            _answer_tasks(tasks, results, open_volume)
    except _Cancelled:
        pass
    except BaseException as error:
        results.send((None, _picklable(error), traceback.format_exc()))
        raise SystemExit(1) from None


def _answer_tasks(
    tasks: Any, results: connection.Connection, open_volume: Callable[[int], VolumeMembers]
) -> None:
    """Each task's members written, then its answer sent; the open volume is aborted
    (nothing of it stays in storage) if anything fails, SIGTERM included."""
    members: VolumeMembers | None = None
    try:
        while (task := tasks.get()) is not None:
            number, items, mode = task
            if members is None:
                members = open_volume(number)
            members.add(items)
            if mode == FINISH:
                stored, info = members.finish()
                members = None
                results.send((number, stored, info))
            elif mode == FLUSH:
                results.send((number, members.flush(), None))
            else:
                results.send((number, members.located(), None))
    except BaseException as error:
        if members is not None:
            members.abort(error)
        raise


def _picklable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (its type and message reach the main
    process), else one that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return WorkerFailed(f"{type(error).__name__}: {error}")
    return error
