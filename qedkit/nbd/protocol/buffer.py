"""Receive buffering: the bytes not yet parsed, and the collector of a message body.

A connection's input is one :class:`Input`: a :class:`ReceiveBuffer` (a bytearray
consumed from a moving start), the end-of-file mark, and at most one *pending*
collector for the message in progress. Between messages the parser reads a fixed-size
header off the buffer; a header's handler may then schedule one collector:

* :class:`Collect` waits for a body of known size (option data) and hands it over;
* :class:`Skip` discards bytes unbuffered (option data too long to keep, a refused
  WRITE payload);
* :class:`Payload` fills a WRITE payload: copied out once when it is already whole in
  the buffer, else filled piece by piece into its own buffer (``Input.allocate``'s,
  a bytearray by default), straight from ``receive_data`` when nothing else is
  buffered (:meth:`Input.feed`), or received into it by the glue itself
  (:meth:`Input.window`, :meth:`Payload.received`).

A collector's ``advance`` returns the event its message makes, ``NEED_DATA``, or None
(nothing to report: parse on); end of file inside a message is a RemoteProtocolError.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from .errors import LocalProtocolError, RemoteProtocolError
from .events import NEED_DATA, Event
from .wire import Buffer


def byte_view(data: Buffer) -> memoryview:
    """A flat view of unsigned bytes over any buffer."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class ReceiveBuffer:
    """Bytes received and not yet parsed: a bytearray consumed from a moving start,
    compacted only when the dead prefix is large, so taking a header is O(header)."""

    __slots__ = ("_data", "_start")

    _COMPACT_AT: Final = 64 * 1024

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, view: memoryview) -> None:
        self._data += view

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Decode ``layout`` from the front of the buffer and consume it."""
        fields = layout.unpack_from(self._data, self._start)
        self._advance(layout.size)
        return fields

    def take(self, size: int) -> bytes:
        start = self._start
        with memoryview(self._data) as view:
            out = view[start : start + size].tobytes()
        self._advance(size)
        return out

    def copy_into(self, target: memoryview) -> int:
        count = min(len(self), len(target))
        start = self._start
        with memoryview(self._data) as view:
            target[:count] = view[start : start + count]
        self._advance(count)
        return count

    def skip(self, size: int) -> int:
        count = min(len(self), size)
        self._advance(count)
        return count

    def _advance(self, count: int) -> None:
        self._start += count
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start >= self._COMPACT_AT and self._start * 2 >= len(self._data):
            del self._data[: self._start]
            self._start = 0


class Collect:
    """Mid-message read: wait for ``size`` bytes, then hand them to ``done``."""

    __slots__ = ("done", "size", "what")

    def __init__(self, size: int, what: str, done: Callable[[bytes], Event | None]) -> None:
        self.size = size
        self.what = what
        self.done = done

    def advance(self, source: Input) -> Event | None:
        buffer = source.buffer
        if len(buffer) >= self.size:
            source.pending = None
            return self.done(buffer.take(self.size))
        if source.eof:
            raise RemoteProtocolError(f"end of file inside {self.what}")
        return NEED_DATA


class Skip:
    """Mid-message read: discard ``remaining`` bytes unbuffered, then call ``done``."""

    __slots__ = ("done", "remaining", "what")

    def __init__(self, size: int, what: str, done: Callable[[], Event | None]) -> None:
        self.remaining = size
        self.what = what
        self.done = done

    def absorb(self, view: memoryview) -> memoryview:
        count = min(len(view), self.remaining)
        self.remaining -= count
        return view[count:]

    def advance(self, source: Input) -> Event | None:
        self.remaining -= source.buffer.skip(self.remaining)
        if self.remaining == 0:
            source.pending = None
            return self.done()
        if source.eof:
            raise RemoteProtocolError(f"end of file inside {self.what}")
        return NEED_DATA


Allocate: TypeAlias = Callable[[int], memoryview]


def _bytearray(size: int) -> memoryview:
    return memoryview(bytearray(size))


class Payload:
    """Mid-message read: a WRITE payload. When it is already whole in the receive
    buffer it is copied out once; otherwise it is filled piece by piece into its own
    buffer (from ``allocate``: directly from ``receive_data`` when nothing else is
    buffered, or received into by the glue, see :meth:`received`)."""

    __slots__ = ("_allocate", "_data", "_filled", "done", "size")

    def __init__(
        self,
        size: int,
        done: Callable[[memoryview], Event | None],
        allocate: Allocate = _bytearray,
    ) -> None:
        self.size = size
        self.done = done
        self._allocate = allocate
        self._data: memoryview | None = None
        self._filled = 0

    def _target(self) -> memoryview:
        if self._data is None:
            self._data = self._allocate(self.size)
        return self._data[self._filled :]

    def received(self, count: int) -> None:
        """``count`` bytes were written into the start of ``_target()`` by the glue
        (``Input.window``)."""
        if not 0 < count <= self.size - self._filled:
            raise LocalProtocolError(f"{count} bytes received into a window of {self.missing()}")
        self._filled += count

    def absorb(self, view: memoryview) -> memoryview:
        count = min(len(view), self.size - self._filled)
        if count:
            self._target()[:count] = view[:count]
            self._filled += count
        return view[count:]

    def missing(self) -> int:
        return self.size - self._filled

    def finish(self, view: memoryview) -> Event | None:
        """Absorb the ``missing()`` bytes that ``view`` holds and build the event."""
        self.absorb(view)
        return self._event()

    def _event(self) -> Event | None:
        data = self._data if self._data is not None else memoryview(b"")
        return self.done(data.toreadonly())

    def advance(self, source: Input) -> Event | None:
        buffer = source.buffer
        if self._filled == 0 and len(buffer) >= self.size:
            source.pending = None
            return self.done(memoryview(buffer.take(self.size)))
        if len(buffer) and self._filled < self.size:
            self._filled += buffer.copy_into(self._target())
        if self._filled == self.size:
            source.pending = None
            return self._event()
        if source.eof:
            raise RemoteProtocolError(
                f"end of file inside an NBD_CMD_WRITE payload ({self._filled} of {self.size} bytes)"
            )
        return NEED_DATA


Pending: TypeAlias = Collect | Skip | Payload


class Input:
    """One connection's input: unparsed bytes, end of file, the message in progress."""

    __slots__ = ("allocate", "buffer", "eof", "pending")

    def __init__(self, allocate: Allocate = _bytearray) -> None:
        self.buffer = ReceiveBuffer()
        self.pending: Pending | None = None
        self.eof = False
        self.allocate = allocate  # a payload's own buffer of the given size

    def window(self) -> memoryview | None:
        """Where the next bytes from the client may be received directly, with no
        copy: the unfilled rest of the WRITE payload in progress, when nothing is
        buffered before it (else None). Report them with ``pending.received``."""
        pending = self.pending
        if type(pending) is not Payload or len(self.buffer) or self.eof:
            return None
        return pending._target()

    def feed(self, view: memoryview) -> None:
        """Take bytes read from the client (not the end of file): a payload or a skip
        in progress absorbs what it can straight away when nothing is buffered before
        it; the rest is buffered (copied)."""
        pending = self.pending
        if not len(self.buffer) and isinstance(pending, (Skip, Payload)):
            view = pending.absorb(view)
        if len(view):
            self.buffer.append(view)
