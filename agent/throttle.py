"""The plan's bandwidth limit: uploads paced to a number of bytes per second.

A token bucket holding one second's worth: short bursts are smooth, and the average rate
over any longer stretch stays at or below the limit.
"""

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
        self._tokens = float(rate)
        self._last = clock()

    def __call__(self, count: int) -> None:
        """Account for `count` bytes about to be sent, waiting as long as the limit says."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate) - count
        self._last = now
        if self._tokens < 0:
            self._sleep(-self._tokens / self._rate)


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
