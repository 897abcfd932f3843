"""Fuzzing the NBD core: whatever the client sends, in whatever pieces, the connection
yields events or raises RemoteProtocolError, never anything else; and a glue that
answers every request correctly never gets a LocalProtocolError."""

from __future__ import annotations

import os
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_wire import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    client_flags,
    info_data,
    meta_data,
    option,
    request,
    splits,
)

from qedkit.nbd import (
    NEED_DATA,
    PAUSED,
    BlockStatus,
    Buffer,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    Event,
    Export,
    HoleChunk,
    InvalidRequest,
    Read,
    ReadChunk,
    RemoteProtocolError,
    Request,
    ServerConnection,
    State,
    TlsMode,
)

EXPORTS = [
    Export(
        "disk",
        65536,
        description="fuzz",
        can_trim=True,
        can_write_zeroes=True,
        can_fast_zero=True,
        can_cache=True,
        max_block_size=32768,
    ),
    Export("ro", 4096, read_only=True, min_block_size=512),
]
# QEDKIT_HYPOTHESIS_PROFILE=thorough runs twenty times more examples, like tests/property.
SCALE = 20 if os.environ.get("QEDKIT_HYPOTHESIS_PROFILE") == "thorough" else 1
FUZZ = settings(
    max_examples=250 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SESSION = client_flags() + b"".join(
    [
        option(OPT_LIST),
        option(42, b"unknown"),
        option(OPT_STRUCTURED_REPLY),
        option(OPT_LIST_META_CONTEXT, meta_data("disk", "base:", "qemu:")),
        option(OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation", "qemu:allocation-depth")),
        option(OPT_INFO, info_data("ro", INFO_NAME, INFO_DESCRIPTION)),
        option(OPT_GO, info_data("disk", INFO_BLOCK_SIZE)),
        request(CMD_READ, cookie=1, offset=0, length=4096, flags=FLAG_DF),
        request(CMD_WRITE, cookie=2, offset=512, payload=b"w" * 700, flags=FLAG_FUA),
        request(CMD_TRIM, cookie=3, offset=0, length=8192),
        request(CMD_WRITE_ZEROES, cookie=4, offset=0, length=4096, flags=FLAG_NO_HOLE),
        request(CMD_WRITE_ZEROES, cookie=5, offset=0, length=65536, flags=FLAG_FAST_ZERO),
        request(CMD_BLOCK_STATUS, cookie=6, offset=0, length=65536, flags=FLAG_REQ_ONE),
        request(CMD_CACHE, cookie=7, offset=4096, length=4096),
        request(CMD_READ, cookie=8, offset=65000, length=1000),  # refused: past the end
        request(CMD_WRITE, cookie=9, offset=0, payload=b"z" * 40000),  # refused: too long
        request(CMD_FLUSH, cookie=10),
        request(CMD_DISC, cookie=11),
    ]
)


def answer(conn: ServerConnection, event: Event) -> list[Buffer]:
    """What a correct glue does with a request event; must never raise."""
    if not isinstance(event, Request) or isinstance(event, Disconnect):
        return []
    if isinstance(event, InvalidRequest):
        return conn.reply_error(event.cookie, event.errno, event.message)
    if isinstance(event, Read):
        half = event.length // 2
        chunks: list[ReadChunk] = []
        if event.length - half:
            chunks.append(HoleChunk(event.offset + half, event.length - half))
        if half:
            chunks.append(DataChunk(event.offset, b"r" * half))
        return conn.reply_read(event.cookie, chunks)
    if isinstance(event, BlockStatus):
        extents = [(max(event.length, 1), 0), (4096, 1)]
        return conn.reply_block_status(event.cookie, dict.fromkeys(event.context_ids, extents))
    return conn.reply_ok(event.cookie)


def run(conn: ServerConnection, chunks: Sequence[bytes]) -> tuple[list[Event], bytes, str]:
    """Feed the chunks, answer every request; (events, all bytes sent, outcome)."""
    events: list[Event] = []
    sent = bytearray(conn.data_to_send())

    def pump() -> None:
        while True:
            event = conn.next_event()
            sent.extend(conn.data_to_send())
            if event is NEED_DATA or event is PAUSED:
                return
            events.append(event)
            for buffer in answer(conn, event):
                sent.extend(buffer)
            if isinstance(event, ConnectionClosed):
                return

    try:
        for chunk in [*(c for c in chunks if c), b""]:  # b"" only at the end: EOF
            if conn.state is State.TLS_PENDING:
                conn.tls_established()
            if conn.state is State.CLOSED:
                break
            conn.receive_data(chunk)
            pump()
    except RemoteProtocolError as exc:
        assert conn.state is State.ERROR
        if exc.cookie is not None:
            conn.reply_error(exc.cookie, exc.errno_hint, str(exc))
        return events, bytes(sent), f"error: {type(exc).__name__}"
    return events, bytes(sent), "ok"


def fresh(tls: TlsMode = TlsMode.DISABLED) -> ServerConnection:
    return ServerConnection(EXPORTS, tls=tls)


START = {
    "fresh": b"",
    "negotiating": client_flags(),
    "transmission": client_flags() + option(OPT_GO, info_data("disk")),
    "structured": SESSION[
        : SESSION.index(request(CMD_READ, cookie=1, offset=0, length=4096, flags=FLAG_DF))
    ],
}

cuts = st.lists(st.integers(min_value=0, max_value=2000), max_size=12)


@FUZZ
@given(
    start=st.sampled_from(sorted(START)),
    tls=st.sampled_from(list(TlsMode)),
    junk=st.binary(max_size=600),
    points=cuts,
)
def test_random_bytes_give_events_or_remote_protocol_errors(
    start: str, tls: TlsMode, junk: bytes, points: list[int]
) -> None:
    conn = fresh(tls)
    prefix = START[start] if tls is not TlsMode.REQUIRED else START[start][:4]
    data = prefix + junk
    run(conn, splits(data, [p for p in points if p <= len(data)]))


@FUZZ
@given(
    tls=st.sampled_from(list(TlsMode)),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "insert", "delete"]),
            st.integers(min_value=0, max_value=len(SESSION)),
            st.integers(min_value=0, max_value=255),
            st.integers(min_value=1, max_value=40),
        ),
        min_size=1,
        max_size=6,
    ),
    truncate=st.one_of(st.none(), st.integers(min_value=0, max_value=len(SESSION))),
    points=cuts,
)
def test_mutated_sessions_give_events_or_remote_protocol_errors(
    tls: TlsMode,
    edits: list[tuple[str, int, int, int]],
    truncate: int | None,
    points: list[int],
) -> None:
    data = bytearray(SESSION)
    for kind, position, value, count in edits:
        position = min(position, len(data))
        if kind == "flip" and position < len(data):
            data[position] ^= 1 << (value % 8)
        elif kind == "set" and position < len(data):
            data[position] = value
        elif kind == "insert":
            data[position:position] = bytes([value]) * count
        elif kind == "delete":
            del data[position : position + count]
    if truncate is not None:
        del data[truncate:]
    raw = bytes(data)
    run(fresh(tls), splits(raw, [p for p in points if p <= len(raw)]))


@FUZZ
@given(points=st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=30))
def test_a_valid_session_is_the_same_however_it_is_split(points: list[int]) -> None:
    whole_events, whole_sent, whole_outcome = run(fresh(), [SESSION])
    events, sent, outcome = run(fresh(), splits(SESSION, points))
    assert (events, sent, outcome) == (whole_events, whole_sent, whole_outcome)


def test_the_fuzz_session_itself_is_valid() -> None:
    events, _, outcome = run(fresh(), [SESSION])
    assert outcome == "ok"
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "HandshakeComplete",
        "Read",
        "Write",
        "Trim",
        "WriteZeroes",
        "WriteZeroes",
        "BlockStatus",
        "Cache",
        "InvalidRequest",
        "InvalidRequest",
        "Flush",
        "Disconnect",
        "ConnectionClosed",
    ]


def test_starttls_sessions_survive_fuzzing_of_what_follows() -> None:
    # With TLS accepted, the driver must call tls_established() before feeding more.
    prefix = client_flags() + option(OPT_STARTTLS)
    conn = fresh(TlsMode.OPTIONAL)
    events, _, outcome = run(conn, [prefix, SESSION[4:]])
    assert outcome == "ok"
    assert type(events[0]).__name__ == "StartTLS"
    assert isinstance(events[-1], ConnectionClosed)
