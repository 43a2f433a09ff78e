"""The plan's bandwidth limit: uploads paced to a number of bytes per second.

A token bucket holding one second's worth: short bursts are smooth, and the average rate
over any longer stretch stays at or below the limit. The bucket lives in shared memory,
so a backup's worker processes, forked after it was made, all draw from the one limit.
"""

import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO


class Throttle:
    def __init__(
        self,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth limit is a positive number of bytes per second")
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        context = multiprocessing.get_context("fork")
        self._bucket = context.RawArray("d", [float(rate), clock()])  # tokens, last refill
        self._lock = context.Lock()

    def __call__(self, count: int) -> None:
        """Account for `count` bytes about to be sent, waiting as long as the limit says."""
        bucket = self._bucket
        with self._lock:
            now = self._clock()
            tokens = min(self._rate, bucket[0] + (now - bucket[1]) * self._rate) - count
            bucket[0], bucket[1] = tokens, now
        if tokens < 0:
            self._sleep(-tokens / self._rate)


class _Paced:
    def __init__(self, sink: BinaryIO, throttle: Throttle) -> None:
        self._sink = sink
        self._throttle = throttle

    def write(self, data: bytes) -> int:
        self._throttle(len(data))
        return self._sink.write(data)


OpenWriter = Callable[..., AbstractContextManager[BinaryIO]]  # (name, size_hint=None)


def paced(open_writer: OpenWriter, throttle: Throttle) -> OpenWriter:
    """`open_writer`, with every object written through one shared throttle."""

    @contextmanager
    def open_paced(name: str, size_hint: int | None = None) -> Iterator[BinaryIO]:
        with open_writer(name, size_hint) as sink:
            yield _Paced(sink, throttle)  # type: ignore[misc]

    return open_paced  # type: ignore[return-value]
