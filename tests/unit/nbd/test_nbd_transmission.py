"""NBD transmission phase: requests parsed into events, validated, at every split."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from nbd_wire import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    ESHUTDOWN,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    MiB,
    drain,
    fast_feed,
    feed,
    request,
    splits,
    transmission,
)

from qedkit.nbd import (
    BlockStatus,
    Cache,
    ConnectionClosed,
    Disconnect,
    Event,
    Export,
    Flush,
    InvalidRequest,
    LocalProtocolError,
    MetaContext,
    Read,
    RemoteProtocolError,
    ServerConnection,
    State,
    Trim,
    Write,
    WriteZeroes,
)

SIZE = 4 * MiB
FULL = Export(
    "full",
    SIZE,
    can_trim=True,
    can_write_zeroes=True,
    can_fast_zero=True,
    can_cache=True,
    max_block_size=MiB,
)
BOTH = ("base:allocation", "qemu:allocation-depth")
CONTEXTS = (MetaContext.BASE_ALLOCATION, MetaContext.QEMU_ALLOCATION_DEPTH)
PAYLOAD = bytes(range(256)) * 3 + b"tail"


def full() -> ServerConnection:
    return transmission(FULL, structured=True, contexts=BOTH)


FLUSH_NEXT = request(CMD_FLUSH, cookie=0xFEED)
FLUSH_EVENT = Flush(cookie=0xFEED, offset=0, length=0, fua=False)

# (request bytes, the event it must produce) for every command and flag.
COMMANDS: list[tuple[str, bytes, Event]] = [
    (
        "read",
        request(CMD_READ, cookie=1, offset=4096, length=512),
        Read(cookie=1, offset=4096, length=512, fua=False, df=False),
    ),
    (
        "read-df-fua",
        request(CMD_READ, cookie=2**64 - 1, offset=0, length=65536, flags=FLAG_DF | FLAG_FUA),
        Read(cookie=2**64 - 1, offset=0, length=65536, fua=True, df=True),
    ),
    (
        "write",
        request(CMD_WRITE, cookie=3, offset=SIZE - len(PAYLOAD), payload=PAYLOAD),
        Write(
            cookie=3,
            offset=SIZE - len(PAYLOAD),
            length=len(PAYLOAD),
            fua=False,
            data=memoryview(PAYLOAD),
        ),
    ),
    (
        "write-fua",
        request(CMD_WRITE, cookie=4, offset=1, flags=FLAG_FUA, payload=b"x"),
        Write(cookie=4, offset=1, length=1, fua=True, data=memoryview(b"x")),
    ),
    (
        "write-empty",
        request(CMD_WRITE, cookie=5, offset=0, payload=b""),
        Write(cookie=5, offset=0, length=0, fua=False, data=memoryview(b"")),
    ),
    ("flush", request(CMD_FLUSH, cookie=6), Flush(cookie=6, offset=0, length=0, fua=False)),
    (
        "flush-fua",
        request(CMD_FLUSH, cookie=7, flags=FLAG_FUA),
        Flush(cookie=7, offset=0, length=0, fua=True),
    ),
    (
        "trim",
        request(CMD_TRIM, cookie=8, offset=0, length=SIZE, flags=FLAG_FUA),
        Trim(cookie=8, offset=0, length=SIZE, fua=True),
    ),
    (
        "write-zeroes",
        request(CMD_WRITE_ZEROES, cookie=9, offset=512, length=1024),
        WriteZeroes(cookie=9, offset=512, length=1024, fua=False, no_hole=False, fast_zero=False),
    ),
    (
        "write-zeroes-flags",
        request(
            CMD_WRITE_ZEROES,
            cookie=10,
            offset=0,
            length=SIZE,
            flags=FLAG_NO_HOLE | FLAG_FAST_ZERO | FLAG_FUA,
        ),
        WriteZeroes(cookie=10, offset=0, length=SIZE, fua=True, no_hole=True, fast_zero=True),
    ),
    (
        "cache",
        request(CMD_CACHE, cookie=11, offset=MiB, length=MiB),
        Cache(cookie=11, offset=MiB, length=MiB, fua=False),
    ),
    (
        "block-status",
        request(CMD_BLOCK_STATUS, cookie=12, offset=0, length=SIZE),
        BlockStatus(
            cookie=12, offset=0, length=SIZE, fua=False, req_one=False, context_ids=CONTEXTS
        ),
    ),
    (
        "block-status-req-one",
        request(CMD_BLOCK_STATUS, cookie=13, offset=100, length=10, flags=FLAG_REQ_ONE),
        BlockStatus(
            cookie=13, offset=100, length=10, fua=False, req_one=True, context_ids=CONTEXTS
        ),
    ),
]
IDS = [name for name, _, _ in COMMANDS]


@pytest.mark.parametrize(("name", "message", "expected"), COMMANDS, ids=IDS)
def test_every_command_at_every_split_and_coalesced_with_the_next(
    name: str, message: bytes, expected: Event
) -> None:
    for cut in range(len(message) + 1):
        conn = full()
        events = feed(conn, message[:cut], message[cut:] + FLUSH_NEXT)
        assert events == [expected, FLUSH_EVENT], f"cut at {cut}"
        assert conn.inflight == 2


@pytest.mark.parametrize(("name", "message", "expected"), COMMANDS, ids=IDS)
def test_every_command_byte_by_byte(name: str, message: bytes, expected: Event) -> None:
    conn = full()
    assert feed(conn, *(bytes([b]) for b in message)) == [expected]


def test_all_commands_coalesced_in_one_buffer_then_disconnect() -> None:
    conn = full()
    stream = b"".join(message for _, message, _ in COMMANDS) + request(CMD_DISC, cookie=99)
    events = feed(conn, stream)
    assert events == [e for _, _, e in COMMANDS] + [
        Disconnect(cookie=99, offset=0, length=0, fua=False)
    ]
    assert conn.state is State.DONE
    assert conn.inflight == len(COMMANDS)
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]


def test_large_write_payload_in_random_pieces() -> None:
    rng = random.Random(7)
    data = rng.randbytes(MiB)
    message = request(CMD_WRITE, cookie=1, offset=0, payload=data) + FLUSH_NEXT
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(message)), 40))
        conn = full()
        events = feed(conn, *splits(message, cuts))
        assert len(events) == 2
        write = events[0]
        assert isinstance(write, Write)
        assert write.data == data and write.data.readonly
        assert events[1] == FLUSH_EVENT


def test_write_payload_fed_from_a_reused_buffer_is_copied() -> None:
    conn = full()
    conn.receive_data(request(CMD_WRITE, cookie=1, offset=0, length=8))
    assert drain(conn) == []
    scratch = bytearray(b"abcd")
    conn.receive_data(scratch)
    scratch[:] = b"efgh"
    conn.receive_data(scratch)
    (event,) = drain(conn)
    assert isinstance(event, Write) and bytes(event.data) == b"abcdefgh"


def test_connection_reports_what_was_negotiated() -> None:
    conn = full()
    assert conn.exports == (FULL,)
    assert conn.export is FULL
    assert conn.structured_replies and not conn.tls_active
    assert conn.transmission_flags == FULL.transmission_flags(structured_replies=True)
    assert conn.meta_contexts == CONTEXTS
    assert not conn.shutting_down
    conn.start_shutdown()
    assert conn.shutting_down


def test_disconnect_keeps_its_flags_and_allows_no_more_data() -> None:
    conn = full()
    events = feed(conn, request(CMD_DISC, cookie=5, flags=FLAG_FUA, offset=1, length=2))
    assert events == [Disconnect(cookie=5, offset=1, length=2, fua=True)]
    assert conn.inflight == 0
    conn.receive_data(b"\x25")
    with pytest.raises(RemoteProtocolError, match="after ending"):
        conn.next_event()


# ---- refused requests ----------------------------------------------------------------------


FOLLOWER = request(CMD_READ, cookie=0xF00, offset=0, length=0)


def refused(conn: ServerConnection, message: bytes) -> InvalidRequest:
    """Feed a request that must be refused, followed by an empty READ that must still
    parse (so a skipped payload is proven to be skipped exactly)."""
    events = feed(conn, message + FOLLOWER)
    assert len(events) == 2, events
    assert events[1] == Read(cookie=0xF00, offset=0, length=0, fua=False, df=False)
    event = events[0]
    assert isinstance(event, InvalidRequest), event
    return event


@pytest.mark.parametrize(
    ("message", "errno"),
    [
        (request(CMD_READ, offset=SIZE - 1, length=2), EINVAL),
        (request(CMD_READ, offset=SIZE + 1, length=0), EINVAL),
        (request(CMD_READ, offset=2**64 - 1, length=1), EINVAL),
        (request(CMD_WRITE, offset=SIZE - 1, payload=b"ab"), ENOSPC),
        (request(CMD_WRITE_ZEROES, offset=SIZE, length=1), ENOSPC),
        (request(CMD_TRIM, offset=0, length=SIZE + 1), EINVAL),
        (request(CMD_CACHE, offset=SIZE, length=1), EINVAL),
        (request(CMD_BLOCK_STATUS, offset=SIZE - 10, length=11), EINVAL),
    ],
    ids=["read", "read-empty", "read-wrap", "write", "write-zeroes", "trim", "cache", "status"],
)
def test_ranges_past_the_end_are_refused(message: bytes, errno: int) -> None:
    event = refused(full(), message)
    assert event.errno == errno
    assert "past the end" in event.message


@pytest.mark.parametrize(
    ("message", "command"),
    [
        (request(CMD_WRITE, offset=0, payload=b"data"), CMD_WRITE),
        (request(CMD_TRIM, offset=0, length=512), CMD_TRIM),
        (request(CMD_WRITE_ZEROES, offset=0, length=512), CMD_WRITE_ZEROES),
    ],
    ids=["write", "trim", "write-zeroes"],
)
def test_writing_to_a_read_only_export_is_eperm(message: bytes, command: int) -> None:
    conn = transmission(Export("ro", SIZE, read_only=True, can_trim=True, can_write_zeroes=True))
    event = refused(conn, message)
    assert (event.command, event.errno) == (command, EPERM)


def test_read_only_export_still_reads() -> None:
    conn = transmission(Export("ro", SIZE, read_only=True))
    assert feed(conn, request(CMD_READ, length=10)) == [
        Read(cookie=1, offset=0, length=10, fua=False, df=False)
    ]


@pytest.mark.parametrize(
    "message",
    [
        request(CMD_READ, length=MiB + 1),
        request(CMD_CACHE, length=MiB + 1),
        request(CMD_WRITE_ZEROES, length=MiB + 1),
        request(CMD_WRITE, payload=bytes(MiB + 1)),
    ],
    ids=["read", "cache", "write-zeroes", "write"],
)
def test_lengths_over_the_maximum_block_size_are_einval(message: bytes) -> None:
    event = refused(full(), message)
    assert event.errno == EINVAL
    assert "maximum block size" in event.message


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (request(CMD_TRIM, length=2 * MiB), Trim),
        (request(CMD_BLOCK_STATUS, length=2 * MiB), BlockStatus),
        (request(CMD_WRITE_ZEROES, length=2 * MiB, flags=FLAG_FAST_ZERO), WriteZeroes),
    ],
    ids=["trim", "block-status", "fast-zero"],
)
def test_commands_without_a_maximum_block_size(message: bytes, kind: type) -> None:
    (event,) = feed(full(), message)
    assert isinstance(event, kind)


def test_oversized_write_payload_is_skipped_when_fed_in_pieces() -> None:
    conn = full()
    message = request(CMD_WRITE, cookie=3, payload=bytes(2 * MiB)) + FLUSH_NEXT
    events = feed(conn, *splits(message, range(10, len(message), 4096)))
    assert [type(e) for e in events] == [InvalidRequest, Flush]


def test_write_over_the_hard_limit_drops_the_connection_with_a_hint() -> None:
    conn = full()
    conn.receive_data(request(CMD_WRITE, cookie=0xABC, length=32 * MiB + 1))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.cookie == 0xABC
    assert info.value.errno_hint == EINVAL
    assert conn.state is State.ERROR
    # The offending request may still be answered before closing.
    (reply,) = conn.reply_error(0xABC, info.value.errno_hint, str(info.value))
    assert reply[:4] == b"\x66\x8e\x33\xef"
    assert conn.inflight == 0


def test_write_at_the_hard_limit_is_consumed() -> None:
    conn = transmission(Export("big", 64 * MiB))
    data = bytes(32 * MiB)
    events = feed(conn, request(CMD_WRITE, length=32 * MiB), data[: 16 * MiB], data[16 * MiB :])
    (event,) = events
    assert isinstance(event, Write) and event.length == 32 * MiB


@pytest.mark.parametrize("command", [8, 9, 0x100, 0xFFFF])
def test_unknown_commands_are_einval(command: int) -> None:
    event = refused(full(), request(command, cookie=42, offset=0, length=512))
    assert (event.cookie, event.command, event.errno) == (42, command, EINVAL)


@pytest.mark.parametrize(
    "message",
    [
        request(CMD_READ, length=1, flags=FLAG_NO_HOLE),
        request(CMD_READ, length=1, flags=FLAG_REQ_ONE),
        request(CMD_WRITE, payload=b"x", flags=FLAG_DF),
        request(CMD_WRITE, payload=b"x", flags=0x20),
        request(CMD_TRIM, length=1, flags=FLAG_NO_HOLE),
        request(CMD_FLUSH, flags=FLAG_REQ_ONE),
        request(CMD_CACHE, length=1, flags=FLAG_DF),
        request(CMD_WRITE_ZEROES, length=1, flags=FLAG_DF),
        request(CMD_BLOCK_STATUS, length=1, flags=FLAG_NO_HOLE),
        request(CMD_READ, length=1, flags=0x8000),
    ],
    ids=[
        "read-no-hole",
        "read-req-one",
        "write-df",
        "write-payload-len",
        "trim-no-hole",
        "flush-req-one",
        "cache-df",
        "write-zeroes-df",
        "block-status-no-hole",
        "read-unknown-bit",
    ],
)
def test_flags_not_documented_for_the_command_are_einval(message: bytes) -> None:
    event = refused(full(), message)
    assert event.errno == EINVAL and "not valid" in event.message


@pytest.mark.parametrize(
    ("export", "structured", "message"),
    [
        (Export("x", SIZE, can_fua=False), False, request(CMD_WRITE, payload=b"x", flags=FLAG_FUA)),
        (Export("x", SIZE), False, request(CMD_READ, length=1, flags=FLAG_DF)),
        (
            Export("x", SIZE, can_write_zeroes=True),
            False,
            request(CMD_WRITE_ZEROES, length=1, flags=FLAG_FAST_ZERO),
        ),
        (Export("x", SIZE, can_flush=False), False, request(CMD_FLUSH)),
        (Export("x", SIZE), False, request(CMD_TRIM, length=1)),
        (Export("x", SIZE), False, request(CMD_WRITE_ZEROES, length=1)),
        (Export("x", SIZE), False, request(CMD_CACHE, length=1)),
        (Export("x", SIZE), True, request(CMD_BLOCK_STATUS, length=1)),
    ],
    ids=["fua", "df", "fast-zero", "flush", "trim", "write-zeroes", "cache", "block-status"],
)
def test_commands_and_flags_that_were_not_negotiated_are_einval(
    export: Export, structured: bool, message: bytes
) -> None:
    event = refused(transmission(export, structured=structured), message)
    assert event.errno == EINVAL
    assert "negotiated" in event.message


def test_flush_needs_zero_offset_and_length() -> None:
    event = refused(full(), request(CMD_FLUSH, offset=0, length=1))
    assert event.errno == EINVAL


def test_requests_must_be_aligned_to_the_minimum_block_size() -> None:
    export = Export("aligned", 8 * 512 + 100, min_block_size=512)
    conn = transmission(export)
    assert refused(conn, request(CMD_READ, offset=1, length=512)).errno == EINVAL
    assert refused(conn, request(CMD_READ, offset=512, length=100)).errno == EINVAL
    assert refused(conn, request(CMD_WRITE, offset=512, payload=bytes(100))).errno == EINVAL
    # The unaligned tail of the export can still be reached.
    (event,) = feed(conn, request(CMD_READ, offset=8 * 512, length=100))
    assert isinstance(event, Read)


def test_shutdown_refuses_new_requests_with_eshutdown_but_honours_disconnect() -> None:
    conn = full()
    feed(conn, request(CMD_READ, cookie=1, length=1))
    conn.start_shutdown()
    events = feed(
        conn,
        request(CMD_READ, cookie=2, length=1),
        request(CMD_WRITE, cookie=3, payload=b"abc"),
        request(CMD_DISC, cookie=4),
    )
    assert [type(e) for e in events] == [InvalidRequest, InvalidRequest, Disconnect]
    assert [getattr(e, "errno", None) for e in events] == [ESHUTDOWN, ESHUTDOWN, None]
    assert conn.inflight == 3  # the READ delivered before the shutdown is unaffected


# ---- framing errors -------------------------------------------------------------------------


def test_bad_request_magic_drops_the_connection() -> None:
    conn = full()
    conn.receive_data(request(CMD_READ, length=1, magic=0x25609514))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    "partial",
    [
        request(CMD_READ, length=1)[:27],
        request(CMD_WRITE, payload=b"abcdef")[:30],
        request(CMD_WRITE, offset=SIZE, payload=b"abcdef")[:30],  # refused, skipping
    ],
    ids=["header", "payload", "skipped-payload"],
)
def test_eof_inside_a_request_is_a_violation(partial: bytes) -> None:
    conn = full()
    feed(conn, partial)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of file"):
        conn.next_event()


def test_eof_between_requests_is_a_clean_close() -> None:
    conn = full()
    feed(conn, request(CMD_READ, length=1))
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    assert conn.inflight == 1  # still answerable
    conn.reply_error(1, EINVAL)
    assert conn.inflight == 0


# ---- the fast lane (receive_requests) -----------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        request(CMD_READ, cookie=7, offset=4096, length=4096),
        request(CMD_READ, cookie=8, offset=0, length=0),
        request(CMD_WRITE, cookie=9, offset=512, payload=PAYLOAD),
        request(CMD_WRITE, cookie=10, offset=SIZE - 4, payload=b"last"),
        request(CMD_WRITE, cookie=11, offset=0, payload=b""),
    ],
    ids=["read", "read-empty", "write", "write-at-the-end", "write-empty"],
)
def test_fast_lane_gives_the_event_and_reply_of_the_general_path(message: bytes) -> None:
    fast, slow = full(), full()
    events, used = fast.receive_requests(message, 64, MiB)
    assert used == len(message)
    assert events == feed(slow, message)
    assert fast.inflight == slow.inflight == 1
    (event,) = events
    if isinstance(event, Read):
        replies = [c.reply_read(event.cookie, bytes(event.length)) for c in (fast, slow)]
    else:
        assert isinstance(event.data, memoryview)
        replies = [c.reply_ok(event.cookie) for c in (fast, slow)]
    assert b"".join(replies[0]) == b"".join(replies[1])
    assert fast.inflight == slow.inflight == 0


def test_fast_lane_takes_a_run_of_requests_and_stops_at_anything_else() -> None:
    reads = [request(CMD_READ, cookie=c, offset=512 * c, length=512) for c in range(1, 4)]
    write = request(CMD_WRITE, cookie=4, offset=0, payload=PAYLOAD)
    message = b"".join(reads) + write + FLUSH_NEXT + reads[0]
    conn = full()
    events, used = conn.receive_requests(message, 64, MiB)
    assert used == len(message) - len(FLUSH_NEXT) - len(reads[0])
    assert [e.cookie for e in events] == [1, 2, 3, 4]
    assert conn.inflight == 4
    conn.receive_data(message[used:])
    assert drain(conn) == [FLUSH_EVENT, *feed(full(), reads[0])]


def test_fast_lane_stops_at_its_limit() -> None:
    message = b"".join(request(CMD_READ, cookie=c, length=512) for c in range(1, 6))
    conn = full()
    events, used = conn.receive_requests(message, 2, MiB)
    assert [e.cookie for e in events] == [1, 2]
    assert used == 2 * len(message) // 5


def test_fast_lane_stops_before_reads_over_its_byte_budget() -> None:
    big = request(CMD_READ, cookie=1, length=MiB)
    small = request(CMD_READ, cookie=2, length=4096)
    conn = full()
    events, used = conn.receive_requests(big + small, 64, 4096)  # the first goes anyway
    assert ([e.cookie for e in events], used) == ([1], len(big))
    conn = full()
    events, used = conn.receive_requests(small + small + big, 64, 8192)
    assert ([e.cookie for e in events], used) == ([2, 2], 2 * len(small))


def test_fast_lane_carries_a_payload_over_chunks() -> None:
    write = request(CMD_WRITE, cookie=5, offset=1024, payload=PAYLOAD)
    read = request(CMD_READ, cookie=6, length=512)
    message = write + read
    cuts = [40, 300, 700]  # the header whole, then the payload in three pieces
    conn = full()
    seen: list[Event] = []
    for chunk in splits(message, cuts):
        events, used = conn.receive_requests(chunk, 64, MiB)
        assert used == len(chunk)  # taken whole: nothing goes to the general path
        seen += events
    assert seen == feed(full(), message)


@pytest.mark.parametrize(
    "chunks",
    [
        [request(CMD_READ, flags=FLAG_FUA, length=512)],  # flags: the general path
        [request(CMD_READ, length=512)[:10], request(CMD_READ, length=512)[10:]],
        [request(CMD_WRITE, offset=SIZE - 1, payload=b"ab")],  # refused: past the end
        [request(CMD_READ, length=MiB + 1)],  # refused: over the block size
        [request(CMD_FLUSH)],
        [request(CMD_READ, length=512, magic=0x12345678)],  # a violation
    ],
    ids=["flags", "split-header", "past-the-end", "too-long", "flush", "bad-magic"],
)
def test_fast_lane_leaves_everything_else_to_the_general_path(chunks: list[bytes]) -> None:
    fast = full()
    taken, used = fast.receive_requests(chunks[0], 64, MiB)
    assert (taken, used) == ([], 0)
    outcomes: list[object] = []
    for conn in (fast, full()):
        try:
            outcomes.append(fast_feed(conn, *chunks) if conn is fast else feed(conn, *chunks))
        except RemoteProtocolError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_fast_lane_is_closed_on_a_read_only_export_for_writes_and_while_shutting_down() -> None:
    conn = transmission(Export("ro", SIZE, read_only=True))
    assert conn.receive_requests(request(CMD_WRITE, payload=b"data"), 64, MiB) == ([], 0)
    message = request(CMD_READ, length=4)
    events, used = conn.receive_requests(message, 64, MiB)
    assert (len(events), used) == (1, len(message))
    conn = full()
    conn.start_shutdown()
    assert conn.receive_requests(request(CMD_READ, length=4), 64, MiB) == ([], 0)


LANE_EXPORTS = [
    FULL,
    Export("ro", SIZE, read_only=True),
    Export("aligned", SIZE, min_block_size=512),
    Export("small-blocks", SIZE, max_block_size=4096),
    Export("odd-size", SIZE - 3),
]


@pytest.mark.parametrize("shutting_down", [False, True], ids=["serving", "shutting-down"])
@pytest.mark.parametrize("export", LANE_EXPORTS, ids=lambda e: e.name)
def test_fast_lane_admits_exactly_the_flagless_requests_the_validator_accepts(
    export: Export, shutting_down: bool
) -> None:
    """The lane is a precheck derived from the one validator: what it takes, the
    validator accepts; what the validator accepts, it takes (minimum block size 1).
    The validator's verdict is read from the same request with NBD_CMD_FLAG_FUA, which
    no precheck takes and which, being negotiated, changes nothing else."""
    assert export.can_fua
    rng = random.Random(export.name)
    size = export.size
    for _ in range(300):
        command = rng.choice([CMD_READ, CMD_WRITE])
        length = rng.choice([0, 1, 512, 4096, 4097, 8192, MiB, MiB + 1])
        offset = rng.choice([0, 1, 512, size - length, size - length + 1, size])
        if offset < 0:
            continue
        payload = bytes(length) if command == CMD_WRITE else b""
        messages = [
            request(command, cookie=1, offset=offset, length=length, flags=flags, payload=payload)
            for flags in (0, FLAG_FUA)
        ]
        fast, judge = transmission(export), transmission(export)
        if shutting_down:
            fast.start_shutdown()
            judge.start_shutdown()
        taken, used = fast.receive_requests(messages[0], 64, MiB)
        (verdict,) = feed(judge, messages[1])
        accepted = not isinstance(verdict, InvalidRequest)
        if taken:
            assert accepted and used == len(messages[0]), (export, offset, length)
            assert (taken[0].cookie, taken[0].offset, taken[0].length) == (1, offset, length)
        elif export.min_block_size == 1:
            assert not accepted and used == 0, (export, offset, length)


# Requests for the equivalence property: mostly the fast lane's own, with the ones
# that must stop it mixed in.
LANE_REQUESTS = [
    request(CMD_READ, cookie=1, offset=0, length=4096),
    request(CMD_READ, cookie=2, offset=SIZE - 1, length=1),
    request(CMD_WRITE, cookie=3, offset=4096, payload=PAYLOAD),
    request(CMD_WRITE, cookie=4, offset=8, payload=b"x"),
    request(CMD_WRITE, cookie=5, offset=0, payload=bytes(5000)),
    request(CMD_WRITE, cookie=6, offset=0, payload=b""),
    request(CMD_WRITE, cookie=7, offset=512, flags=FLAG_FUA, payload=PAYLOAD),
    request(CMD_WRITE, cookie=8, offset=SIZE - 2, payload=b"abc"),  # refused, payload skipped
    request(CMD_READ, cookie=9, offset=0, length=MiB + 1),  # refused
    FLUSH_NEXT,
    request(CMD_TRIM, cookie=10, offset=0, length=4096),
]


@pytest.mark.parametrize("seed", range(40))
def test_fast_lane_equals_the_general_path_at_every_split(seed: int) -> None:
    rng = random.Random(seed)
    message = b"".join(rng.choice(LANE_REQUESTS) for _ in range(rng.randrange(1, 25)))
    if rng.random() < 0.2:  # a violation somewhere in the stream
        bad = request(CMD_READ, length=1, magic=0xBAD)
        message += bad + rng.choice(LANE_REQUESTS)
    cuts = sorted(rng.sample(range(1, len(message)), min(len(message) - 1, rng.randrange(0, 12))))
    chunks = splits(message, cuts)
    limit = rng.choice([1, 3, 64])
    read_bytes = rng.choice([0, 4096, MiB])
    outcomes: list[object] = []
    for conn in (full(), full()):
        events: list[Event] = []
        try:
            for chunk in chunks:  # (a failing chunk's events are lost on both sides)
                if not outcomes:
                    events += fast_feed(conn, chunk, limit=limit, read_bytes=read_bytes)
                else:
                    events += feed(conn, chunk)
            outcomes.append((events, conn.inflight, None))
        except RemoteProtocolError as exc:
            outcomes.append((events, conn.inflight, str(exc)))
    assert outcomes[0] == outcomes[1]


# ---- zero-copy receive (receive_window) ---------------------------------------------------


def windowed_feed(conn: ServerConnection, message: bytes, rng: random.Random) -> list[Event]:
    """What the server's buffered protocol does: while a payload waits with nothing
    buffered before it, read (a random part of) its rest straight into its window;
    otherwise read a random chunk through the fast lane and the general path."""
    events: list[Event] = []
    pos = 0
    while pos < len(message):
        window = conn.receive_window()
        if window is not None and rng.random() < 0.8:
            count = min(len(message) - pos, rng.randrange(1, len(window) + 1))
            window[:count] = message[pos : pos + count]
            pos += count
            if conn.received_into_window(count):
                if rng.random() < 0.5:
                    taken, used = conn.receive_requests(b"", 64, MiB)
                    assert used == 0 and len(taken) == 1
                    events += taken
                else:
                    events += drain(conn)
            continue
        end = min(len(message), pos + rng.randrange(1, 3000))
        events += fast_feed(conn, message[pos:end])
        pos = end
    return events


@pytest.mark.parametrize("seed", range(40))
def test_payloads_received_into_their_window_equal_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    big = request(CMD_WRITE, cookie=20, offset=8192, payload=rng.randbytes(70000))
    flagged = request(CMD_WRITE, cookie=21, offset=0, flags=FLAG_FUA, payload=rng.randbytes(9000))
    choices = [*LANE_REQUESTS, big, flagged]
    message = b"".join(rng.choice(choices) for _ in range(rng.randrange(1, 20)))
    windowed = windowed_feed(full_with(lambda size: memoryview(bytearray(size))), message, rng)
    assert windowed == feed(full(), message)


def full_with(allocate: Callable[[int], memoryview]) -> ServerConnection:
    return transmission(FULL, structured=True, contexts=BOTH, payload_buffer=allocate)


def test_a_payload_read_into_its_window_is_handed_over_in_that_buffer() -> None:
    buffers: list[memoryview] = []

    def allocate(size: int) -> memoryview:
        buffers.append(memoryview(bytearray(size)))
        return buffers[-1]

    conn = full_with(allocate)
    data = random.Random(3).randbytes(100_000)
    message = request(CMD_WRITE, cookie=1, offset=0, payload=data)
    assert conn.receive_window() is None  # nothing pending: read into the connection's buffer
    assert conn.receive_requests(message[:1000], 64, MiB) == ([], 1000)
    window = conn.receive_window()
    assert window is not None and len(window) == len(data) - (1000 - 28)
    window[:] = message[1000:]
    assert conn.received_into_window(len(window))
    (event,) = drain(conn)
    assert isinstance(event, Write) and event.data == data and event.data.readonly
    assert [len(b) for b in buffers] == [len(data)]
    assert event.data.obj is buffers[0].obj  # no copy: the allocated buffer itself


def test_the_window_is_the_payloads_rest_and_nothing_else() -> None:
    conn = full()
    header = request(CMD_WRITE, cookie=1, offset=0, length=8)
    conn.receive_data(header + b"abcd")
    assert drain(conn) == []
    assert conn.receive_window() is not None  # the payload's rest
    with pytest.raises(LocalProtocolError, match="window of 4"):
        conn.received_into_window(5)
    other = full()
    other.receive_data(request(CMD_READ, length=4)[:10])  # a header in pieces: no payload
    assert other.receive_window() is None
    with pytest.raises(LocalProtocolError):
        other.received_into_window(1)
