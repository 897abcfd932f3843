"""NBD transmission replies, byte-exact against the layouts of proto.md, and the errno map."""

from __future__ import annotations

import array
import errno as host
import struct
from collections.abc import Sequence

import pytest
from nbd_wire import (
    CMD_BLOCK_STATUS,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    EINVAL,
    EIO,
    ENOSPC,
    EPERM,
    FLAG_DF,
    FLAG_REQ_ONE,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TYPE_BLOCK_STATUS,
    TYPE_ERROR,
    TYPE_ERROR_OFFSET,
    TYPE_NONE,
    TYPE_OFFSET_DATA,
    TYPE_OFFSET_HOLE,
    MiB,
    feed,
    request,
    transmission,
)

from qedkit.errors import (
    BackingFileError,
    CorruptImageError,
    FormatError,
    ImageLockedError,
    InvalidRequestError,
    JobError,
    ReadOnlyError,
    StoreError,
    UnsupportedFeatureError,
)
from qedkit.nbd import (
    Buffer,
    DataChunk,
    Errno,
    Export,
    HoleChunk,
    LocalProtocolError,
    MetaContext,
    RemoteProtocolError,
    ServerConnection,
)
from qedkit.nbd.errors import nbd_errno_for

SIZE = 4 * MiB
DISK = Export("disk", SIZE, can_trim=True)
BOTH = ("base:allocation", "qemu:allocation-depth")


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    return (
        struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload
    )


def joined(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def with_requests(
    *messages: bytes, structured: bool = False, contexts: Sequence[str] = ()
) -> ServerConnection:
    conn = transmission(DISK, structured=structured, contexts=contexts)
    events = feed(conn, *messages)
    assert len(events) == len(messages)
    return conn


# ---- simple replies --------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_reply_ok_is_a_simple_reply(structured: bool) -> None:
    conn = with_requests(request(CMD_FLUSH, cookie=0x0102030405060708), structured=structured)
    assert conn.reply_ok(0x0102030405060708) == [simple(0x0102030405060708)]
    assert conn.inflight == 0


def test_simple_error_reply_has_no_message() -> None:
    conn = with_requests(request(CMD_READ, cookie=9, length=100))
    assert conn.reply_error(9, Errno.EIO, "disk on fire") == [simple(9, EIO)]


def test_simple_read_reply_is_the_header_then_the_data_with_holes_spelled_out() -> None:
    conn = with_requests(request(CMD_READ, cookie=7, offset=1000, length=3000))
    data = bytearray(b"a" * 1000)
    out = conn.reply_read(
        7, [DataChunk(2000, b"b" * 1000), HoleChunk(1000, 1000), DataChunk(3000, data)]
    )
    assert joined(out) == simple(7) + bytes(1000) + b"b" * 1000 + b"a" * 1000
    # Zero copy: the caller's buffer is passed through as a view.
    data[0:1] = b"Z"
    assert joined(out)[-1000:-999] == b"Z"


def test_simple_read_reply_of_a_plain_buffer() -> None:
    conn = with_requests(request(CMD_READ, cookie=1, offset=0, length=5))
    out = conn.reply_read(1, b"hello")
    assert out[0] == simple(1)
    assert joined(out) == simple(1) + b"hello"


def test_read_data_of_any_buffer_format_is_sent_as_bytes() -> None:
    conn = with_requests(request(CMD_READ, cookie=1, offset=0, length=8))
    words = array.array("I", [0x01020304, 0x05060708])
    out = conn.reply_read(1, [DataChunk(0, memoryview(words))])
    assert joined(out) == simple(1) + words.tobytes()


def test_large_hole_in_a_simple_reply_uses_shared_zero_views() -> None:
    conn = with_requests(request(CMD_READ, cookie=1, offset=0, length=3 * MiB + 5))
    out = conn.reply_read(1, [HoleChunk(0, 3 * MiB + 5)])
    assert len(out) == 5 and all(isinstance(b, memoryview) for b in out[1:])
    assert joined(out) == simple(1) + bytes(3 * MiB + 5)


# ---- structured replies ----------------------------------------------------------------------


def test_structured_read_reply_sends_data_and_hole_chunks_done_on_the_last() -> None:
    conn = with_requests(request(CMD_READ, cookie=5, offset=4096, length=12288), structured=True)
    out = conn.reply_read(
        5,
        [
            DataChunk(12288, b"y" * 4096),  # out of order on purpose: sent sorted
            DataChunk(4096, b"x" * 4096),
            HoleChunk(8192, 4096),
        ],
    )
    assert joined(out) == (
        chunk(0, TYPE_OFFSET_DATA, 5, struct.pack(">Q", 4096) + b"x" * 4096)
        + chunk(0, TYPE_OFFSET_HOLE, 5, struct.pack(">QI", 8192, 4096))
        + chunk(REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 5, struct.pack(">Q", 12288) + b"y" * 4096)
    )
    # Headers are small bytes objects; payloads are views of the caller's buffers.
    assert [type(b) for b in out] == [bytes, memoryview, bytes, bytes, memoryview]


def test_structured_read_with_df_sends_a_single_data_chunk() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=6, offset=0, length=3000, flags=FLAG_DF), structured=True
    )
    out = conn.reply_read(
        6, [DataChunk(0, b"a" * 1000), HoleChunk(1000, 1000), DataChunk(2000, b"c" * 1000)]
    )
    assert joined(out) == chunk(
        REPLY_FLAG_DONE,
        TYPE_OFFSET_DATA,
        6,
        struct.pack(">Q", 0) + b"a" * 1000 + bytes(1000) + b"c" * 1000,
    )


def test_structured_read_with_df_and_a_single_hole_keeps_the_hole() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=6, offset=512, length=512, flags=FLAG_DF), structured=True
    )
    out = conn.reply_read(6, [HoleChunk(512, 512)])
    assert joined(out) == chunk(REPLY_FLAG_DONE, TYPE_OFFSET_HOLE, 6, struct.pack(">QI", 512, 512))


def test_empty_structured_read_is_a_none_chunk() -> None:
    conn = with_requests(request(CMD_READ, cookie=3, offset=10, length=0), structured=True)
    assert conn.reply_read(3, []) == [chunk(REPLY_FLAG_DONE, TYPE_NONE, 3, b"")]


def test_structured_error_chunk_carries_the_message() -> None:
    conn = with_requests(request(CMD_READ, cookie=4, length=10), structured=True)
    out = conn.reply_error(4, EIO, "bad sector")
    assert out == [
        chunk(REPLY_FLAG_DONE, TYPE_ERROR, 4, struct.pack(">IH", EIO, 10) + b"bad sector")
    ]


def test_structured_error_offset_chunk() -> None:
    conn = with_requests(request(CMD_READ, cookie=4, offset=1000, length=100), structured=True)
    out = conn.reply_error(4, Errno.EIO, "here", offset=1050)
    assert out == [
        chunk(
            REPLY_FLAG_DONE,
            TYPE_ERROR_OFFSET,
            4,
            struct.pack(">IH", EIO, 4) + b"here" + struct.pack(">Q", 1050),
        )
    ]


def test_error_messages_are_protocol_strings() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=1, length=1),
        request(CMD_READ, cookie=2, length=1),
        structured=True,
    )
    (out,) = conn.reply_error(1, EINVAL, "a\0b")
    assert out[-3:] == b"a b"
    (out,) = conn.reply_error(2, EINVAL, "\u00e9" * 3000)  # 6000 bytes of UTF-8
    assert struct.unpack(">H", out[24:26])[0] == 4096
    assert bytes(out[26:]).decode() == "\u00e9" * 2048


def test_block_status_reply_one_chunk_per_context_done_on_the_last() -> None:
    conn = with_requests(
        request(CMD_BLOCK_STATUS, cookie=8, offset=0, length=65536), structured=True, contexts=BOTH
    )
    out = conn.reply_block_status(
        8,
        {
            MetaContext.QEMU_ALLOCATION_DEPTH: [(65536, 1)],
            MetaContext.BASE_ALLOCATION: [(4096, 0), (61440, 3)],
        },
    )
    assert out == [
        chunk(0, TYPE_BLOCK_STATUS, 8, struct.pack(">IIIII", 1, 4096, 0, 61440, 3)),
        chunk(REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, 8, struct.pack(">III", 2, 65536, 1)),
    ]


def test_block_status_extents_are_trimmed_to_the_request() -> None:
    conn = with_requests(
        request(CMD_BLOCK_STATUS, cookie=1, offset=0, length=10000),
        request(CMD_BLOCK_STATUS, cookie=2, offset=0, length=10000, flags=FLAG_REQ_ONE),
        structured=True,
        contexts=("base:allocation",),
    )
    extents = {1: [(4096, 0), (8192, 3), (1 << 20, 0)]}
    assert conn.reply_block_status(1, extents) == [
        chunk(REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, 1, struct.pack(">IIIII", 1, 4096, 0, 5904, 3))
    ]
    assert conn.reply_block_status(2, {1: [(1 << 20, 2), (4096, 0)]}) == [
        chunk(REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, 2, struct.pack(">III", 1, 10000, 2))
    ]


# ---- the glue's mistakes ---------------------------------------------------------------------


def test_replies_to_unknown_cookies_are_local_errors() -> None:
    conn = with_requests(request(CMD_FLUSH, cookie=1))
    with pytest.raises(LocalProtocolError) as info:
        conn.reply_ok(2)
    assert info.value.cookie == 2
    conn.reply_ok(1)
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)  # answered already


def test_each_request_takes_its_own_kind_of_reply() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=1, length=4),
        request(CMD_BLOCK_STATUS, cookie=2, length=4),
        request(CMD_TRIM, cookie=3, length=4),
        request(CMD_WRITE, cookie=4, offset=SIZE, payload=b"x"),  # refused
        structured=True,
        contexts=("base:allocation",),
    )
    for method, cookie in [
        (conn.reply_ok, 1),
        (conn.reply_ok, 2),
        (conn.reply_ok, 4),
    ]:
        with pytest.raises(LocalProtocolError):
            method(cookie)
    with pytest.raises(LocalProtocolError, match="reply_read"):
        conn.reply_block_status(1, {1: [(4, 0)]})
    with pytest.raises(LocalProtocolError, match="reply_block_status"):
        conn.reply_read(2, b"abcd")
    with pytest.raises(LocalProtocolError, match="reply_error"):
        conn.reply_read(4, b"x")
    # Nothing changed: every request can still be answered properly.
    assert conn.inflight == 4
    conn.reply_read(1, b"abcd")
    conn.reply_block_status(2, {1: [(4, 0)]})
    conn.reply_ok(3)
    conn.reply_error(4, ENOSPC)
    assert conn.inflight == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [DataChunk(0, b"abc")],
        [DataChunk(0, b"abcde")],
        [DataChunk(0, b"ab"), DataChunk(1, b"cd")],
        [DataChunk(0, b"ab"), DataChunk(3, b"d")],
        [DataChunk(0, b"abcd"), HoleChunk(4, 0)],
        [HoleChunk(0, -4)],
        [DataChunk(1, b"abcd")],
        ["abcd"],
    ],
    ids=["none", "short", "long", "overlap", "gap", "empty-hole", "negative", "shifted", "str"],
)
def test_read_chunks_must_tile_the_request(chunks: list[object]) -> None:
    conn = with_requests(request(CMD_READ, cookie=1, length=4), structured=True)
    with pytest.raises(LocalProtocolError):
        conn.reply_read(1, chunks)  # type: ignore[arg-type]
    assert conn.inflight == 1


@pytest.mark.parametrize(
    "extents",
    [
        {},
        {2: [(4, 0)]},
        {1: [(4, 0)], 2: [(4, 0)]},
        {1: []},
        {1: [(0, 0)]},
        {1: [(2**32, 0)]},
        {1: [(4, -1)]},
        {1: [(4, 2**32)]},
    ],
    ids=["none", "wrong-id", "extra-id", "empty", "zero", "long", "negative", "flags"],
)
def test_block_status_extents_are_checked(extents: dict[int, list[tuple[int, int]]]) -> None:
    conn = with_requests(
        request(CMD_BLOCK_STATUS, cookie=1, length=4),
        structured=True,
        contexts=("base:allocation",),
    )
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(1, extents)
    assert conn.inflight == 1


@pytest.mark.parametrize("errno", [0, 2, 4, -1, 1000])
def test_reply_error_needs_an_nbd_error_value(errno: int) -> None:
    conn = with_requests(request(CMD_FLUSH, cookie=1))
    with pytest.raises(LocalProtocolError, match="not an NBD error"):
        conn.reply_error(1, errno)


def test_error_offsets_must_lie_in_the_request_of_a_command_that_has_one() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=1, offset=100, length=10),
        request(CMD_FLUSH, cookie=2),
        structured=True,
    )
    with pytest.raises(LocalProtocolError):
        conn.reply_error(1, EIO, offset=110)
    with pytest.raises(LocalProtocolError):
        conn.reply_error(1, EIO, offset=99)
    with pytest.raises(LocalProtocolError):
        conn.reply_error(2, EIO, offset=0)
    conn.reply_error(1, EIO, offset=109)
    conn.reply_error(2, EIO)


def test_a_cookie_reused_while_in_flight_pairs_replies_in_order() -> None:
    conn = with_requests(
        request(CMD_READ, cookie=1, length=2),
        request(CMD_FLUSH, cookie=1),
    )
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)  # the READ comes first
    assert joined(conn.reply_read(1, b"ab")) == simple(1) + b"ab"
    assert conn.reply_ok(1) == [simple(1)]
    assert conn.inflight == 0


def test_replies_before_transmission_are_local_errors() -> None:
    conn = ServerConnection([DISK])
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(0)


def test_protocol_error_is_abstract() -> None:
    from qedkit.nbd import ProtocolError

    with pytest.raises(TypeError):
        ProtocolError("x")
    error = RemoteProtocolError("x", errno_hint=Errno.ENOSPC, cookie=3)
    assert (error.errno_hint, error.cookie, str(error)) == (Errno.ENOSPC, 3, "x")


# ---- errno mapping -----------------------------------------------------------------------------


def _store_error_with_cause(code: int) -> StoreError:
    error = StoreError("write failed")
    error.__cause__ = OSError(code, "boom")
    return error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ReadOnlyError("ro"), EPERM),
        (InvalidRequestError("bad"), EINVAL),
        (UnsupportedFeatureError("no"), EINVAL),
        (CorruptImageError("bad table"), EIO),
        (FormatError("not qed"), EIO),
        (BackingFileError("gone"), EIO),
        (ImageLockedError("locked"), EIO),
        (JobError("cancelled"), EIO),
        (StoreError("full", errno=host.ENOSPC), ENOSPC),
        (StoreError("quota", errno=host.EDQUOT), ENOSPC),
        (StoreError("too big", errno=host.EFBIG), ENOSPC),
        (StoreError("io", errno=host.EIO), EIO),
        (StoreError("rofs", errno=host.EROFS), EPERM),
        (StoreError("acces", errno=host.EACCES), EPERM),
        (StoreError("nomem", errno=host.ENOMEM), 12),
        (StoreError("inval", errno=host.EINVAL), EINVAL),
        (StoreError("overflow", errno=host.EOVERFLOW), EINVAL),
        (StoreError("notsup", errno=host.EOPNOTSUPP), EINVAL),
        (StoreError("down", errno=host.ESHUTDOWN), 108),
        (StoreError("odd", errno=host.EBADF), EIO),
        (StoreError("no errno"), EIO),
        (_store_error_with_cause(host.ENOSPC), ENOSPC),
        (OSError(host.ENOSPC, "full"), ENOSPC),
        (OSError("no errno"), EIO),
        (MemoryError(), 12),
        (RemoteProtocolError("x", errno_hint=Errno.EOVERFLOW), 75),
        (ValueError("bug"), EIO),
        (KeyboardInterrupt(), EIO),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_nbd_errno_for(exc: BaseException, expected: int) -> None:
    code = nbd_errno_for(exc)
    assert isinstance(code, Errno)
    assert code == expected


def test_errno_values_are_the_specs() -> None:
    assert {e.name: int(e) for e in Errno} == {
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }


def test_write_error_reply_round_trip_through_the_mapping() -> None:
    conn = with_requests(request(CMD_WRITE, cookie=1, payload=b"abc"))
    code = nbd_errno_for(StoreError("full", errno=host.ENOSPC))
    assert conn.reply_error(1, code) == [simple(1, ENOSPC)]
