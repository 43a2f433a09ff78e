"""A py-amqp TCP transport that reads the socket in large chunks, for the reporter.

py-amqp reads every frame with three `recv` calls of exactly the bytes it needs (header,
payload, end octet) and sets and restores the socket timeout around each frame: about
nine `recv` and six `settimeout` system calls per delivered message, most of the
reporter's receiving CPU when it takes thousands of messages a second. This transport
asks the socket for up to `CHUNK` bytes at a time and cuts the frames out of its own
buffer; a frame that is already buffered is returned without touching the socket, so
without a timeout change either. Frames, errors and timeouts are what py-amqp gives: a
read that times out (or finds nothing on a non-blocking poll) keeps what arrived, for the
next call.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from struct import unpack_from
from typing import Any

import amqp
from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport
from kombu import Connection
from kombu.transport import pyamqp

CHUNK = 256 * 1024
HEADER = 7
FRAME_END = 0xCE
_RETRY = (errno.EAGAIN, errno.EINTR)


class BufferedTCPTransport(TCPTransport):
    """TCPTransport whose frame reads come from a buffer filled `CHUNK` bytes at a time."""

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._buffer = bytearray()
        self._start = 0

    def _buffered_frame(self) -> int:
        """The size of the whole frame at the front of the buffer, or 0 if not all there."""
        have = len(self._buffer) - self._start
        if have < HEADER:
            return 0
        size = HEADER + unpack_from(">I", self._buffer, self._start + 3)[0] + 1
        return size if have >= size else 0

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[Any]:
        if self._buffered_frame():
            yield self.sock  # nothing to wait for
        else:
            with super().having_timeout(timeout) as sock:
                yield sock

    def _fill(self, need: int) -> None:
        """Receive until `need` bytes are buffered past the read position."""
        while len(self._buffer) - self._start < need:
            try:
                chunk = self.sock.recv(CHUNK)
            except OSError as error:
                if error.errno in _RETRY:  # a non-blocking poll (timeout 0) found nothing
                    raise TimeoutError from None
                raise
            if not chunk:
                raise OSError("Server unexpectedly closed connection")
            if self._start:  # drop what was read before growing
                del self._buffer[: self._start]
                self._start = 0
            self._buffer += chunk

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        try:
            self._fill(HEADER)
            frame_type, channel, size = unpack_from(">BHI", self._buffer, self._start)
            self._fill(HEADER + size + 1)
        except TimeoutError:
            raise
        except OSError as error:
            if error.errno not in amqp.transport._UNAVAIL:
                self.connected = False
            raise
        start = self._start + HEADER
        payload = bytes(self._buffer[start : start + size])
        frame_end = self._buffer[start + size]
        self._start = start + size + 1
        if frame_end != FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {frame_end:#04x} while expecting 0xce")
        return frame_type, channel, payload


class BufferedConnection(pyamqp.Connection):
    """kombu's py-amqp Connection on a BufferedTCPTransport (TLS connections keep py-amqp's own)."""

    def Transport(
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if ssl:
            return super().Transport(
                host, connect_timeout, ssl, read_timeout, write_timeout, **kwargs
            )
        return BufferedTCPTransport(
            host,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            **kwargs,
        )


class BufferedTransport(pyamqp.Transport):
    """kombu's py-amqp transport with BufferedConnection: `Connection(transport=...)`."""

    Connection = BufferedConnection


def buffered(connection: Connection) -> Connection:
    """The same connection on BufferedTransport; a connection on another transport
    (memory, TLS) is returned as it is. After a failover kombu rebuilds the connection
    from the next URL with py-amqp's own transport: slower, not different."""
    if connection.transport_cls not in ("amqp", "pyamqp") or connection.ssl:
        return connection
    return connection.clone(transport=BufferedTransport)
