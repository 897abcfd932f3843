"""The client's side of the NBD wire, packed by hand from proto.md, for the NBD tests.

Magic numbers and codes are spelled out here rather than imported from the module
under test, so that a wrong constant there cannot hide behind a shared definition.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Sequence

from qedkit.nbd import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    Export,
    HandshakeComplete,
    ServerConnection,
    TlsMode,
)

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Options (proto.md: Option types).
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies (proto.md: Option reply types).
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7
REP_ERR_TOO_BIG = 2**31 + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags (proto.md: Request types, Command flags).
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
FLAG_FUA = 1
FLAG_NO_HOLE = 2
FLAG_DF = 4
FLAG_REQ_ONE = 8
FLAG_FAST_ZERO = 16

# Client flags.
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

# Structured replies.
REPLY_FLAG_DONE = 1
TYPE_NONE = 0
TYPE_OFFSET_DATA = 1
TYPE_OFFSET_HOLE = 2
TYPE_BLOCK_STATUS = 5
TYPE_ERROR = 2**15 + 1
TYPE_ERROR_OFFSET = 2**15 + 2

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

MiB = 1 << 20


def client_flags(flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def info_data(name: str, *requests: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(requests))
        + struct.pack(f">{len(requests)}H", *requests)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        q = query.encode()
        out += struct.pack(">I", len(q)) + q
    return out


def request(
    cmd: int,
    *,
    cookie: int = 1,
    offset: int = 0,
    length: int | None = None,
    flags: int = 0,
    payload: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    if length is None:
        length = len(payload)
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split queued bytes into (option, reply type, data) option replies."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic at {pos}: {magic:#x}"
        pos += 20
        out.append((opt, kind, data[pos : pos + length]))
        assert len(out[-1][2]) == length, "truncated option reply"
        pos += length
    return out


def drain(conn: ServerConnection) -> list[Event]:
    """Events until the connection needs data, pauses or reports the close."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed(conn: ServerConnection, *chunks: bytes) -> list[Event]:
    """Feed each chunk and drain after each; all events in order. Empty chunks are
    skipped (``receive_data(b"")`` means end of file)."""
    events: list[Event] = []
    for chunk in chunks:
        if chunk:
            conn.receive_data(chunk)
        events += drain(conn)
    return events


def fast_feed(
    conn: ServerConnection, *chunks: bytes, limit: int = 64, read_bytes: int = MiB
) -> list[Event]:
    """What the server does with each chunk: the fast lane first, the rest (if any)
    through receive_data and next_event."""
    events: list[Event] = []
    for chunk in chunks:
        taken, used = conn.receive_requests(chunk, limit, read_bytes)
        events += taken
        if used < len(chunk):
            conn.receive_data(chunk[used:])
        events += drain(conn)
    return events


def splits(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def connect(
    exports: Sequence[Export],
    *,
    tls: TlsMode = TlsMode.DISABLED,
    flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES,
    payload_buffer: Callable[[int], memoryview] | None = None,
) -> ServerConnection:
    """A connection past the greeting and the client flags."""
    conn = ServerConnection(exports, tls=tls, payload_buffer=payload_buffer)
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert feed(conn, client_flags(flags)) == []
    return conn


def transmission(
    exports: Sequence[Export] | Export,
    *,
    structured: bool = False,
    contexts: Sequence[str] = (),
    name: str | None = None,
    payload_buffer: Callable[[int], memoryview] | None = None,
) -> ServerConnection:
    """A connection in the transmission phase (via NBD_OPT_GO)."""
    if isinstance(exports, Export):
        exports = [exports]
    conn = connect(exports, payload_buffer=payload_buffer)
    name = exports[0].name if name is None else name
    data = b""
    if structured:
        data += option(OPT_STRUCTURED_REPLY)
    if contexts:
        data += option(OPT_SET_META_CONTEXT, meta_data(name, *contexts))
    data += option(OPT_GO, info_data(name))
    events = feed(conn, data)
    assert len(events) == 1 and isinstance(events[0], HandshakeComplete), events
    conn.data_to_send()
    return conn
