"""Sans-I/O NBD server protocol: the fixed newstyle handshake and the transmission phase.

References: the NBD protocol, NetworkBlockDevice/nbd doc/proto.md (cited below as
"proto.md: <section>"); QEMU docs/interop/nbd.rst (the ``qemu:`` metadata namespace);
the sans-I/O design of python-hyper/h11 (bytes in, events and bytes out).

Theory of operation
===================

A :class:`ServerConnection` is one client connection, seen from the server. It does no
I/O and knows no clock: the glue feeds it the bytes it read, takes events out, and
writes the bytes it is handed. A whole server loop looks like this::

    conn = ServerConnection(exports, tls=TlsMode.DISABLED)
    write(conn.data_to_send())                       # the greeting
    while True:
        event = conn.next_event()
        write(conn.data_to_send())                   # option replies, if any
        if event is NEED_DATA:
            conn.receive_data(await read())          # b"" means end of file
        elif isinstance(event, Read):
            data = await image.read(event.offset, event.length)
            writelines(conn.reply_read(event.cookie, data))
        elif isinstance(event, InvalidRequest):
            writelines(conn.reply_error(event.cookie, event.errno, event.message))
        elif isinstance(event, StartTLS):
            await upgrade_the_socket_to_tls()
            conn.tls_established()
        elif isinstance(event, Abort | Disconnect | ConnectionClosed):
            break                                    # after Disconnect, first finish
        ...                                          # the requests in flight

A real server hands each request to its own task, so replies go out as requests
complete, in any order. The connection is not thread-safe: call it from one thread
(the event loop's), which is what asyncio tasks do anyway.

There are two output paths, on purpose:

* **Handshake replies** depend only on the export list and on what was negotiated, so
  the core writes them itself and queues them; :meth:`ServerConnection.data_to_send`
  collects them. Call it after every :meth:`~ServerConnection.next_event`.
* **Transmission replies** depend on the image, so the glue asks for each one with a
  ``reply_*`` method. Replies may be sent in any order and interleaved (proto.md:
  Transmission); each method returns a list of buffers for ``writelines``: headers as
  ``bytes``, payloads as memoryviews of the caller's own buffers (nothing is copied).

States (``State``; the transitions are the table ``_TRANSITIONS``)::

    CLIENT_FLAGS --flags--> NEGOTIATING --GO / EXPORT_NAME--> TRANSMISSION --DISC--> DONE
                             |       ^
           STARTTLS acked    v       |  tls_established()
                            TLS_PENDING
    NEGOTIATING --ABORT--> DONE
    any input state --end of file at a message boundary--> CLOSED
    any input state --RemoteProtocolError--> ERROR

In each input state the parser waits for one fixed-size header (``_BOUNDARY_READS``);
the header's handler may schedule a body to collect (option data), a WRITE payload to
fill, or bytes to skip unread. Options are dispatched through ``_OPTION_RULES`` and
requests validated through ``_COMMAND_RULES``: adding an option or a command is a
table row and a handler, not a new branch in the parser.

Errors
======

Following h11, errors are split by who is at fault; both derive from
:class:`ProtocolError` (itself a :class:`~qedkit.errors.QedError`):

* :class:`RemoteProtocolError`: the client broke the protocol in a way that leaves no
  reply possible (a bad magic, an oversized WRITE payload, an EXPORT_NAME that cannot
  be satisfied ...). The glue must drop the connection (a "hard disconnect"). Input is
  dead afterwards (state ERROR), but replies to requests still in flight can be sent;
  when ``exc.cookie`` is set the offending request is one of them, and the glue may
  send ``reply_error(exc.cookie, exc.errno_hint, str(exc))`` before closing.
* :class:`LocalProtocolError`: the glue asked for something the protocol forbids (a
  reply to an unknown cookie, a READ reply that does not cover the request ...).
  Nothing is emitted and no state changes, so the glue can still send a correct reply.

A client's *recoverable* mistakes are not exceptions: a bad option gets an error reply
from the core, and a bad request becomes an :class:`InvalidRequest` event that the
glue answers with :meth:`~ServerConnection.reply_error`.

Choices where the spec leaves room
==================================

* Oversized WRITE: a payload up to :data:`MAX_PAYLOAD` (32 MiB) is always consumed;
  when the request is invalid (too long for the export's maximum block size, out of
  range, read-only ...) it is skipped unbuffered and an :class:`InvalidRequest` is
  emitted. A longer payload cannot be told apart from a desynchronised stream, so it
  raises RemoteProtocolError (proto.md: Block size constraints allows the hard
  disconnect; 2**25 is the size it says must not be treated as an attack).
* Out of range: WRITE and WRITE_ZEROES get ``ENOSPC``, other commands ``EINVAL``
  (proto.md: Error values, and QEMU does the same).
* Validation order: unknown command (EINVAL), shutting down (ESHUTDOWN), write to a
  read-only export (EPERM, even for TRIM and WRITE_ZEROES, which read-only exports do
  not advertise), flags not documented for the command, flags or command not
  advertised, FLUSH with a nonzero range, range past the end, misalignment to the
  minimum block size, length over the maximum block size (EINVAL unless noted).
* NBD_CMD_CACHE needs ``Export.can_cache`` (EINVAL otherwise). NBD_CMD_DISC is honoured
  whatever its flags, offset and length. Zero-length requests are passed through.
* Structured replies: errors always use structured error chunks (with the message);
  successful non-READ replies use simple replies (allowed, and 4 bytes shorter).
* The default export (empty name) is the export named ``""`` if there is one, else the
  first export in the list.
* A cookie reused while still in flight (discouraged, not forbidden) is accepted; its
  replies pair with its requests oldest first.
* While shutting down (``start_shutdown()``), NBD_OPT_EXPORT_NAME is still honoured (it
  cannot fail); the requests that follow get ESHUTDOWN, which obliges the client to
  disconnect.
* NBD_INFO_BLOCK_SIZE is always sent in INFO/GO replies (as QEMU does); the server never
  sends NBD_REP_ERR_BLOCK_SIZE_REQD because misaligned requests are errored cleanly.
* Clients without NBD_FLAG_C_FIXED_NEWSTYLE are still answered as fixed newstyle
  (proto.md allows it), but cannot start TLS; with ``TlsMode.REQUIRED`` they are refused.
* Meta context queries without a namespace colon are ignored, as are unknown namespaces
  and unknown leaf names; the empty leaf (``"base:"``, ``"qemu:"``) is a wildcard for
  LIST and selects nothing for SET (proto.md: Metadata querying).
* Option data longer than :data:`MAX_OPTION_DATA` is skipped unread and answered with
  NBD_REP_ERR_TOO_BIG (NBD_OPT_EXPORT_NAME, which cannot fail, ends the session).
* Extended headers (NBD_OPT_EXTENDED_HEADERS) are not implemented: NBD_REP_ERR_UNSUP.
"""

from __future__ import annotations

import enum
import errno as _os_errno
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from ..errors import (
    CorruptImageError,
    InvalidRequestError,
    QedError,
    ReadOnlyError,
    StoreError,
    UnsupportedFeatureError,
)

__all__ = [
    "CONNECTION_CLOSED",
    "IHAVEOPT",
    "MAX_OPTION_DATA",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "NBDMAGIC",
    "NEED_DATA",
    "OPTION_REPLY_MAGIC",
    "PAUSED",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "Abort",
    "BlockStatus",
    "Buffer",
    "Cache",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "ConnectionClosed",
    "DataChunk",
    "Disconnect",
    "Errno",
    "Event",
    "Export",
    "Flush",
    "HandshakeComplete",
    "HandshakeFlag",
    "HoleChunk",
    "Info",
    "InvalidRequest",
    "LocalProtocolError",
    "MetaContext",
    "NeedData",
    "Opt",
    "Paused",
    "ProtocolError",
    "Read",
    "ReadChunk",
    "RemoteProtocolError",
    "Rep",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
    "StateFlag",
    "TlsMode",
    "TransmissionFlag",
    "Trim",
    "Write",
    "WriteZeroes",
    "nbd_errno_for",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

# ---- magic numbers and limits ------------------------------------------------------------

#: proto.md: Newstyle negotiation. The greeting's first word, ASCII "NBDMAGIC".
NBDMAGIC: Final = 0x4E42444D41474943
#: The greeting's second word and the first word of every option, ASCII "IHAVEOPT".
IHAVEOPT: Final = 0x49484156454F5054
#: proto.md: Fixed newstyle negotiation. The first word of every option reply.
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
#: proto.md: Request message.
REQUEST_MAGIC: Final = 0x25609513
#: proto.md: Simple reply message.
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: proto.md: Structured reply chunk message.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

#: proto.md: Conventions. Strings (export names, descriptions, messages, queries) MUST
#: be no longer than 4096 bytes.
MAX_STRING: Final = 4096
#: The largest WRITE payload the core buffers, and the largest maximum block size an
#: Export may advertise: 2**25 bytes. proto.md (Block size constraints) says a length
#: below 2**25 SHOULD NOT be treated as a denial of service; QEMU uses the same limit
#: (NBD_MAX_BUFFER_SIZE).
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: The largest option data the core buffers. The biggest legitimate option here is a
#: meta context request: a 4096-byte name plus a few queries of at most 4096 bytes, so
#: 64 KiB leaves room while keeping a handshake's memory bounded. Longer data is skipped
#: unread and answered with NBD_REP_ERR_TOO_BIG.
MAX_OPTION_DATA: Final = 64 * 1024
#: proto.md: Newstyle negotiation. Zero bytes after the NBD_OPT_EXPORT_NAME reply unless
#: the client set NBD_FLAG_C_NO_ZEROES.
EXPORT_NAME_PADDING: Final = 124
#: proto.md: Block size constraints. Limits on advertised block sizes.
MAX_MIN_BLOCK_SIZE: Final = 65536
MIN_PREFERRED_BLOCK_SIZE: Final = 512
DEFAULT_PREFERRED_BLOCK_SIZE: Final = 4096

_U16: Final = 0xFFFF
_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF

# Wire layouts, all big-endian (proto.md: Conventions).
_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
_U16_STRUCT = struct.Struct(">H")
_U32_STRUCT = struct.Struct(">I")
_U64_STRUCT = struct.Struct(">Q")
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_REQUEST_SIZE: Final = _REQUEST.size
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + offset (OFFSET_DATA)
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_ERROR_HEAD = struct.Struct(">IH")  # error, message length
_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags


# ---- constants named after the spec ------------------------------------------------------
#
# Each class holds one family of spec names; a member is the spec name without "NBD_"
# and the family prefix: NBD_OPT_GO is Opt.GO, NBD_REP_ERR_UNSUP is Rep.ERR_UNSUP,
# NBD_CMD_FLAG_FUA is CmdFlag.FUA, NBD_FLAG_C_NO_ZEROES is ClientFlag.NO_ZEROES.


class HandshakeFlag(enum.IntFlag):
    """NBD_FLAG_* handshake flags (16 bits, sent by the server in the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


#: What this server always advertises.
SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class ClientFlag(enum.IntFlag):
    """NBD_FLAG_C_* client flags (32 bits, the client's answer to the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class TransmissionFlag(enum.IntFlag):
    """NBD_FLAG_* transmission flags (16 bits, per export)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    """NBD_OPT_* option types."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # not implemented: answered NBD_REP_ERR_UNSUP


class Rep(enum.IntEnum):
    """NBD_REP_* option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(enum.IntEnum):
    """NBD_INFO_* information types (NBD_OPT_INFO / NBD_OPT_GO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """NBD_CMD_* request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental extension: not implemented (EINVAL)


class CmdFlag(enum.IntFlag):
    """NBD_CMD_FLAG_* command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers only: never valid here


class ReplyFlag(enum.IntFlag):
    """NBD_REPLY_FLAG_* structured reply flags."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """NBD_REPLY_TYPE_* structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


class Errno(enum.IntEnum):
    """NBD_E* error values: the only values allowed in a reply's error field."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(enum.IntFlag):
    """NBD_STATE_* status flags of the ``base:allocation`` context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class MetaContext(enum.IntEnum):
    """The metadata contexts this server offers, valued by the context id that
    NBD_OPT_SET_META_CONTEXT assigns them (ids are opaque to clients; fixed ids make
    traces readable). ``qemu:allocation-depth`` reports, as the whole 32-bit status,
    the layer of the backing chain that provides the data: 0 unallocated, 1 the top
    image, 2 its backing file, and so on (QEMU docs/interop/nbd.rst)."""

    BASE_ALLOCATION = 1
    QEMU_ALLOCATION_DEPTH = 2

    @property
    def context_name(self) -> str:
        return _META_CONTEXT_NAMES[self]


_META_CONTEXT_NAMES: Final[Mapping[MetaContext, str]] = {
    MetaContext.BASE_ALLOCATION: "base:allocation",
    MetaContext.QEMU_ALLOCATION_DEPTH: "qemu:allocation-depth",
}


# Plain-int copies of the flags tested for every request and reply: IntFlag arithmetic
# costs about a microsecond per operation, more than the rest of parsing a request.
_FUA: Final = int(CmdFlag.FUA)
_CMD_READ: Final = int(Cmd.READ)
_CMD_WRITE: Final = int(Cmd.WRITE)
_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
_DF: Final = int(CmdFlag.DF)
_REQ_ONE: Final = int(CmdFlag.REQ_ONE)
_FAST_ZERO: Final = int(CmdFlag.FAST_ZERO)
_DONE: Final = int(ReplyFlag.DONE)


class TlsMode(enum.Enum):
    """How the server answers NBD_OPT_STARTTLS (proto.md: TLS support, Server-side
    requirements). The mode is fixed for the life of a connection."""

    #: NOTLS, STARTTLS answered NBD_REP_ERR_UNSUP (a server built without TLS).
    UNSUPPORTED = "unsupported"
    #: NOTLS, STARTTLS answered NBD_REP_ERR_POLICY (no TLS configured): the default.
    DISABLED = "disabled"
    #: SELECTIVETLS without TLS-only exports: STARTTLS is acknowledged, the client chooses.
    OPTIONAL = "optional"
    #: FORCEDTLS: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until the
    #: glue reports the TLS session up with ``tls_established()``.
    REQUIRED = "required"


class State(enum.Enum):
    """Where a connection is; see the module docstring for the transitions."""

    CLIENT_FLAGS = "client-flags"  # greeting queued, waiting for the client's flags
    NEGOTIATING = "negotiating"  # option haggling
    TLS_PENDING = "tls-pending"  # STARTTLS acknowledged; paused until tls_established()
    TRANSMISSION = "transmission"
    DONE = "done"  # NBD_OPT_ABORT or NBD_CMD_DISC received; no more input is allowed
    CLOSED = "closed"  # end of file at a message boundary
    ERROR = "error"  # a RemoteProtocolError was raised; input is dead


class _Trigger(enum.Enum):
    CLIENT_FLAGS = "client flags accepted"
    STARTTLS = "NBD_OPT_STARTTLS acknowledged"
    TLS_UP = "tls_established()"
    ENTER = "transmission entered"
    ABORT = "NBD_OPT_ABORT"
    DISCONNECT = "NBD_CMD_DISC"
    EOF = "end of file"


_TRANSITIONS: Final[Mapping[State, Mapping[_Trigger, State]]] = {
    State.CLIENT_FLAGS: {
        _Trigger.CLIENT_FLAGS: State.NEGOTIATING,
        _Trigger.EOF: State.CLOSED,
    },
    State.NEGOTIATING: {
        _Trigger.STARTTLS: State.TLS_PENDING,
        _Trigger.ENTER: State.TRANSMISSION,
        _Trigger.ABORT: State.DONE,
        _Trigger.EOF: State.CLOSED,
    },
    State.TLS_PENDING: {_Trigger.TLS_UP: State.NEGOTIATING},
    State.TRANSMISSION: {_Trigger.DISCONNECT: State.DONE, _Trigger.EOF: State.CLOSED},
    State.DONE: {_Trigger.EOF: State.CLOSED},
    State.CLOSED: {},
    State.ERROR: {},
}


# ---- errors ------------------------------------------------------------------------------


class ProtocolError(QedError):
    """A violation of the NBD protocol; abstract (raise a subclass).

    ``errno_hint`` is the NBD error value that describes the violation, for an error
    reply where one can still be sent (h11's ``error_status_hint``). ``cookie`` is the
    request concerned, when there is one that still awaits a reply.
    """

    def __init__(
        self, message: str, *, errno_hint: Errno = Errno.EINVAL, cookie: int | None = None
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise a subclass")
        super().__init__(message)
        self.errno_hint = errno_hint
        self.cookie = cookie


class LocalProtocolError(ProtocolError):
    """The server (the glue) asked for something the protocol forbids. Nothing was
    emitted and the connection's state did not change."""


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol beyond repair: drop the connection. Replies to
    requests still in flight (including ``cookie``, when set) may still be sent."""


# ---- exports -----------------------------------------------------------------------------


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_string(what: str, text: str) -> None:
    if "\0" in text:
        raise InvalidRequestError(f"{what} {text!r} contains a NUL character")
    if len(text.encode("utf-8")) > MAX_STRING:
        raise InvalidRequestError(f"{what} is longer than {MAX_STRING} bytes of UTF-8")


# Export attribute -> the transmission flag it sets (before the rules in
# Export.transmission_flags clear the ones that make no sense).
_EXPORT_FLAGS: Final[tuple[tuple[str, TransmissionFlag], ...]] = (
    ("read_only", TransmissionFlag.READ_ONLY),
    ("can_flush", TransmissionFlag.SEND_FLUSH),
    ("can_fua", TransmissionFlag.SEND_FUA),
    ("rotational", TransmissionFlag.ROTATIONAL),
    ("can_trim", TransmissionFlag.SEND_TRIM),
    ("can_write_zeroes", TransmissionFlag.SEND_WRITE_ZEROES),
    ("can_multi_conn", TransmissionFlag.CAN_MULTI_CONN),
    ("can_cache", TransmissionFlag.SEND_CACHE),
    ("can_fast_zero", TransmissionFlag.SEND_FAST_ZERO),
)
# Flags that expose writing commands: never advertised on a read-only export.
_WRITE_FLAGS: Final = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)


@dataclass(frozen=True, slots=True)
class Export:
    """One export as the server describes it to the core.

    The ``can_*`` fields say what the server will implement; the core turns them into
    transmission flags (:meth:`transmission_flags`) and refuses, with an
    :class:`InvalidRequest`, commands and flags that were not advertised. Block sizes
    follow proto.md: Block size constraints (validated here); the default minimum of 1
    means "any alignment" and the maximum bounds READ, WRITE, CACHE and WRITE_ZEROES.
    Invalid values raise :class:`~qedkit.errors.InvalidRequestError`.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    rotational: bool = False
    min_block_size: int = 1
    preferred_block_size: int = DEFAULT_PREFERRED_BLOCK_SIZE
    max_block_size: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        _check_string("export name", self.name)
        _check_string("export description", self.description)
        if not 0 <= self.size <= _U64:
            raise InvalidRequestError(f"export size {self.size} does not fit in 64 bits")
        low = self.min_block_size
        if not _is_power_of_two(low) or low > MAX_MIN_BLOCK_SIZE:
            raise InvalidRequestError(
                f"minimum block size {low} must be a power of two no larger than "
                f"{MAX_MIN_BLOCK_SIZE}"
            )
        preferred = self.preferred_block_size
        if not _is_power_of_two(preferred) or preferred < max(low, MIN_PREFERRED_BLOCK_SIZE):
            raise InvalidRequestError(
                f"preferred block size {preferred} must be a power of two of at least "
                f"max(minimum block size, {MIN_PREFERRED_BLOCK_SIZE})"
            )
        high = self.max_block_size
        if high % low or high < low or high < min(preferred, self.size) or high > MAX_PAYLOAD:
            raise InvalidRequestError(
                f"maximum block size {high} must be a multiple of the minimum block size, "
                f"at least min(preferred block size, export size) and at most {MAX_PAYLOAD}"
            )

    def transmission_flags(self, *, structured_replies: bool = False) -> TransmissionFlag:
        """The 16-bit transmission flags for this export. NBD_FLAG_SEND_DF depends on
        the connection: it is set exactly when structured replies were negotiated."""
        flags = TransmissionFlag.HAS_FLAGS
        for attribute, flag in _EXPORT_FLAGS:
            if getattr(self, attribute):
                flags |= flag
        if self.read_only:
            flags &= ~_WRITE_FLAGS
        if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
            flags &= ~TransmissionFlag.SEND_FAST_ZERO  # proto.md: MUST be 0 then
        if structured_replies:
            flags |= TransmissionFlag.SEND_DF
        return flags


# ---- events ------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Event:
    """Base class of everything :meth:`ServerConnection.next_event` returns.

    Events are plain (not frozen) dataclasses on purpose: one is built per request,
    and a frozen dataclass costs twice as much to construct (2.3 us vs 1.0 us). Treat
    them as read-only."""


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


# ---- input buffering ---------------------------------------------------------------------


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _ReceiveBuffer:
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


class _Collect:
    """Mid-message read: wait for ``size`` bytes, then hand them to ``done``."""

    __slots__ = ("done", "size", "what")

    def __init__(self, size: int, what: str, done: Callable[[bytes], Event | None]) -> None:
        self.size = size
        self.what = what
        self.done = done

    def advance(self, conn: ServerConnection) -> Event | None:
        buffer = conn._buffer
        if len(buffer) >= self.size:
            conn._pending = None
            return self.done(buffer.take(self.size))
        if conn._eof:
            raise RemoteProtocolError(f"end of file inside {self.what}")
        return NEED_DATA


class _Skip:
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

    def advance(self, conn: ServerConnection) -> Event | None:
        self.remaining -= conn._buffer.skip(self.remaining)
        if self.remaining == 0:
            conn._pending = None
            return self.done()
        if conn._eof:
            raise RemoteProtocolError(f"end of file inside {self.what}")
        return NEED_DATA


class _Payload:
    """Mid-message read: a WRITE payload. When it is already whole in the receive
    buffer it is copied out once; otherwise it is filled piece by piece into its own
    buffer (directly from ``receive_data`` when nothing else is buffered)."""

    __slots__ = ("_data", "_filled", "done", "size")

    def __init__(self, size: int, done: Callable[[memoryview], Event | None]) -> None:
        self.size = size
        self.done = done
        self._data: bytearray | None = None
        self._filled = 0

    def _target(self) -> memoryview:
        if self._data is None:
            self._data = bytearray(self.size)
        return memoryview(self._data)[self._filled :]

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
        data = self._data if self._data is not None else bytearray()
        return self.done(memoryview(data).toreadonly())

    def advance(self, conn: ServerConnection) -> Event | None:
        buffer = conn._buffer
        if self._filled == 0 and len(buffer) >= self.size:
            conn._pending = None
            return self.done(memoryview(buffer.take(self.size)))
        if len(buffer) and self._filled < self.size:
            self._filled += buffer.copy_into(self._target())
        if self._filled == self.size:
            conn._pending = None
            return self._event()
        if conn._eof:
            raise RemoteProtocolError(
                f"end of file inside an NBD_CMD_WRITE payload ({self._filled} of {self.size} bytes)"
            )
        return NEED_DATA


_Pending: TypeAlias = _Collect | _Skip | _Payload


# ---- option parsing helpers --------------------------------------------------------------


class _Malformed(Exception):
    """Option data that does not parse; answered with NBD_REP_ERR_INVALID."""


class _Fields:
    """Bounds-checked big-endian reader over one option's data."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _raw(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise _Malformed(f"option data ends inside the {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self, what: str) -> int:
        value: int = _U16_STRUCT.unpack(self._raw(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32_STRUCT.unpack(self._raw(4, what))[0]
        return value

    def string(self, size: int, what: str) -> str:
        if size > MAX_STRING:
            raise _Malformed(f"the {what} is longer than {MAX_STRING} bytes")
        text = _decode_string(self._raw(size, what))
        if text is None:
            raise _Malformed(f"the {what} is not valid UTF-8 without NUL characters")
        return text

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Malformed(f"{len(self._data) - self._pos} unexpected bytes after the option")


def _decode_string(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _encode_message(message: str) -> bytes:
    """A human-readable message as a protocol string: UTF-8, no NUL, at most 4096 bytes
    (cut at a character boundary)."""
    raw = message.replace("\0", " ").encode("utf-8", "replace")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


_OPTION_NAMES: Final[Mapping[int, str]] = {int(o): f"NBD_OPT_{o.name}" for o in Opt}
_COMMAND_NAMES: Final[Mapping[int, str]] = {int(c): f"NBD_CMD_{c.name}" for c in Cmd}


def _option_name(option: int) -> str:
    return _OPTION_NAMES.get(option) or f"option {option}"


def _command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command) or f"command {command}"


def _match_meta_queries(queries: Sequence[str], *, listing: bool) -> list[MetaContext]:
    """The contexts a LIST (``listing``) or SET query list selects.

    proto.md: Metadata querying. No query: LIST returns everything, SET selects nothing.
    A full name selects that context. An empty leaf name (``"base:"``, ``"qemu:"``) is a
    wildcard over its namespace for LIST and selects nothing for SET. Anything else,
    including unknown namespaces and queries without a colon, is ignored.
    """
    if not queries:
        return list(_META_CONTEXT_NAMES) if listing else []
    selected: set[MetaContext] = set()
    for query in queries:
        namespace, colon, leaf = query.partition(":")
        if not colon:
            continue
        for context, name in _META_CONTEXT_NAMES.items():
            if name == query or (listing and not leaf and name.startswith(namespace + ":")):
                selected.add(context)
    return sorted(selected)


# ---- the command table -------------------------------------------------------------------


_NO_CMD_FLAGS: Final = CmdFlag(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class _CommandRule:
    """How one command is validated, turned into an event and answered.

    flags         command flags documented for it (FUA is valid for every command)
    needs         the transmission flag that exposes the command (HAS_FLAGS: always)
    needs_context refused unless a metadata context was negotiated
    writes        refused with EPERM on a read-only export
    ranged        offset/length address the export: bounds and alignment are checked,
                  and an error reply may carry an offset (proto.md lists exactly these
                  commands for NBD_REPLY_TYPE_ERROR_OFFSET)
    zero_range    offset and length MUST be zero
    limited       length is bounded by the export's maximum block size ...
    unlimited_by  ... unless this flag is set (FAST_ZERO for WRITE_ZEROES, proto.md)
    beyond_end    the error for a range past the end of the export
    reply         the method that answers it successfully (any request may get
                  reply_error)
    build         makes the event from (connection, cookie, offset, length, flags);
                  None for WRITE, whose event is made when its payload is complete
    """

    flags: CmdFlag = _NO_CMD_FLAGS
    needs: TransmissionFlag = TransmissionFlag.HAS_FLAGS
    needs_context: bool = False
    writes: bool = False
    ranged: bool = True
    zero_range: bool = False
    limited: bool = False
    unlimited_by: CmdFlag = _NO_CMD_FLAGS
    beyond_end: Errno = Errno.EINVAL
    reply: str = "reply_ok"
    build: Callable[[ServerConnection, int, int, int, int], Request] | None = None
    # Derived plain-int masks for the per-request checks.
    allowed_bits: int = field(init=False)
    needs_bits: int = field(init=False)
    unlimited_bits: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_bits", int(self.flags) | _FUA)
        object.__setattr__(self, "needs_bits", int(self.needs))
        object.__setattr__(self, "unlimited_bits", int(self.unlimited_by))


# A command flag is only valid if the transmission flag that exposes it was advertised.
_FLAG_NEEDS: Final[tuple[tuple[int, int, str], ...]] = tuple(
    (int(flag), int(needed), f"NBD_CMD_FLAG_{flag.name}")
    for flag, needed in (
        (CmdFlag.FUA, TransmissionFlag.SEND_FUA),
        (CmdFlag.DF, TransmissionFlag.SEND_DF),
        (CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO),
    )
)


def _fua(flags: int) -> bool:
    return bool(flags & _FUA)


def _build_read(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return Read(cookie=cookie, offset=offset, length=length, fua=_fua(flags), df=bool(flags & _DF))


def _build_flush(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return Flush(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_trim(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return Trim(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_cache(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return Cache(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_write_zeroes(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return WriteZeroes(
        cookie=cookie,
        offset=offset,
        length=length,
        fua=_fua(flags),
        no_hole=bool(flags & _NO_HOLE),
        fast_zero=bool(flags & _FAST_ZERO),
    )


def _build_block_status(
    conn: ServerConnection, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return BlockStatus(
        cookie=cookie,
        offset=offset,
        length=length,
        fua=_fua(flags),
        req_one=bool(flags & _REQ_ONE),
        context_ids=conn.meta_contexts,
    )


_COMMAND_RULES: Final[Mapping[int, _CommandRule]] = {
    Cmd.READ: _CommandRule(flags=CmdFlag.DF, limited=True, reply="reply_read", build=_build_read),
    Cmd.WRITE: _CommandRule(writes=True, limited=True, beyond_end=Errno.ENOSPC),
    Cmd.FLUSH: _CommandRule(
        needs=TransmissionFlag.SEND_FLUSH, ranged=False, zero_range=True, build=_build_flush
    ),
    Cmd.TRIM: _CommandRule(needs=TransmissionFlag.SEND_TRIM, writes=True, build=_build_trim),
    Cmd.CACHE: _CommandRule(needs=TransmissionFlag.SEND_CACHE, limited=True, build=_build_cache),
    Cmd.WRITE_ZEROES: _CommandRule(
        flags=CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
        needs=TransmissionFlag.SEND_WRITE_ZEROES,
        writes=True,
        limited=True,
        unlimited_by=CmdFlag.FAST_ZERO,
        beyond_end=Errno.ENOSPC,
        build=_build_write_zeroes,
    ),
    Cmd.BLOCK_STATUS: _CommandRule(
        flags=CmdFlag.REQ_ONE,
        needs_context=True,
        reply="reply_block_status",
        build=_build_block_status,
    ),
}


@dataclass(slots=True)
class _InFlight:
    """A request awaiting its reply (the event itself is not kept: it may hold a
    32 MiB payload)."""

    command: int
    offset: int
    length: int
    flags: int
    valid: bool


# Shared zeros for holes that must be spelled out (simple READ replies, DF replies).
# bytes(n) is calloc'ed: the pages cost nothing until a reply actually sends them.
_ZERO_BLOCK_SIZE: Final = 1 << 20
_ZERO_BLOCK: Final = bytes(_ZERO_BLOCK_SIZE)


def _zeros(length: int) -> list[Buffer]:
    """Views of the shared zero block covering ``length`` bytes."""
    block = memoryview(_ZERO_BLOCK)
    out: list[Buffer] = []
    while length > 0:
        step = min(length, _ZERO_BLOCK_SIZE)
        out.append(block[:step])
        length -= step
    return out


# ---- the connection ----------------------------------------------------------------------


class ServerConnection:
    """The server side of one NBD connection; see the module docstring.

    ``exports`` are the exports this connection may see (names must be unique); ``tls``
    says how NBD_OPT_STARTTLS is answered. The greeting is queued at construction:
    start by sending ``data_to_send()``.
    """

    def __init__(self, exports: Iterable[Export], *, tls: TlsMode = TlsMode.DISABLED) -> None:
        self._exports: tuple[Export, ...] = tuple(exports)
        self._by_name: dict[str, Export] = {}
        for export in self._exports:
            if export.name in self._by_name:
                raise InvalidRequestError(f"two exports are named {export.name!r}")
            self._by_name[export.name] = export
        self._tls_mode = tls
        self._tls_active = False
        self._state = State.CLIENT_FLAGS
        self._buffer = _ReceiveBuffer()
        self._pending: _Pending | None = None
        self._eof = False
        self._out = bytearray(_GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS))
        self._client_flags = ClientFlag(0)
        self._structured = False
        self._meta_export: Export | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()
        self._shutting_down = False
        # Set on entering transmission.
        self._export: Export | None = None
        self._tflags = TransmissionFlag(0)
        self._tflag_bits = 0
        self._contexts: tuple[MetaContext, ...] = ()
        self._inflight: dict[int, list[_InFlight]] = {}
        self._inflight_count = 0

    # ---- introspection -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def exports(self) -> tuple[Export, ...]:
        return self._exports

    @property
    def client_flags(self) -> ClientFlag:
        return self._client_flags

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def structured_replies(self) -> bool:
        """Whether structured replies are negotiated (so far, during the handshake)."""
        return self._structured

    @property
    def export(self) -> Export | None:
        """The export in use, once the transmission phase began."""
        return self._export

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The flags sent for the export in use (0 before the transmission phase)."""
        return self._tflags

    @property
    def meta_contexts(self) -> tuple[MetaContext, ...]:
        """The metadata contexts usable with NBD_CMD_BLOCK_STATUS."""
        return self._contexts

    @property
    def inflight(self) -> int:
        """Requests that still await a reply."""
        return self._inflight_count

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # ---- input -------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Add bytes read from the client; ``b""`` means end of file. The bytes are
        copied, so the caller may reuse its buffer. Nothing is parsed until
        :meth:`next_event`."""
        if self._eof:
            raise LocalProtocolError("receive_data() called after end of file")
        if self._state is State.TLS_PENDING:
            raise LocalProtocolError(
                "bytes received while waiting for tls_established(): after StartTLS the "
                "glue must run the TLS handshake before feeding the connection again"
            )
        view = _byte_view(data)
        if not len(view):
            self._eof = True
            return
        pending = self._pending
        if not len(self._buffer) and isinstance(pending, _Skip | _Payload):
            view = pending.absorb(view)
        if len(view):
            self._buffer.append(view)

    def receive_requests(
        self, data: bytes, limit: int, read_bytes: int
    ) -> tuple[list[Read | Write], int]:
        """Fast lane for the steady state: parse, in place, the flagless READ and WRITE
        requests that ``data`` (bytes just read from the client) begins with, when
        nothing is buffered: at most ``limit`` requests, and READs for at most
        ``read_bytes`` in all (one READ, whatever its length, when it comes first), so
        that the glue can stop between the others when its output backs up. Returns
        their events (a WRITE's ``data`` is a view of ``data``, not a copy) and how many
        bytes of ``data`` were taken; feed the rest to :meth:`receive_data` as usual.

        Equivalent to ``receive_data`` followed by ``next_event`` calls, minus the
        buffering. It also finishes a WRITE payload that an earlier chunk left
        incomplete, and takes the start of a payload that ``data`` ends with. It
        stops at the first request that is anything else (another command, flags, a
        refusal, a violation, a header cut in two), which the general path then
        handles."""
        events: list[Read | Write] = []
        if self._state is not State.TRANSMISSION or self._eof or len(self._buffer):
            return events, 0
        size = len(data)
        pos = 0
        view: memoryview | None = None
        pending = self._pending
        if pending is not None:
            if type(pending) is not _Payload:
                return events, 0
            view = memoryview(data)
            pos = pending.missing()
            if pos > size:
                pending.absorb(view)
                return events, size
            self._pending = None
            event = pending.finish(view[:pos])
            assert isinstance(event, Write)
            events.append(event)
        unpack = _REQUEST.unpack_from
        accept = self._accept_fast
        while size - pos >= _REQUEST_SIZE and len(events) < limit:
            magic, flags, command, cookie, offset, length = unpack(data, pos)
            start = pos + _REQUEST_SIZE
            end = start + length if command == _CMD_WRITE else start
            if command == _CMD_READ:
                if events and length > read_bytes:
                    break
                read_bytes -= length
            if not accept(magic, flags, command, cookie, offset, length):
                break  # the general path handles it (or refuses it with the right error)
            if view is None:
                view = memoryview(data)
            if command == _CMD_READ:
                events.append(
                    Read(cookie=cookie, offset=offset, length=length, fua=False, df=False)
                )
            elif end <= size:
                payload = view[start:end]
                events.append(
                    Write(cookie=cookie, offset=offset, length=length, fua=False, data=payload)
                )
            else:  # the payload goes on in the next chunks
                self._pending = self._fast_payload(cookie, offset, length)
                self._pending.absorb(view[start:])
                return events, size
            pos = end
        return events, pos

    def next_event(self) -> Event:
        """The next event, or NEED_DATA / PAUSED. Raises RemoteProtocolError when the
        client broke the protocol (then drop the connection)."""
        if self._state is State.TRANSMISSION and self._pending is None:
            # Fast lane for the steady state: a request header straight off the buffer.
            if len(self._buffer) >= _REQUEST_SIZE:
                try:
                    event = self._on_request(*self._buffer.unpack(_REQUEST))
                except RemoteProtocolError:
                    self._state = State.ERROR
                    self._pending = None
                    raise
                if event is not None:
                    return event
            elif not self._eof:
                return NEED_DATA
        try:
            while True:
                event = self._step()
                if event is not None:
                    return event
        except RemoteProtocolError:
            self._state = State.ERROR
            self._pending = None
            raise

    def data_to_send(self) -> bytes:
        """Handshake bytes queued by the core (greeting, option replies): send them after
        every ``next_event()``."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The glue finished the server-side TLS handshake after a :class:`StartTLS`.
        Negotiation restarts from scratch, as proto.md requires: structured replies and
        metadata contexts chosen before STARTTLS are forgotten."""
        self._transition(_Trigger.TLS_UP)
        self._tls_active = True
        self._structured = False
        self._meta_export = None
        self._meta_selected = ()

    def start_shutdown(self) -> None:
        """The server is going down: further options get NBD_REP_ERR_SHUTDOWN (but
        NBD_OPT_ABORT, and NBD_OPT_EXPORT_NAME, which cannot fail) and further requests
        an InvalidRequest with ESHUTDOWN (proto.md: Terminating the transmission phase).
        Requests already delivered are unaffected; NBD_CMD_DISC is still honoured."""
        self._shutting_down = True

    # ---- the parser loop ---------------------------------------------------------------

    def _transition(self, trigger: _Trigger) -> None:
        target = _TRANSITIONS[self._state].get(trigger)
        if target is None:
            raise LocalProtocolError(f"{trigger.value}: not possible in state {self._state.value}")
        self._state = target

    def _step(self) -> Event | None:
        state = self._state
        if state is State.ERROR:
            raise RemoteProtocolError("the connection already failed with a protocol error")
        if state is State.CLOSED:
            return CONNECTION_CLOSED
        if state is State.TLS_PENDING:
            return PAUSED
        if self._pending is not None:
            return self._pending.advance(self)
        size, what, handler = _BOUNDARY_READS[state]
        available = len(self._buffer)
        if available >= size:
            return handler(self, self._buffer.take(size))
        if not self._eof:
            return NEED_DATA
        if available == 0:
            self._transition(_Trigger.EOF)
            return CONNECTION_CLOSED
        raise RemoteProtocolError(f"end of file inside the {what} ({available} of {size} bytes)")

    # ---- handshake ---------------------------------------------------------------------

    def _on_client_flags(self, raw: bytes) -> Event | None:
        (flags,) = _CLIENT_FLAGS.unpack(raw)
        unknown = flags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            raise RemoteProtocolError(f"the client set unknown flags {unknown:#x}")
        self._client_flags = ClientFlag(flags)
        if self._tls_mode is TlsMode.REQUIRED and not flags & ClientFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError(
                "TLS is required but the client did not set NBD_FLAG_C_FIXED_NEWSTYLE, "
                "without which TLS cannot be negotiated"
            )
        self._transition(_Trigger.CLIENT_FLAGS)
        return None

    def _on_option_header(self, raw: bytes) -> Event | None:
        magic, option, length = _OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#018x} (expected IHAVEOPT)")
        rule = _OPTION_RULES.get(option)
        what = f"the data of {_option_name(option)}"
        refusal = self._option_refusal(option, rule, length)
        if refusal is not None:
            reply, message = refusal
            if rule is not None and not rule.can_fail:
                raise RemoteProtocolError(f"{message}; {_option_name(option)} cannot fail")
            self._pending = _Skip(length, what, lambda: self._refuse_option(option, reply, message))
        elif rule is not None and length > rule.max_length:
            # Data the spec says to ignore (NBD_OPT_ABORT): skip it unread.
            self._pending = _Skip(length, what, lambda: rule.handler(self, option, b""))
        elif rule is not None:
            self._pending = _Collect(length, what, lambda data: rule.handler(self, option, data))
        return None

    def _option_refusal(
        self, option: int, rule: _OptionRule | None, length: int
    ) -> tuple[Rep, str] | None:
        """The error reply an option gets without looking at its data, if any."""
        name = _option_name(option)
        if self._shutting_down and (rule is None or rule.refused_on_shutdown):
            return Rep.ERR_SHUTDOWN, "the server is shutting down"
        tls_missing = self._tls_mode is TlsMode.REQUIRED and not self._tls_active
        if tls_missing and (rule is None or not rule.before_tls):
            return Rep.ERR_TLS_REQD, f"TLS is required before {name}"
        if rule is None:
            return Rep.ERR_UNSUP, f"{name} is not supported"
        if length > rule.max_length and rule.oversize is not None:
            return rule.oversize, f"{name}: {length} bytes of option data is too much"
        return None

    def _refuse_option(self, option: int, reply: Rep, message: str) -> Event | None:
        if option == Opt.SET_META_CONTEXT:
            self._forget_meta_contexts()  # proto.md: replaced even when it fails
        self._send_option_reply(option, reply, _encode_message(message))
        return None

    def _send_option_reply(self, option: int, reply: Rep, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _option_error(self, option: int, reply: Rep, message: str) -> Event | None:
        self._send_option_reply(option, reply, _encode_message(message))
        return None

    def _find_export(self, name: str) -> Export | None:
        export = self._by_name.get(name)
        if export is None and name == "" and self._exports:
            export = self._exports[0]
        return export

    def _forget_meta_contexts(self) -> None:
        self._meta_export = None
        self._meta_selected = ()

    def _enter_transmission(
        self, export: Export, via: Opt, *, block_size_requested: bool
    ) -> HandshakeComplete:
        self._export = export
        self._tflags = export.transmission_flags(structured_replies=self._structured)
        self._tflag_bits = int(self._tflags)
        self._contexts = self._meta_selected if self._meta_export is export else ()
        self._transition(_Trigger.ENTER)
        return HandshakeComplete(
            export=export,
            via=via,
            transmission_flags=self._tflags,
            structured_replies=self._structured,
            meta_contexts=self._contexts,
            block_size_requested=block_size_requested,
        )

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        name = _decode_string(data)
        if name is None:
            raise RemoteProtocolError(
                "NBD_OPT_EXPORT_NAME: the name is not valid UTF-8 without NUL; "
                "the option cannot fail, so the session ends"
            )
        export = self._find_export(name)
        if export is None:
            raise RemoteProtocolError(
                f"NBD_OPT_EXPORT_NAME: no export named {name!r}; "
                "the option cannot fail, so the session ends"
            )
        flags = export.transmission_flags(structured_replies=self._structured)
        self._out += _EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._client_flags & ClientFlag.NO_ZEROES:
            self._out += bytes(EXPORT_NAME_PADDING)
        return self._enter_transmission(export, Opt.EXPORT_NAME, block_size_requested=False)

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        self._send_option_reply(option, Rep.ACK)
        self._transition(_Trigger.ABORT)
        return Abort()

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        for export in self._exports:
            name = export.name.encode("utf-8")
            record = _U32_STRUCT.pack(len(name)) + name + export.description.encode("utf-8")
            self._send_option_reply(option, Rep.SERVER, record)
        self._send_option_reply(option, Rep.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        if self._tls_active:
            return self._option_error(option, Rep.ERR_INVALID, "TLS is already active")
        refusal = _STARTTLS_REFUSALS.get(self._tls_mode)
        if refusal is not None:
            return self._option_error(option, refusal, "TLS is not available on this server")
        if not self._client_flags & ClientFlag.FIXED_NEWSTYLE:
            return self._option_error(option, Rep.ERR_POLICY, "TLS needs NBD_FLAG_C_FIXED_NEWSTYLE")
        if len(self._buffer):
            raise RemoteProtocolError(
                "the client sent data after NBD_OPT_STARTTLS without waiting for the reply"
            )
        self._send_option_reply(option, Rep.ACK)
        self._transition(_Trigger.STARTTLS)
        return StartTLS()

    def _opt_info_or_go(self, option: int, data: bytes) -> Event | None:
        fields = _Fields(data)
        try:
            name = fields.string(fields.u32("name length"), "export name")
            count = fields.u16("information request count")
            requests = {fields.u16("information request") for _ in range(count)}
            fields.end()
        except _Malformed as exc:
            return self._option_error(option, Rep.ERR_INVALID, f"{_option_name(option)}: {exc}")
        export = self._find_export(name)
        if export is None:
            return self._option_error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(structured_replies=self._structured)
        self._send_option_reply(
            option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, flags)
        )
        if Info.NAME in requests:
            self._send_option_reply(
                option, Rep.INFO, _U16_STRUCT.pack(Info.NAME) + export.name.encode("utf-8")
            )
        if Info.DESCRIPTION in requests and export.description:
            self._send_option_reply(
                option,
                Rep.INFO,
                _U16_STRUCT.pack(Info.DESCRIPTION) + export.description.encode("utf-8"),
            )
        self._send_option_reply(
            option,
            Rep.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE,
                export.min_block_size,
                export.preferred_block_size,
                export.max_block_size,
            ),
        )
        self._send_option_reply(option, Rep.ACK)
        if option != Opt.GO:
            return None
        return self._enter_transmission(
            export, Opt.GO, block_size_requested=Info.BLOCK_SIZE in requests
        )

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        if self._structured:
            return self._option_error(
                option, Rep.ERR_INVALID, "structured replies are already negotiated"
            )
        self._structured = True
        self._send_option_reply(option, Rep.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            self._forget_meta_contexts()
        name = _option_name(option)
        if not self._structured:
            return self._option_error(
                option, Rep.ERR_INVALID, f"{name} needs structured replies first"
            )
        fields = _Fields(data)
        try:
            export_name = fields.string(fields.u32("name length"), "export name")
            count = fields.u32("query count")
            queries: list[str] = []
            for _ in range(count):
                queries.append(fields.string(fields.u32("query length"), "query"))
            fields.end()
        except _Malformed as exc:
            return self._option_error(option, Rep.ERR_INVALID, f"{name}: {exc}")
        export = self._find_export(export_name)
        if export is None:
            return self._option_error(option, Rep.ERR_UNKNOWN, f"no export named {export_name!r}")
        contexts = _match_meta_queries(queries, listing=not setting)
        for context in contexts:
            context_id = int(context) if setting else 0  # proto.md: LIST ids SHOULD be 0
            self._send_option_reply(
                option,
                Rep.META_CONTEXT,
                _U32_STRUCT.pack(context_id) + context.context_name.encode("utf-8"),
            )
        if setting:
            self._meta_export = export
            self._meta_selected = tuple(contexts)
        self._send_option_reply(option, Rep.ACK)
        return None

    # ---- transmission ------------------------------------------------------------------

    def _on_request_header(self, raw: bytes) -> Event | None:
        return self._on_request(*_REQUEST.unpack(raw))

    def _accept_fast(
        self, magic: int, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> bool:
        """The fast path for the bulk of traffic, READ and WRITE without flags: the
        checks of _request_refusal that can fail for them, in the same order. True:
        the request is valid and now tracked as in flight; False: nothing happened."""
        if flags or magic != REQUEST_MAGIC or (command != _CMD_READ and command != _CMD_WRITE):
            return False
        export = self._export
        if (
            export is None
            or self._shutting_down
            or offset + length > export.size
            or length > export.max_block_size
            or export.min_block_size != 1
            or (command == _CMD_WRITE and export.read_only)
        ):
            return False
        self._inflight.setdefault(cookie, []).append(_InFlight(command, offset, length, 0, True))
        self._inflight_count += 1
        return True

    @staticmethod
    def _fast_payload(cookie: int, offset: int, length: int) -> _Payload:
        """The collector of an accepted flagless WRITE's payload."""

        def written(data: memoryview) -> Event:
            return Write(cookie=cookie, offset=offset, length=length, fua=False, data=data)

        return _Payload(length, written)

    def _on_request(
        self, magic: int, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> Event | None:
        if self._accept_fast(magic, flags, command, cookie, offset, length):
            if command == _CMD_READ:
                return Read(cookie=cookie, offset=offset, length=length, fua=False, df=False)
            if len(self._buffer) >= length:  # the payload is here already
                data = memoryview(self._buffer.take(length))
                return Write(cookie=cookie, offset=offset, length=length, fua=False, data=data)
            self._pending = self._fast_payload(cookie, offset, length)
            return None
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#010x}")
        if command == Cmd.DISC:
            self._transition(_Trigger.DISCONNECT)
            return Disconnect(cookie=cookie, offset=offset, length=length, fua=_fua(flags))
        has_payload = command == Cmd.WRITE
        if has_payload and length > MAX_PAYLOAD:
            self._track(cookie, command, offset, length, flags, valid=False)
            raise RemoteProtocolError(
                f"NBD_CMD_WRITE of {length} bytes is over the {MAX_PAYLOAD}-byte limit; "
                "its payload cannot be consumed safely",
                cookie=cookie,
            )
        refusal = self._request_refusal(command, flags, offset, length)
        if refusal is not None:
            errno, message = refusal
            self._track(cookie, command, offset, length, flags, valid=False)
            if has_payload:
                self._pending = _Skip(length, "a refused NBD_CMD_WRITE payload", lambda: None)
            return InvalidRequest(
                cookie=cookie,
                offset=offset,
                length=length,
                fua=_fua(flags),
                command=command,
                errno=errno,
                message=message,
            )
        self._track(cookie, command, offset, length, flags, valid=True)
        if has_payload:

            def written(data: memoryview) -> Event:
                return Write(
                    cookie=cookie, offset=offset, length=length, fua=_fua(flags), data=data
                )

            self._pending = _Payload(length, written)
            return None
        build = _COMMAND_RULES[command].build
        if build is None:  # pragma: no cover - only WRITE, handled above
            raise AssertionError(f"no event builder for {_command_name(command)}")
        return build(self, cookie, offset, length, flags)

    def _request_refusal(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """Why a request must be refused (proto.md: Error values), in a fixed order."""
        rule = _COMMAND_RULES.get(command)
        name = _command_name(command)
        if rule is None:
            return Errno.EINVAL, f"{name} is not supported"
        if self._shutting_down:
            return Errno.ESHUTDOWN, "the server is shutting down"
        export = self._export
        if export is None:  # pragma: no cover - requests are only parsed in transmission
            raise AssertionError("request outside the transmission phase")
        if rule.writes and export.read_only:
            return Errno.EPERM, f"{name} on a read-only export"
        extra = flags & ~rule.allowed_bits
        if extra:
            return Errno.EINVAL, f"flags {extra:#x} are not valid for {name}"
        for flag, needed, flag_name in _FLAG_NEEDS:
            if flags & flag and not self._tflag_bits & needed:
                return Errno.EINVAL, f"{flag_name} was not negotiated"
        if not self._tflag_bits & rule.needs_bits:
            return Errno.EINVAL, f"{name} was not negotiated"
        if rule.needs_context and not self._contexts:
            return Errno.EINVAL, "no metadata context was negotiated"
        if rule.zero_range and (offset or length):
            return Errno.EINVAL, f"{name} needs offset and length 0"
        if rule.ranged:
            end = offset + length
            if end > export.size:
                return rule.beyond_end, (
                    f"{name} of [{offset}, {end}) is past the end of the export ({export.size})"
                )
            block = export.min_block_size
            if offset % block or (length % block and end != export.size):
                return Errno.EINVAL, f"{name} is not aligned to the minimum block size {block}"
        if rule.limited and length > export.max_block_size and not flags & rule.unlimited_bits:
            return Errno.EINVAL, (
                f"{name} of {length} bytes is over the maximum block size {export.max_block_size}"
            )
        return None

    def _on_data_after_end(self, raw: bytes) -> Event | None:
        raise RemoteProtocolError("the client sent data after ending the session")

    # ---- replies -----------------------------------------------------------------------

    def _track(
        self, cookie: int, command: int, offset: int, length: int, flags: int, *, valid: bool
    ) -> None:
        self._inflight.setdefault(cookie, []).append(
            _InFlight(command, offset, length, flags, valid)
        )
        self._inflight_count += 1

    def _awaiting(self, cookie: int, method: str) -> _InFlight:
        """The oldest request with this cookie that awaits a reply (proto.md allows, but
        discourages, reusing a cookie that is in flight; replies then pair in order)."""
        entries = self._inflight.get(cookie)
        if not entries:
            raise LocalProtocolError(
                f"{method}: no request with cookie {cookie:#x} awaits a reply", cookie=cookie
            )
        entry = entries[0]
        rule = _COMMAND_RULES.get(entry.command)
        expected = rule.reply if rule is not None else "reply_error"
        if method != "reply_error" and (not entry.valid or method != expected):
            need = expected if entry.valid else "reply_error"
            raise LocalProtocolError(
                f"{method}: request {cookie:#x} ({_command_name(entry.command)}"
                f"{'' if entry.valid else ', refused'}) must be answered with {need}()",
                cookie=cookie,
            )
        return entry

    def _done(self, cookie: int) -> None:
        entries = self._inflight[cookie]
        del entries[0]
        if not entries:
            del self._inflight[cookie]
        self._inflight_count -= 1

    def _chunk(self, flags: int, kind: ReplyType, cookie: int, payload: bytes) -> bytes:
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success for a request without reply data (all but READ and BLOCK_STATUS):
        a simple reply, which proto.md allows even with structured replies."""
        self._awaiting(cookie, "reply_ok")
        self._done(cookie)
        return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]

    def reply_error(
        self, cookie: int, errno: int, message: str = "", *, offset: int | None = None
    ) -> list[Buffer]:
        """Failure of any request. ``errno`` must be an :class:`Errno` value (see
        :func:`nbd_errno_for`). With structured replies this is an NBD_REPLY_TYPE_ERROR
        chunk carrying ``message`` (NBD_REPLY_TYPE_ERROR_OFFSET when ``offset``, which
        must lie inside the request, is given); otherwise a simple reply with the error
        and neither message nor offset."""
        entry = self._awaiting(cookie, "reply_error")
        code = Errno._value2member_map_.get(errno)
        if not isinstance(code, Errno):
            raise LocalProtocolError(
                f"reply_error: {errno!r} is not an NBD error value", cookie=cookie
            )
        if offset is not None:
            rule = _COMMAND_RULES.get(entry.command)
            if rule is None or not rule.ranged:
                raise LocalProtocolError(
                    f"reply_error: an error offset is not valid for {_command_name(entry.command)}",
                    cookie=cookie,
                )
            if not entry.offset <= offset < entry.offset + entry.length:
                raise LocalProtocolError(
                    f"reply_error: offset {offset} is outside the request "
                    f"[{entry.offset}, {entry.offset + entry.length})",
                    cookie=cookie,
                )
        self._done(cookie)
        if not self._structured:
            return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie)]
        text = _encode_message(message)
        payload = _ERROR_HEAD.pack(code, len(text)) + text
        if offset is None:
            return [self._chunk(_DONE, ReplyType.ERROR, cookie, payload)]
        payload += _U64_STRUCT.pack(offset)
        return [self._chunk(_DONE, ReplyType.ERROR_OFFSET, cookie, payload)]

    def reply_read(self, cookie: int, chunks: Iterable[ReadChunk] | Buffer) -> list[Buffer]:
        """Success for a READ. ``chunks`` (data or holes, any order, absolute offsets)
        must cover the request exactly; a plain buffer means one data chunk for the
        whole request. Without structured replies this is a simple reply followed by
        the data (holes spelled out as zeros). With them, one chunk per item (holes as
        NBD_REPLY_TYPE_OFFSET_HOLE) and NBD_REPLY_FLAG_DONE on the last; when the client
        set NBD_CMD_FLAG_DF, all items travel in a single NBD_REPLY_TYPE_OFFSET_DATA.
        Data buffers are returned as views, never copied."""
        if isinstance(chunks, bytes | bytearray | memoryview):
            # Fast path: one buffer answering the oldest READ with this cookie.
            entries = self._inflight.get(cookie)
            if entries:
                first = entries[0]
                if first.valid and first.command == _CMD_READ and len(chunks) == first.length:
                    self._done(cookie)
                    if not self._structured:
                        return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), chunks]
                    if not first.length:
                        return [self._chunk(_DONE, ReplyType.NONE, cookie, b"")]
                    head = _CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
                        8 + first.length, first.offset,
                    )  # fmt: skip
                    return [head, chunks]
        entry = self._awaiting(cookie, "reply_read")
        if isinstance(chunks, bytes | bytearray | memoryview):
            chunks = [DataChunk(entry.offset, chunks)]
        pieces = _cover(entry, chunks, cookie)
        self._done(cookie)
        out: list[Buffer] = []
        if not self._structured:
            out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            for _, length, view in pieces:
                out.extend([view] if view is not None else _zeros(length))
            return out
        if not pieces:
            return [self._chunk(_DONE, ReplyType.NONE, cookie, b"")]
        if entry.flags & _DF and len(pieces) > 1:
            out.append(
                _CHUNK_OFFSET.pack(
                    STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
                    8 + entry.length, entry.offset,
                )
            )  # fmt: skip
            for _, length, view in pieces:
                out.extend([view] if view is not None else _zeros(length))
            return out
        last = len(pieces) - 1
        for index, (offset, length, view) in enumerate(pieces):
            flags = _DONE if index == last else 0
            if view is None:
                out.append(
                    _CHUNK_HOLE.pack(
                        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12,
                        offset, length,
                    )
                )  # fmt: skip
            else:
                out.append(
                    _CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie,
                        8 + length, offset,
                    )
                )  # fmt: skip
                out.append(view)
        return out

    def reply_block_status(
        self, cookie: int, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> list[Buffer]:
        """Success for a BLOCK_STATUS: ``extents`` maps every negotiated context id to
        consecutive ``(length, flags)`` extents starting at the request's offset. The
        core trims the list to the request: extents after the one reaching the request's
        end are dropped and that one is shortened (with NBD_CMD_FLAG_REQ_ONE, only the
        first extent is kept). One NBD_REPLY_TYPE_BLOCK_STATUS chunk per context, in id
        order, NBD_REPLY_FLAG_DONE on the last."""
        entry = self._awaiting(cookie, "reply_block_status")
        wanted = sorted(self._contexts)
        if sorted(extents) != wanted:
            raise LocalProtocolError(
                f"reply_block_status: extents must be given for exactly the contexts "
                f"{[int(c) for c in wanted]}, not {sorted(extents)}",
                cookie=cookie,
            )
        req_one = bool(entry.flags & _REQ_ONE)
        payloads = [
            _U32_STRUCT.pack(context)
            + b"".join(
                _DESCRIPTOR.pack(length, flags)
                for length, flags in _trim_extents(extents[context], entry.length, req_one, cookie)
            )
            for context in wanted
        ]
        self._done(cookie)
        last = len(payloads) - 1
        return [
            self._chunk(
                _DONE if index == last else 0,
                ReplyType.BLOCK_STATUS,
                cookie,
                payload,
            )
            for index, payload in enumerate(payloads)
        ]


def _cover(
    entry: _InFlight, chunks: Iterable[ReadChunk], cookie: int
) -> list[tuple[int, int, memoryview | None]]:
    """(offset, length, view or None for a hole) sorted, checked to tile the request."""
    pieces: list[tuple[int, int, memoryview | None]] = []
    for chunk in chunks:
        if isinstance(chunk, DataChunk):
            view = _byte_view(chunk.data)
            pieces.append((chunk.offset, len(view), view))
        elif isinstance(chunk, HoleChunk):
            pieces.append((chunk.offset, chunk.length, None))
        else:
            raise LocalProtocolError(
                f"reply_read: {chunk!r} is neither a DataChunk nor a HoleChunk", cookie=cookie
            )
    pieces.sort(key=lambda piece: piece[0])
    position = entry.offset
    for offset, length, _ in pieces:
        if length <= 0 or offset != position:
            raise LocalProtocolError(
                f"reply_read: chunks must tile [{entry.offset}, {entry.offset + entry.length}) "
                f"without gaps, overlaps or empty chunks; found {length} bytes at {offset} "
                f"where {position} was expected",
                cookie=cookie,
            )
        position += length
    if position != entry.offset + entry.length:
        raise LocalProtocolError(
            f"reply_read: chunks end at {position}, the request at {entry.offset + entry.length}",
            cookie=cookie,
        )
    return pieces


def _trim_extents(
    extents: Sequence[tuple[int, int]], length: int, req_one: bool, cookie: int
) -> list[tuple[int, int]]:
    if not extents:
        raise LocalProtocolError("reply_block_status: a context has no extent", cookie=cookie)
    out: list[tuple[int, int]] = []
    covered = 0
    for extent_length, flags in extents:
        if not 0 < extent_length <= _U32 or not 0 <= flags <= _U32:
            raise LocalProtocolError(
                f"reply_block_status: extent ({extent_length}, {flags}) needs a length in "
                f"1..2**32-1 and flags in 0..2**32-1",
                cookie=cookie,
            )
        if length and covered + extent_length > length:
            extent_length = length - covered
        out.append((extent_length, flags))
        covered += extent_length
        if req_one or covered >= length:
            break
    return out


# ---- the option table --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _OptionRule:
    """How one option is handled.

    handler              (connection, option, data) -> event or None; replies queued
    max_length           the most option data accepted ...
    oversize             ... and the reply to more (None: skip the data, run the handler)
    before_tls           answered normally before TLS in TlsMode.REQUIRED
    refused_on_shutdown  answered NBD_REP_ERR_SHUTDOWN once shutting down
    can_fail             has error replies (NBD_OPT_EXPORT_NAME has none: any refusal
                         ends the session)
    """

    handler: Callable[[ServerConnection, int, bytes], Event | None]
    max_length: int
    oversize: Rep | None
    before_tls: bool = False
    refused_on_shutdown: bool = True
    can_fail: bool = True


_OPTION_RULES: Final[Mapping[int, _OptionRule]] = {
    Opt.EXPORT_NAME: _OptionRule(
        handler=ServerConnection._opt_export_name,
        max_length=MAX_STRING,
        oversize=Rep.ERR_TOO_BIG,
        refused_on_shutdown=False,
        can_fail=False,
    ),
    Opt.ABORT: _OptionRule(
        handler=ServerConnection._opt_abort,
        max_length=0,
        oversize=None,  # proto.md: data SHOULD be ignored
        before_tls=True,
        refused_on_shutdown=False,
    ),
    Opt.LIST: _OptionRule(
        handler=ServerConnection._opt_list, max_length=0, oversize=Rep.ERR_INVALID
    ),
    Opt.STARTTLS: _OptionRule(
        handler=ServerConnection._opt_starttls,
        max_length=0,
        oversize=Rep.ERR_INVALID,
        before_tls=True,
    ),
    Opt.INFO: _OptionRule(
        handler=ServerConnection._opt_info_or_go,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
    Opt.GO: _OptionRule(
        handler=ServerConnection._opt_info_or_go,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
    Opt.STRUCTURED_REPLY: _OptionRule(
        handler=ServerConnection._opt_structured_reply,
        max_length=0,
        oversize=Rep.ERR_INVALID,
    ),
    Opt.LIST_META_CONTEXT: _OptionRule(
        handler=ServerConnection._opt_meta_context,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
    Opt.SET_META_CONTEXT: _OptionRule(
        handler=ServerConnection._opt_meta_context,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
}

# How NBD_OPT_STARTTLS is refused in the NOTLS modes.
_STARTTLS_REFUSALS: Final[Mapping[TlsMode, Rep]] = {
    TlsMode.UNSUPPORTED: Rep.ERR_UNSUP,
    TlsMode.DISABLED: Rep.ERR_POLICY,
}

# What the parser waits for at a message boundary in each input state.
_BOUNDARY_READS: Final[
    Mapping[State, tuple[int, str, Callable[[ServerConnection, bytes], Event | None]]]
] = {
    State.CLIENT_FLAGS: (_CLIENT_FLAGS.size, "client flags", ServerConnection._on_client_flags),
    State.NEGOTIATING: (_OPTION_HEADER.size, "option header", ServerConnection._on_option_header),
    State.TRANSMISSION: (_REQUEST.size, "request header", ServerConnection._on_request_header),
    State.DONE: (1, "trailing data", ServerConnection._on_data_after_end),
}


# ---- error mapping -----------------------------------------------------------------------

# Host errno -> NBD error (proto.md: Error values). EDQUOT and EFBIG become ENOSPC as the
# spec asks; EOVERFLOW and ENOTSUP are reserved by the spec for DF reads and fast zeroes,
# which a generic mapping cannot know about, so they become EINVAL.
_ERRNO_BY_HOST: Final[Mapping[int, Errno]] = {
    code: nbd
    for name, nbd in (
        ("EPERM", Errno.EPERM),
        ("EACCES", Errno.EPERM),
        ("EROFS", Errno.EPERM),
        ("EIO", Errno.EIO),
        ("ENOMEM", Errno.ENOMEM),
        ("EINVAL", Errno.EINVAL),
        ("EOVERFLOW", Errno.EINVAL),
        ("ENOTSUP", Errno.EINVAL),
        ("EOPNOTSUPP", Errno.EINVAL),
        ("ENOSPC", Errno.ENOSPC),
        ("EDQUOT", Errno.ENOSPC),
        ("EFBIG", Errno.ENOSPC),
        ("ESHUTDOWN", Errno.ESHUTDOWN),
    )
    if (code := getattr(_os_errno, name, None)) is not None
}

# qedkit error class -> NBD error, first match wins (subclasses before their bases).
_ERRNO_BY_TYPE: Final[tuple[tuple[type[BaseException], Errno], ...]] = (
    (ReadOnlyError, Errno.EPERM),
    (InvalidRequestError, Errno.EINVAL),
    (UnsupportedFeatureError, Errno.EINVAL),
    (CorruptImageError, Errno.EIO),
    (MemoryError, Errno.ENOMEM),
)


def nbd_errno_for(exc: BaseException) -> Errno:
    """The NBD error value to report for ``exc`` raised while serving a request.

    =========================================  =========================================
    exception                                  NBD error
    =========================================  =========================================
    ReadOnlyError                              EPERM
    InvalidRequestError                        EINVAL
    UnsupportedFeatureError                    EINVAL (the request cannot be honoured)
    StoreError / OSError with an errno         by errno: EPERM/EACCES/EROFS -> EPERM,
                                               ENOSPC/EDQUOT/EFBIG -> ENOSPC, ENOMEM ->
                                               ENOMEM, EINVAL -> EINVAL, ESHUTDOWN ->
                                               ESHUTDOWN, anything else -> EIO
    CorruptImageError                          EIO: the data cannot be produced, which
                                               is a medium error to the client (QEMU's
                                               generic mapping would say EINVAL, which
                                               reads as "your request was wrong")
    MemoryError                                ENOMEM
    ProtocolError                              its ``errno_hint``
    anything else                              EIO
    =========================================  =========================================
    """
    for kind, code in _ERRNO_BY_TYPE:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, ProtocolError):
        return exc.errno_hint
    host: int | None = None
    if isinstance(exc, StoreError):
        host = exc.errno
        if host is None and isinstance(exc.__cause__, OSError):
            host = exc.__cause__.errno
    elif isinstance(exc, OSError):
        host = exc.errno
    if host is not None:
        return _ERRNO_BY_HOST.get(host, Errno.EIO)
    return Errno.EIO
