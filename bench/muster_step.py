"""One Muster step in its own process, so bench/run.py measures it as it measures restic.

bench/run.py wraps each call in `/usr/bin/time` (wall time and peak RSS of the whole
process, interpreter start-up and imports included, as for the peers). The driver calls
the engine's public functions directly (`run_backup`, `run_restore`, `run_verify` when it
exists) and writes a JSON result: the in-process seconds of the call itself, the engine's
own counts, and what it fetched from storage. Fetches are counted by wrapping the
Repository's `get` and `get_range` (and the storage's `list`) in this process; agent code
is not changed.

    python -m bench.muster_step backup  --repo URL --state DIR --identity KEY --source DIR
    python -m bench.muster_step restore --repo URL --state DIR --identity KEY --to DIR --path P
    python -m bench.muster_step verify  --repo URL --state DIR --identity KEY --to DIR
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muster.loading import import_frozen

NODE = "bench-node"
JOB = "bench"


class FetchCounter:
    """Counts requests and bytes read through one Repository (every reader goes through its
    `get` and `get_range`) and the listings of its Storage."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def install(self, repo: Any) -> None:
        get, get_range, listing = repo.get, repo.get_range, repo.storage.list

        def counted_get(name: str) -> Any:
            self.counts["get_requests"] += 1
            return _CountingReader(get(name), self.counts)

        def counted_get_range(name: str, start: int, length: int) -> bytes:
            data = get_range(name, start, length)
            self.counts["range_requests"] += 1
            self.counts["bytes_fetched"] += len(data)
            return data

        def counted_list(prefix: str = "") -> Iterator[Any]:
            self.counts["list_requests"] += 1
            yield from listing(prefix)

        repo.get, repo.get_range, repo.storage.list = counted_get, counted_get_range, counted_list


class _CountingReader(io.RawIOBase):
    """A whole-object reader whose bytes count as fetched."""

    def __init__(self, inner: Any, counts: Counter[str]) -> None:
        super().__init__()
        self._inner, self._counts = inner, counts

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._counts["bytes_fetched"] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


@dataclass
class _Opened:
    target: Any
    repo: Any
    cache: Any
    identities: list[Any]
    counter: FetchCounter


def _open(args: argparse.Namespace) -> _Opened:
    from agent import age
    from agent.repository import Repository
    from agent.state import CatalogCache
    from agent.storage import open_storage, parse_repo_url
    from agent.storage.base import Tuning

    target = parse_repo_url(args.repo)
    tuning = Tuning(part_size=args.part_size << 20) if args.part_size else None
    repo = Repository(open_storage(target, tuning), NODE, JOB)
    counter = FetchCounter()
    counter.install(repo)
    cache = CatalogCache(Path(args.state), f"{args.repo}#{NODE}/{JOB}")
    identities = age.load_identities(args.identity)
    return _Opened(target, repo, cache, identities, counter)


def backup(args: argparse.Namespace) -> dict[str, Any]:
    from agent.actions.backup import run_backup
    from broker.plan import Job, Sources

    opened = _open(args)
    job = Job(
        name=JOB,
        storage=opened.target,
        sources=Sources(paths=[str(Path(p).absolute()) for p in args.source]),
        volume_size=args.volume_size,
        compression_level=args.level,
    )
    started = time.perf_counter()
    outcome = run_backup(job, opened.repo, opened.identities[0], opened.cache, "bench")
    seconds = time.perf_counter() - started
    record = outcome.record
    return {
        "seconds": seconds,
        "snapshot": record.id,
        "full": record.full,
        "volumes": len(record.volumes),
        "volume_bytes": sum(v.size for v in record.volumes),
        "catalog_bytes": record.catalog.size,
        "stats": record.stats.model_dump(),
        "warnings": len(outcome.warnings),
        "warning_samples": _samples(outcome.warnings),
        **opened.counter.counts,
    }


def restore(args: argparse.Namespace) -> dict[str, Any]:
    from agent.actions.restore import run_restore
    from agent.archive import Archive

    opened = _open(args)
    archive = Archive(opened.repo, opened.identities, None if args.no_cache else opened.cache)
    paths = [str(Path(p).absolute()) for p in args.paths]
    started = time.perf_counter()
    outcome = run_restore(archive, paths, Path(args.to), strict=True)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "files": outcome.files,
        "bytes": outcome.bytes,
        "errors": len(outcome.errors),
        "error_samples": _samples(outcome.errors),
        **opened.counter.counts,
    }


def verify(args: argparse.Namespace) -> dict[str, Any]:
    """`run_verify(..., all=True)` when the engine has it; otherwise a full restore to a
    scratch directory, which reads every volume and checks every file's sha256."""
    run_verify = _find_run_verify()
    if run_verify is None:
        args.paths = [str(Path(p).absolute()) for p in args.source]
        result = restore(args)
        return {**result, "mode": "run_restore of everything to a scratch directory"}
    from agent.archive import Archive

    opened = _open(args)
    archive = Archive(opened.repo, opened.identities, opened.cache)
    Path(args.to).mkdir(parents=True, exist_ok=True)
    offered = {
        "state_dir": Path(args.state),
        "all": True,
        "repository_key": f"{args.repo}#{NODE}/{JOB}",
        "scratch": Path(args.to),
    }
    accepted = inspect.signature(run_verify).parameters
    started = time.perf_counter()
    outcome = run_verify(archive, **{k: v for k, v in offered.items() if k in accepted})
    seconds = time.perf_counter() - started
    failures = list(getattr(outcome, "failures", []))
    return {
        "seconds": seconds,
        "mode": "agent.actions.verify.run_verify(all=True)",
        "files": getattr(outcome, "files_checked", None),
        "bytes": getattr(outcome, "bytes_checked", None),
        "errors": len(failures),
        "error_samples": _samples(failures),
        **opened.counter.counts,
    }


def _find_run_verify() -> Any:
    try:
        module = importlib.import_module("agent.actions.verify")
    except ImportError:
        return None
    found = getattr(module, "run_verify", None)
    if found is None or "all" not in inspect.signature(found).parameters:
        return None
    return found


def _samples(messages: list[str]) -> list[str]:
    """A few messages, each cut short: one can name thousands of files."""
    return [m if len(m) <= 400 else m[:400] + f"... ({len(m)} chars)" for m in messages[:5]]


# What each step imports, loaded first without garbage collections and then frozen.
STEP_MODULES = {
    "backup": ("agent.actions.backup", "agent.storage"),
    "restore": ("agent.actions.restore", "agent.archive", "agent.storage"),
    "verify": ("agent.actions.verify", "agent.archive", "agent.storage"),
}


def _load(step: str) -> None:
    """The step's modules, loaded as `muster` loads a command's."""
    for module in STEP_MODULES[step]:
        import_frozen(module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.muster_step", description=__doc__)
    parser.add_argument("step", choices=("backup", "restore", "verify"))
    parser.add_argument("--repo", required=True, help="file:///DIR or swift://CONTAINER/PREFIX")
    parser.add_argument("--state", required=True, help="the catalog cache's state directory")
    parser.add_argument("--identity", required=True, help="age identity file")
    parser.add_argument("--source", action="append", default=[], help="backup/verify: source")
    parser.add_argument("--path", dest="paths", action="append", default=[], help="restore")
    parser.add_argument("--to", help="restore/verify: target directory")
    parser.add_argument("--volume-size", type=int, default=128 << 20)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--part-size", type=int, help="storage Tuning.part_size in MiB")
    parser.add_argument("--no-cache", action="store_true", help="ignore the local catalog cache")
    parser.add_argument("--result", help="write the JSON result here (default: stdout)")
    args = parser.parse_args(argv)
    _load(args.step)
    step = {"backup": backup, "restore": restore, "verify": verify}[args.step]
    result = step(args)
    text = json.dumps(result, indent=2, default=str)
    if args.result:
        Path(args.result).write_text(text + "\n")
    else:
        print(text)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    gc.freeze()  # the exit then skips its collection over every object, as `muster` does
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
