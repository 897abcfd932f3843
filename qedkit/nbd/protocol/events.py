"""What ``ServerConnection.next_event`` returns, and the chunks a READ reply is made of.

Events are plain (not frozen) dataclasses on purpose: one is built per request, and a
frozen dataclass costs twice as much to construct (2.3 us vs 1.0 us). Treat them as
read-only. The three sentinels (``NEED_DATA``, ``PAUSED``, ``CONNECTION_CLOSED``) are
single instances, compared with ``is``.

    Event
     +-- NeedData, Paused, ConnectionClosed     flow control
     +-- StartTLS, Abort, HandshakeComplete     the handshake
     +-- Request                                the transmission phase: one reply each
          +-- Read, Write, Flush, Trim, Cache, WriteZeroes, BlockStatus
          +-- Disconnect                        no reply
          +-- InvalidRequest                    answer with reply_error
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from .export import Export
from .wire import Buffer, Errno, MetaContext, Opt, TransmissionFlag


@dataclass(slots=True, kw_only=True)
class Event:
    """Base class of everything :meth:`ServerConnection.next_event` returns."""


@dataclass(slots=True, kw_only=True)
class NeedData(Event):
    """Nothing more can be parsed until :meth:`~ServerConnection.receive_data`."""


@dataclass(slots=True, kw_only=True)
class Paused(Event):
    """Parsing is suspended until the glue calls
    :meth:`~ServerConnection.tls_established` (after a :class:`StartTLS`)."""


@dataclass(slots=True, kw_only=True)
class ConnectionClosed(Event):
    """The client closed its side at a message boundary. Returned again on every call."""


NEED_DATA: Final = NeedData()
PAUSED: Final = Paused()
CONNECTION_CLOSED: Final = ConnectionClosed()


@dataclass(slots=True, kw_only=True)
class StartTLS(Event):
    """The client asked for TLS and the core acknowledged (NBD_REP_ACK is in
    ``data_to_send()``). The glue sends that, runs the TLS handshake as the server on
    the same socket, then calls ``tls_established()``; a failed handshake ends the
    session. Only emitted when the TLS mode allows TLS."""


@dataclass(slots=True, kw_only=True)
class Abort(Event):
    """The client sent NBD_OPT_ABORT. The ACK is in ``data_to_send()``; send it and
    close the connection."""


@dataclass(slots=True, kw_only=True)
class HandshakeComplete(Event):
    """Option haggling is over and the transmission phase begins (the final reply is in
    ``data_to_send()``). ``via`` is Opt.GO or Opt.EXPORT_NAME; ``block_size_requested``
    is true when the client asked for NBD_INFO_BLOCK_SIZE in its NBD_OPT_GO and so
    promised to honour the block sizes; ``meta_contexts`` are the contexts selected
    for this export (empty: NBD_CMD_BLOCK_STATUS will be refused)."""

    export: Export
    via: Opt
    transmission_flags: TransmissionFlag
    structured_replies: bool
    meta_contexts: tuple[MetaContext, ...]
    block_size_requested: bool


@dataclass(slots=True, kw_only=True)
class Request(Event):
    """Base of the transmission-phase events. Every request except
    :class:`Disconnect` awaits exactly one reply from a ``reply_*`` method, in any
    order. ``fua`` is NBD_CMD_FLAG_FUA: reply only once the effects are durable."""

    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(slots=True, kw_only=True)
class Read(Request):
    """NBD_CMD_READ; answer with ``reply_read`` (or ``reply_error``). ``df`` is
    NBD_CMD_FLAG_DF: the core then sends at most one content chunk, whatever chunks
    the glue passes."""

    df: bool


@dataclass(slots=True, kw_only=True)
class Write(Request):
    """NBD_CMD_WRITE; ``data`` is the payload (``length`` bytes), a read-only
    memoryview over a buffer that belongs to this event."""

    data: memoryview


@dataclass(slots=True, kw_only=True)
class Flush(Request):
    """NBD_CMD_FLUSH (offset and length are 0)."""


@dataclass(slots=True, kw_only=True)
class Trim(Request):
    """NBD_CMD_TRIM."""


@dataclass(slots=True, kw_only=True)
class Cache(Request):
    """NBD_CMD_CACHE."""


@dataclass(slots=True, kw_only=True)
class WriteZeroes(Request):
    """NBD_CMD_WRITE_ZEROES. ``no_hole``: the range must stay allocated; ``fast_zero``:
    fail at once with Errno.ENOTSUP unless zeroing is faster than writing."""

    no_hole: bool
    fast_zero: bool


@dataclass(slots=True, kw_only=True)
class BlockStatus(Request):
    """NBD_CMD_BLOCK_STATUS; answer with ``reply_block_status`` giving extents for each
    of ``context_ids``. ``req_one``: the client wants a single extent per context (the
    core enforces it)."""

    req_one: bool
    context_ids: tuple[MetaContext, ...]


@dataclass(slots=True, kw_only=True)
class Disconnect(Request):
    """NBD_CMD_DISC: no reply. Finish the requests in flight (``conn.inflight``), then
    close. Any further byte from the client is a RemoteProtocolError."""


@dataclass(slots=True, kw_only=True)
class InvalidRequest(Request):
    """A well-framed request the server must refuse (proto.md: Error values): answer it
    with ``reply_error(cookie, errno, message)``. ``command`` is the raw type (it may
    not be a known Cmd); a WRITE payload has already been skipped."""

    command: int
    errno: Errno
    message: str


# ---- read reply chunks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Bytes of a READ reply starting at absolute export ``offset``."""

    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True)
class HoleChunk:
    """``length`` bytes reading as zeros from absolute export ``offset``."""

    offset: int
    length: int


ReadChunk: TypeAlias = DataChunk | HoleChunk
