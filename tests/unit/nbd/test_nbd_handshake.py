"""NBD handshake: greeting, client flags and option haggling, driven by bytes alone."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from nbd_wire import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_PEEK_EXPORT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    MiB,
    client_flags,
    connect,
    drain,
    feed,
    info_data,
    meta_data,
    option,
    option_replies,
)

from qedkit.errors import InvalidRequestError
from qedkit.nbd import (
    Abort,
    ConnectionClosed,
    Export,
    HandshakeComplete,
    LocalProtocolError,
    MetaContext,
    Opt,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    State,
    TlsMode,
    TransmissionFlag,
)

DISK = Export("disk", 4 * MiB, description="the test disk", can_trim=True)
OTHER = Export("other", MiB, read_only=True)
# Transmission flags of DISK: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM.
DISK_FLAGS = 0x01 | 0x04 | 0x08 | 0x20
DF = 0x80
BLOCK_SIZE_INFO = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)


def negotiate(
    conn: ServerConnection, *options: bytes
) -> tuple[list[object], list[tuple[int, int, bytes]]]:
    events = feed(conn, b"".join(options))
    return list(events), option_replies(conn.data_to_send())


# ---- greeting and client flags -------------------------------------------------------------


def test_greeting_is_nbdmagic_ihaveopt_and_the_two_handshake_flags() -> None:
    conn = ServerConnection([DISK])
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.data_to_send() == b""
    assert conn.state is State.CLIENT_FLAGS


@pytest.mark.parametrize("flags", [0, C_FIXED_NEWSTYLE, C_NO_ZEROES, 3])
def test_known_client_flags_are_accepted(flags: int) -> None:
    conn = connect([DISK], flags=flags)
    assert conn.state is State.NEGOTIATING
    assert int(conn.client_flags) == flags


@pytest.mark.parametrize("flags", [4, 7, 1 << 31])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    conn = ServerConnection([DISK])
    conn.receive_data(client_flags(flags))
    with pytest.raises(RemoteProtocolError, match="unknown flags"):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_client_flags_split_byte_by_byte() -> None:
    conn = ServerConnection([DISK])
    for byte in client_flags():
        conn.receive_data(bytes([byte]))
        assert drain(conn) == []
    assert conn.state is State.NEGOTIATING


# ---- NBD_OPT_EXPORT_NAME ---------------------------------------------------------------------


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_replies_size_flags_and_zeroes_unless_no_zeroes(no_zeroes: bool) -> None:
    flags = C_FIXED_NEWSTYLE | (C_NO_ZEROES if no_zeroes else 0)
    conn = connect([DISK], flags=flags)
    events = feed(conn, option(OPT_EXPORT_NAME, b"disk"))
    expected = struct.pack(">QH", 4 * MiB, DISK_FLAGS) + (b"" if no_zeroes else bytes(124))
    assert conn.data_to_send() == expected
    assert events == [
        HandshakeComplete(
            export=DISK,
            via=Opt.EXPORT_NAME,
            transmission_flags=TransmissionFlag(DISK_FLAGS),
            structured_replies=False,
            meta_contexts=(),
            block_size_requested=False,
        )
    ]
    assert conn.state is State.TRANSMISSION
    assert conn.export is DISK


def test_export_name_after_structured_replies_advertises_df() -> None:
    conn = connect([DISK])
    feed(conn, option(OPT_STRUCTURED_REPLY), option(OPT_EXPORT_NAME, b"disk"))
    out = conn.data_to_send()
    assert out[20:] == struct.pack(">QH", 4 * MiB, DISK_FLAGS | DF)


@pytest.mark.parametrize(
    "name", [b"nope", b"DISK", b"\xff\xfe", b"di\x00sk"], ids=["unknown", "case", "utf8", "nul"]
)
def test_export_name_that_cannot_be_served_ends_the_session(name: bytes) -> None:
    conn = connect([DISK])
    conn.receive_data(option(OPT_EXPORT_NAME, name))
    with pytest.raises(RemoteProtocolError, match="cannot fail"):
        conn.next_event()
    assert conn.state is State.ERROR
    assert conn.data_to_send() == b""


def test_export_name_longer_than_a_string_ends_the_session_before_its_data() -> None:
    conn = connect([DISK])
    conn.receive_data(option(OPT_EXPORT_NAME)[:-4] + struct.pack(">I", 4097))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_empty_name_is_the_default_export() -> None:
    conn = connect([DISK, OTHER])
    (event,) = feed(conn, option(OPT_EXPORT_NAME))
    assert isinstance(event, HandshakeComplete) and event.export is DISK
    named_default = Export("", MiB)
    conn = connect([DISK, named_default])
    (event,) = feed(conn, option(OPT_EXPORT_NAME))
    assert isinstance(event, HandshakeComplete) and event.export is named_default


# ---- NBD_OPT_INFO / NBD_OPT_GO ---------------------------------------------------------------


@pytest.mark.parametrize("flags", [C_FIXED_NEWSTYLE, C_FIXED_NEWSTYLE | C_NO_ZEROES])
def test_go_sends_export_info_block_sizes_and_ack_without_zeroes(flags: int) -> None:
    conn = connect([DISK], flags=flags)
    events, replies = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert replies == [
        (OPT_GO, REP_INFO, struct.pack(">HQH", 0, 4 * MiB, DISK_FLAGS)),
        (OPT_GO, REP_INFO, BLOCK_SIZE_INFO),
        (OPT_GO, REP_ACK, b""),
    ]
    assert events == [
        HandshakeComplete(
            export=DISK,
            via=Opt.GO,
            transmission_flags=TransmissionFlag(DISK_FLAGS),
            structured_replies=False,
            meta_contexts=(),
            block_size_requested=False,
        )
    ]
    assert conn.state is State.TRANSMISSION


def test_go_answers_name_and_description_requests_and_notes_block_size() -> None:
    conn = connect([DISK])
    events, replies = negotiate(
        conn, option(OPT_GO, info_data("", INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999))
    )
    assert replies == [
        (OPT_GO, REP_INFO, struct.pack(">HQH", 0, 4 * MiB, DISK_FLAGS)),
        (OPT_GO, REP_INFO, struct.pack(">H", INFO_NAME) + b"disk"),
        (OPT_GO, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + b"the test disk"),
        (OPT_GO, REP_INFO, BLOCK_SIZE_INFO),
        (OPT_GO, REP_ACK, b""),
    ]
    (event,) = events
    assert isinstance(event, HandshakeComplete) and event.block_size_requested


def test_info_does_not_end_negotiation_and_reports_current_flags() -> None:
    conn = connect([DISK, OTHER])
    events, replies = negotiate(
        conn,
        option(OPT_INFO, info_data("other")),
        option(OPT_STRUCTURED_REPLY),
        option(OPT_INFO, info_data("disk")),
    )
    assert events == []
    assert conn.state is State.NEGOTIATING
    assert replies[0] == (
        OPT_INFO,
        REP_INFO,
        struct.pack(">HQH", 0, MiB, 0x01 | 0x02 | 0x04 | 0x08),
    )
    assert replies[4] == (OPT_INFO, REP_INFO, struct.pack(">HQH", 0, 4 * MiB, DISK_FLAGS | DF))
    events, replies = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert [type(e) for e in events] == [HandshakeComplete]


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
def test_info_and_go_on_an_unknown_export_fail_and_negotiation_goes_on(opt: int) -> None:
    conn = connect([DISK])
    events, replies = negotiate(conn, option(opt, info_data("missing")))
    assert events == []
    ((reply_opt, kind, message),) = replies
    assert (reply_opt, kind) == (opt, REP_ERR_UNKNOWN)
    assert b"missing" in message
    events, _ = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert [type(e) for e in events] == [HandshakeComplete]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 100) + b"disk" + b"\x00\x00",  # name longer than the data
        struct.pack(">I", 4) + b"disk",  # no request count
        struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 2, 1),  # count says 2, 1 given
        info_data("disk") + b"\x00",  # trailing byte
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
        struct.pack(">I", 4097) + b"x" * 4097 + struct.pack(">H", 0),  # name too long
    ],
    ids=["empty", "short", "long-name", "no-count", "short-list", "trailing", "utf8", "4097"],
)
def test_malformed_go_is_invalid(data: bytes) -> None:
    conn = connect([DISK])
    events, replies = negotiate(conn, option(OPT_GO, data))
    assert events == []
    assert [(o, k) for o, k, _ in replies] == [(OPT_GO, REP_ERR_INVALID)]
    assert conn.state is State.NEGOTIATING


# ---- NBD_OPT_LIST, NBD_OPT_ABORT, unknown options ------------------------------------------------


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    conn = connect([DISK, OTHER])
    events, replies = negotiate(conn, option(OPT_LIST))
    assert events == []
    assert replies == [
        (OPT_LIST, REP_SERVER, struct.pack(">I", 4) + b"disk" + b"the test disk"),
        (OPT_LIST, REP_SERVER, struct.pack(">I", 5) + b"other"),
        (OPT_LIST, REP_ACK, b""),
    ]


def test_list_with_data_is_invalid() -> None:
    conn = connect([DISK])
    _, replies = negotiate(conn, option(OPT_LIST, b"x"))
    assert [(o, k) for o, k, _ in replies] == [(OPT_LIST, REP_ERR_INVALID)]


@pytest.mark.parametrize("data", [b"", b"ignored data"])
def test_abort_is_acknowledged_and_ends_the_session(data: bytes) -> None:
    conn = connect([DISK])
    events, replies = negotiate(conn, option(OPT_ABORT, data))
    assert events == [Abort()]
    assert replies == [(OPT_ABORT, REP_ACK, b"")]
    states = [conn.state]
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    states.append(conn.state)
    assert states == [State.DONE, State.CLOSED]


def test_data_after_abort_is_a_violation() -> None:
    conn = connect([DISK])
    conn.receive_data(option(OPT_ABORT) + option(OPT_LIST))
    assert conn.next_event() == Abort()
    with pytest.raises(RemoteProtocolError, match="after ending"):
        conn.next_event()


@pytest.mark.parametrize("opt", [OPT_PEEK_EXPORT, OPT_EXTENDED_HEADERS, 12, 0, 2**31, 2**32 - 1])
def test_unknown_options_get_err_unsup_and_their_data_is_skipped(opt: int) -> None:
    conn = connect([DISK])
    events, replies = negotiate(conn, option(opt, b"some data"), option(OPT_LIST))
    assert events == []
    assert [(o, k) for o, k, _ in replies] == [
        (opt, REP_ERR_UNSUP),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_ACK),
    ]


def test_huge_option_data_is_skipped_without_buffering() -> None:
    conn = connect([DISK])
    size = 64 * MiB
    conn.receive_data(struct.pack(">QII", 0x49484156454F5054, 99, size))
    assert drain(conn) == []
    block = bytes(MiB)
    tracemalloc.start()
    try:
        for _ in range(size // MiB):
            conn.receive_data(block)  # absorbed as it arrives, never buffered
            assert drain(conn) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    ((opt, kind, _),) = option_replies(conn.data_to_send())
    assert (opt, kind) == (99, REP_ERR_UNSUP)


@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_known_option_with_too_much_data_gets_too_big(opt: int) -> None:
    conn = connect([DISK])
    events, replies = negotiate(conn, option(opt, bytes(64 * 1024 + 1)), option(OPT_LIST))
    assert events == []
    assert replies[0][:2] == (opt, REP_ERR_TOO_BIG)


def test_bad_option_magic_drops_the_connection() -> None:
    conn = connect([DISK])
    conn.receive_data(struct.pack(">QII", 0x49484156454F5055, OPT_LIST, 0))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


def test_shutdown_refuses_options_but_abort() -> None:
    conn = connect([DISK])
    conn.start_shutdown()
    events, replies = negotiate(conn, option(OPT_LIST), option(OPT_GO, info_data("disk")))
    assert events == []
    assert [(o, k) for o, k, _ in replies] == [
        (OPT_LIST, REP_ERR_SHUTDOWN),
        (OPT_GO, REP_ERR_SHUTDOWN),
    ]
    events, replies = negotiate(conn, option(OPT_ABORT))
    assert events == [Abort()]


# ---- structured replies ------------------------------------------------------------------------


def test_structured_reply_negotiation() -> None:
    conn = connect([DISK])
    _, replies = negotiate(conn, option(OPT_STRUCTURED_REPLY, b"x"))
    assert [(o, k) for o, k, _ in replies] == [(OPT_STRUCTURED_REPLY, REP_ERR_INVALID)]
    assert not conn.structured_replies
    _, replies = negotiate(conn, option(OPT_STRUCTURED_REPLY))
    assert replies == [(OPT_STRUCTURED_REPLY, REP_ACK, b"")]
    assert conn.structured_replies
    _, replies = negotiate(conn, option(OPT_STRUCTURED_REPLY))
    assert [(o, k) for o, k, _ in replies] == [(OPT_STRUCTURED_REPLY, REP_ERR_INVALID)]
    (event,) = feed(conn, option(OPT_GO, info_data("disk")))
    assert isinstance(event, HandshakeComplete)
    assert event.structured_replies
    assert event.transmission_flags == DISK_FLAGS | DF


# ---- metadata contexts -------------------------------------------------------------------------

BASE = (0, "base:allocation")
DEPTH = (0, "qemu:allocation-depth")


def meta_replies(replies: list[tuple[int, int, bytes]], opt: int) -> list[tuple[int, str]]:
    assert replies[-1] == (opt, REP_ACK, b"")
    out = []
    for reply_opt, kind, data in replies[:-1]:
        assert (reply_opt, kind) == (opt, REP_META_CONTEXT)
        out.append((struct.unpack(">I", data[:4])[0], data[4:].decode()))
    return out


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_options_need_structured_replies(opt: int) -> None:
    conn = connect([DISK])
    _, replies = negotiate(conn, option(opt, meta_data("disk", "base:allocation")))
    assert [(o, k) for o, k, _ in replies] == [(opt, REP_ERR_INVALID)]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), [BASE, DEPTH]),
        (("base:",), [BASE]),
        (("qemu:",), [DEPTH]),
        (("base:allocation",), [BASE]),
        (("qemu:allocation-depth",), [DEPTH]),
        (("base:", "qemu:"), [BASE, DEPTH]),
        (("qemu:allocation-depth", "base:allocation", "base:"), [BASE, DEPTH]),
        (("base:nonsense",), []),
        (("qemu:dirty-bitmap:",), []),
        (("x-vendor:",), []),
        (("nbd-server:",), []),
        (("no-colon",), []),
        (("",), []),
    ],
)
def test_list_meta_context_query_rules(
    queries: tuple[str, ...], expected: list[tuple[int, str]]
) -> None:
    conn = connect([DISK])
    _, replies = negotiate(
        conn,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_LIST_META_CONTEXT, meta_data("disk", *queries)),
    )
    assert meta_replies(replies[1:], OPT_LIST_META_CONTEXT) == expected


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), []),
        (("base:",), []),
        (("qemu:",), []),
        (("base:allocation",), [(1, "base:allocation")]),
        (("qemu:allocation-depth",), [(2, "qemu:allocation-depth")]),
        (
            ("qemu:allocation-depth", "base:allocation", "base:allocation"),
            [(1, "base:allocation"), (2, "qemu:allocation-depth")],
        ),
        (("base:nonsense", "x-foo:bar", "nocolon"), []),
    ],
)
def test_set_meta_context_query_rules_and_ids(
    queries: tuple[str, ...], expected: list[tuple[int, str]]
) -> None:
    conn = connect([DISK])
    events, replies = negotiate(
        conn,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_SET_META_CONTEXT, meta_data("disk", *queries)),
        option(OPT_GO, info_data("disk")),
    )
    assert meta_replies(replies[1:-3], OPT_SET_META_CONTEXT) == expected
    (event,) = events
    assert isinstance(event, HandshakeComplete)
    assert [(int(c), c.context_name) for c in event.meta_contexts] == expected
    assert conn.meta_contexts == event.meta_contexts


def test_meta_contexts_only_apply_to_the_export_they_were_set_for() -> None:
    conn = connect([DISK, OTHER])
    (event,) = feed(
        conn,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        option(OPT_GO, info_data("other")),
    )
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == ()


def test_meta_contexts_set_on_the_default_name_apply_to_the_default_export() -> None:
    conn = connect([DISK, OTHER])
    (event,) = feed(
        conn,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_SET_META_CONTEXT, meta_data("", "base:allocation")),
        option(OPT_GO, info_data("disk")),
    )
    assert isinstance(event, HandshakeComplete)
    assert event.meta_contexts == (MetaContext.BASE_ALLOCATION,)


@pytest.mark.parametrize(
    "failing",
    [
        option(OPT_SET_META_CONTEXT, meta_data("missing", "base:allocation")),
        option(OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation") + b"\x00"),
        option(OPT_SET_META_CONTEXT, bytes(64 * 1024 + 1)),
    ],
    ids=["unknown-export", "malformed", "too-big"],
)
def test_a_failed_set_meta_context_still_clears_the_selection(failing: bytes) -> None:
    conn = connect([DISK])
    events, replies = negotiate(
        conn,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        failing,
        option(OPT_GO, info_data("disk")),
    )
    assert replies[3][1] in (REP_ERR_UNKNOWN, REP_ERR_INVALID, REP_ERR_TOO_BIG)
    (event,) = events
    assert isinstance(event, HandshakeComplete) and event.meta_contexts == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack(">I", 4) + b"disk",  # no query count
        struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1),  # a missing query
        struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 100) + b"base:",
        meta_data("disk", "base:" + "x" * 4092),  # a query over 4096 bytes
        meta_data("disk") + b"\x00",
    ],
    ids=["empty", "no-count", "missing-query", "short-query", "long-query", "trailing"],
)
def test_malformed_meta_context_requests_are_invalid(data: bytes) -> None:
    conn = connect([DISK])
    _, replies = negotiate(conn, option(OPT_STRUCTURED_REPLY), option(OPT_LIST_META_CONTEXT, data))
    assert [(o, k) for o, k, _ in replies[1:]] == [(OPT_LIST_META_CONTEXT, REP_ERR_INVALID)]


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reply"),
    [(TlsMode.DISABLED, REP_ERR_POLICY), (TlsMode.UNSUPPORTED, REP_ERR_UNSUP)],
)
def test_starttls_refused_without_tls(mode: TlsMode, reply: int) -> None:
    conn = connect([DISK], tls=mode)
    events, replies = negotiate(conn, option(OPT_STARTTLS))
    assert events == []
    assert [(o, k) for o, k, _ in replies] == [(OPT_STARTTLS, reply)]
    assert conn.state is State.NEGOTIATING


def test_optional_tls_pauses_until_established_and_resets_negotiation() -> None:
    conn = connect([DISK], tls=TlsMode.OPTIONAL)
    events, replies = negotiate(conn, option(OPT_STRUCTURED_REPLY), option(OPT_STARTTLS))
    assert events == [StartTLS()]
    assert replies[-1] == (OPT_STARTTLS, REP_ACK, b"")
    assert conn.state is State.TLS_PENDING
    assert conn.next_event() == conn.next_event()  # PAUSED, again
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"plaintext")
    conn.tls_established()
    assert conn.tls_active and not conn.structured_replies
    _, replies = negotiate(conn, option(OPT_STARTTLS))
    assert [(o, k) for o, k, _ in replies] == [(OPT_STARTTLS, REP_ERR_INVALID)]
    events, _ = negotiate(conn, option(OPT_GO, info_data("disk")))
    (event,) = events
    assert isinstance(event, HandshakeComplete) and not event.structured_replies


def test_optional_tls_needs_a_fixed_newstyle_client() -> None:
    conn = connect([DISK], tls=TlsMode.OPTIONAL, flags=0)
    _, replies = negotiate(conn, option(OPT_STARTTLS))
    assert [(o, k) for o, k, _ in replies] == [(OPT_STARTTLS, REP_ERR_POLICY)]


def test_starttls_with_data_is_invalid() -> None:
    conn = connect([DISK], tls=TlsMode.OPTIONAL)
    _, replies = negotiate(conn, option(OPT_STARTTLS, b"x"))
    assert [(o, k) for o, k, _ in replies] == [(OPT_STARTTLS, REP_ERR_INVALID)]


def test_client_data_pipelined_after_starttls_is_a_violation() -> None:
    conn = connect([DISK], tls=TlsMode.OPTIONAL)
    conn.receive_data(option(OPT_STARTTLS) + b"\x16\x03\x01")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        conn.next_event()


def test_tls_established_without_starttls_is_a_local_error() -> None:
    conn = connect([DISK], tls=TlsMode.OPTIONAL)
    with pytest.raises(LocalProtocolError):
        conn.tls_established()
    assert conn.state is State.NEGOTIATING


def test_required_tls_refuses_everything_but_starttls_and_abort() -> None:
    conn = connect([DISK], tls=TlsMode.REQUIRED)
    events, replies = negotiate(
        conn,
        option(OPT_LIST),
        option(OPT_INFO, info_data("disk")),
        option(OPT_GO, info_data("disk")),
        option(OPT_STRUCTURED_REPLY),
        option(77, b"zz"),
    )
    assert events == []
    assert [(o, k) for o, k, _ in replies] == [
        (OPT_LIST, REP_ERR_TLS_REQD),
        (OPT_INFO, REP_ERR_TLS_REQD),
        (OPT_GO, REP_ERR_TLS_REQD),
        (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
        (77, REP_ERR_TLS_REQD),
    ]
    events, replies = negotiate(conn, option(OPT_STARTTLS))
    assert events == [StartTLS()]
    conn.tls_established()
    events, replies = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert [type(e) for e in events] == [HandshakeComplete]


def test_required_tls_abort_is_allowed() -> None:
    conn = connect([DISK], tls=TlsMode.REQUIRED)
    events, _ = negotiate(conn, option(OPT_ABORT))
    assert events == [Abort()]


def test_required_tls_export_name_before_tls_ends_the_session() -> None:
    conn = connect([DISK], tls=TlsMode.REQUIRED)
    conn.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError, match="TLS"):
        conn.next_event()


def test_required_tls_refuses_clients_without_fixed_newstyle() -> None:
    conn = ServerConnection([DISK], tls=TlsMode.REQUIRED)
    conn.receive_data(client_flags(C_NO_ZEROES))
    with pytest.raises(RemoteProtocolError, match="FIXED_NEWSTYLE"):
        conn.next_event()


# ---- end of file -------------------------------------------------------------------------------


def test_eof_at_a_boundary_is_a_clean_close() -> None:
    conn = connect([DISK])
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


@pytest.mark.parametrize(
    "partial",
    [
        client_flags()[:2],
        client_flags() + option(OPT_LIST)[:10],
        client_flags() + option(OPT_GO, info_data("disk"))[:20],
        client_flags() + struct.pack(">QII", 0x49484156454F5054, 99, 1000) + b"x" * 10,
    ],
    ids=["flags", "option-header", "option-data", "skipped-data"],
)
def test_eof_inside_a_message_is_a_violation(partial: bytes) -> None:
    conn = ServerConnection([DISK])
    conn.receive_data(partial)
    drain(conn)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of file"):
        drain(conn)


# ---- a whole negotiation, at every split ------------------------------------------------------


def test_a_whole_negotiation_gives_the_same_result_at_every_split() -> None:
    transcript = client_flags() + b"".join(
        [
            option(OPT_LIST),
            option(99, b"abc"),
            option(OPT_STRUCTURED_REPLY),
            option(OPT_LIST_META_CONTEXT, meta_data("disk")),
            option(OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
            option(OPT_INFO, info_data("disk", INFO_NAME)),
            option(OPT_GO, info_data("disk", INFO_BLOCK_SIZE)),
        ]
    )
    whole = ServerConnection([DISK, OTHER])
    expected_out = whole.data_to_send()
    expected_events = feed(whole, transcript)
    expected_out += whole.data_to_send()
    assert [type(e) for e in expected_events] == [HandshakeComplete]
    for cut in range(len(transcript) + 1):
        conn = ServerConnection([DISK, OTHER])
        out = conn.data_to_send()
        events = feed(conn, transcript[:cut], transcript[cut:])
        assert events == expected_events
        assert out + conn.data_to_send() == expected_out
    conn = ServerConnection([DISK, OTHER])
    events = feed(conn, *(bytes([b]) for b in transcript))
    assert events == expected_events


# ---- exports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a\0b"},
        {"name": "x" * 4097},
        {"description": "d" * 4097},
        {"size": -1},
        {"size": 2**64},
        {"min_block_size": 3},
        {"min_block_size": 2**17},
        {"preferred_block_size": 256},
        {"min_block_size": 8192, "preferred_block_size": 4096},
        {"preferred_block_size": 3000},
        {"max_block_size": 64 * MiB},
        {"min_block_size": 512, "max_block_size": 1000 * 1024 + 1},
        {"max_block_size": 1024},  # below min(preferred, size)
    ],
)
def test_invalid_exports_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "x", "size": MiB, **kwargs}
    with pytest.raises(InvalidRequestError):
        Export(**args)  # type: ignore[arg-type]


def test_duplicate_export_names_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        ServerConnection([DISK, Export("disk", MiB)])


def test_small_exports_may_have_a_small_maximum_block_size() -> None:
    assert Export("tiny", 100, max_block_size=100).max_block_size == 100


@pytest.mark.parametrize(
    ("kwargs", "structured", "flags"),
    [
        ({}, False, 0x01 | 0x04 | 0x08),
        ({"can_flush": False, "can_fua": False}, False, 0x01),
        ({}, True, 0x01 | 0x04 | 0x08 | 0x80),
        ({"read_only": True}, False, 0x01 | 0x02 | 0x04 | 0x08),
        ({"rotational": True, "can_multi_conn": True}, False, 0x01 | 0x04 | 0x08 | 0x10 | 0x100),
        ({"can_trim": True, "can_cache": True}, False, 0x01 | 0x04 | 0x08 | 0x20 | 0x400),
        ({"can_write_zeroes": True}, False, 0x01 | 0x04 | 0x08 | 0x40),
        (
            {"can_write_zeroes": True, "can_fast_zero": True},
            False,
            0x01 | 0x04 | 0x08 | 0x40 | 0x800,
        ),
        ({"can_fast_zero": True}, False, 0x01 | 0x04 | 0x08),  # needs write zeroes
        (
            {"read_only": True, "can_trim": True, "can_write_zeroes": True, "can_fast_zero": True},
            False,
            0x01 | 0x02 | 0x04 | 0x08,
        ),
    ],
)
def test_transmission_flags_are_computed_from_the_export(
    kwargs: dict[str, bool], structured: bool, flags: int
) -> None:
    export = Export("x", MiB, **kwargs)  # type: ignore[arg-type]
    assert int(export.transmission_flags(structured_replies=structured)) == flags


def test_export_name_is_honoured_while_shutting_down() -> None:
    conn = connect([DISK])
    conn.start_shutdown()
    (event,) = feed(conn, option(OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeComplete)


# ---- refusing transmission (a server over its connection limit) -----------------------------

BUSY = "too many connections: 1 allowed"


def test_refused_transmission_answers_go_with_err_policy_and_the_message() -> None:
    conn = connect([DISK])
    conn.refuse_transmission(BUSY)
    events, replies = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert events == []
    assert replies == [(OPT_GO, REP_ERR_POLICY, BUSY.encode())]
    assert conn.state is State.NEGOTIATING


def test_refused_transmission_still_answers_other_options_and_abort() -> None:
    conn = ServerConnection([DISK])
    conn.refuse_transmission(BUSY)  # before the greeting is even sent
    conn.data_to_send()
    feed(conn, client_flags())
    events, replies = negotiate(
        conn, option(OPT_LIST), option(OPT_INFO, info_data("disk")), option(OPT_ABORT)
    )
    kinds = [(opt, kind) for opt, kind, _ in replies]
    assert (OPT_LIST, REP_ACK) in kinds and (OPT_INFO, REP_ACK) in kinds
    assert kinds[-1] == (OPT_ABORT, REP_ACK)
    assert [type(e) for e in events] == [Abort]


def test_refused_transmission_ends_the_session_on_export_name_which_cannot_fail() -> None:
    conn = connect([DISK])
    conn.refuse_transmission(BUSY)
    conn.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError, match="cannot fail"):
        conn.next_event()


def test_shutdown_is_reported_before_a_refused_transmission() -> None:
    conn = connect([DISK])
    conn.refuse_transmission(BUSY)
    conn.start_shutdown()
    _, replies = negotiate(conn, option(OPT_GO, info_data("disk")))
    assert [kind for _, kind, _ in replies] == [REP_ERR_SHUTDOWN]


def test_transmission_cannot_be_refused_once_it_began() -> None:
    conn = connect([DISK])
    feed(conn, option(OPT_GO, info_data("disk")))
    with pytest.raises(LocalProtocolError):
        conn.refuse_transmission(BUSY)


def test_the_protocol_core_is_pure() -> None:
    """No I/O, no clock: only the standard library's pure modules, qedkit.errors and
    the core's own modules, in every file of the package."""
    import ast
    from pathlib import Path

    import qedkit.nbd.protocol as package

    files = sorted(Path(package.__file__).parent.glob("*.py"))
    siblings = {"." + path.stem for path in files if path.stem != "__init__"}
    assert {".wire", ".connection", ".transmission", ".replies"} <= siblings
    for path in files:
        tree = ast.parse(path.read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or ""))
        assert imported <= {
            "__future__",
            "enum",
            "struct",
            "collections.abc",
            "dataclasses",
            "typing",
            "...errors",
            *siblings,
        }, (path.name, imported)
