"""NBD remote images (store.nbdclient): URLs, the handshake, reconnection and errors,
against qedkit's own server in a thread and small hand-written servers.

Wire constants here are spelled out from proto.md, not imported from qedkit, so that a
wrong constant there cannot hide here."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from remotekit import KiB, MiB, NbdThreadServer, pattern

from qedkit.errors import StoreError, UnsupportedFeatureError
from qedkit.store.nbdclient import NbdAddress, parse_nbd_url
from qedkit.store.remote import RemoteOptions, RemoteStore, RetryPolicy
from qedkit.store.url import open_url

T = TypeVar("T")

RETRY = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05, timeout=2)
OPTIONS = RemoteOptions(block_size=64 * KiB, cache_bytes=4 * MiB, retry=RETRY)
DATA = pattern(4 * MiB)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY = 1, 7, 8
REP_ERR_UNSUP = 2**31 + 1
CMD_READ, CMD_DISC = 0, 2


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---- URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("nbd://example.com/disk", NbdAddress("disk", host="example.com")),
        ("nbd://example.com", NbdAddress("", host="example.com")),
        ("nbd://example.com/", NbdAddress("", host="example.com")),
        ("nbd://example.com//disk", NbdAddress("/disk", host="example.com")),
        ("nbd://h:1234/hello%20world", NbdAddress("hello world", host="h", port=1234)),
        ("nbd://[::1]:99/x", NbdAddress("x", host="::1", port=99)),
        ("nbd+unix:///disk?socket=/run/nbd.sock", NbdAddress("disk", socket="/run/nbd.sock")),
        ("nbd+unix:///?socket=nbd.sock", NbdAddress("", socket="nbd.sock")),
    ],
)
def test_nbd_urls_parse_as_doc_uri_md_says(url: str, address: NbdAddress) -> None:
    assert parse_nbd_url(url) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nbd+unix:///disk", "needs one \\?socket=PATH"),
        ("nbd+unix://host/disk?socket=s", "has no host"),
        ("nbd://h/disk?socket=s", "belongs to nbd\\+unix"),
        ("nbd://h/disk?tls-hostname=x", "unknown query parameter\\(s\\) tls-hostname"),
        ("nbd:///disk", "needs a host"),
        ("nbd://h:99999/x", "invalid port"),
    ],
)
def test_bad_nbd_urls_are_refused_naming_the_url(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        parse_nbd_url(url)
    assert info.value.filename == url


def test_nbd_over_tls_is_not_supported_yet() -> None:
    with pytest.raises(UnsupportedFeatureError, match="TLS"):
        parse_nbd_url("nbds://h/x")


# ---- against qedkit's server --------------------------------------------------------


def test_a_named_export_reads_back(tmp_path: Path) -> None:
    with NbdThreadServer(DATA, tmp_path / "s.sock", name="disk") as server:
        store = open_url(server.url, options=OPTIONS)

        async def go() -> bytes:
            out = b"".join([await store.read(p, MiB) for p in range(0, len(DATA), MiB)])
            await store.close()
            return out

        assert run(go()) == DATA
        assert store.statistics().requests < len(DATA) // (64 * KiB) // 2


def test_an_unknown_export_is_refused_naming_it(tmp_path: Path) -> None:
    with NbdThreadServer(DATA, tmp_path / "s.sock", name="disk") as server:
        store = open_url(server.url.replace("///disk", "///other"), options=OPTIONS)
        with pytest.raises(StoreError, match="no export named 'other'") as info:
            run(store.size())
        assert info.value.filename is not None and "socket=" in info.value.filename
        run(store.close())


def _with_restartable_server(
    tmp_path: Path, body: Callable[[NbdThreadServer, RemoteStore], Awaitable[None]]
) -> None:
    """Run ``body(server, store)``: a server on a unix socket in ``tmp_path`` (the
    body may stop and start it again), and a store on it that has read its first
    bytes. Both are closed afterwards, whatever the body did."""
    server = NbdThreadServer(DATA, tmp_path / "s.sock").start()
    store = open_url(server.url, options=OPTIONS)

    async def go() -> None:
        try:
            assert await store.read(0, 10) == DATA[:10]
            await body(server, store)
        finally:
            await store.close()

    try:
        run(go())
    finally:
        server.stop()


def test_a_server_that_goes_away_fails_clearly_and_works_once_back(tmp_path: Path) -> None:
    async def body(server: NbdThreadServer, store: RemoteStore) -> None:
        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreError) as info:
            await store.read(3 * MiB, 10)
        message = str(info.value)
        assert message.startswith(server.url + ": read of 65536 bytes at offset 3145728")
        assert "after 3 attempts" in message
        await asyncio.to_thread(server.start)  # back, on the same socket
        assert await store.read(3 * MiB, 10) == DATA[3 * MiB : 3 * MiB + 10]

    _with_restartable_server(tmp_path, body)


def test_an_export_whose_size_changed_across_a_reconnect_is_refused(tmp_path: Path) -> None:
    async def body(server: NbdThreadServer, store: RemoteStore) -> None:
        await asyncio.to_thread(server.stop)
        server.data = DATA + bytes(MiB)
        await asyncio.to_thread(server.start)
        with pytest.raises(StoreError, match="remote size changed from 4194304 to 5242880"):
            await store.read(3 * MiB, 10)

    _with_restartable_server(tmp_path, body)


# ---- hand-written servers -----------------------------------------------------------


async def _old_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[str]
) -> None:
    """A server that knows only NBD_OPT_EXPORT_NAME (answers every other option with
    ERR_UNSUP) and simple replies; it logs what it sees."""
    writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1))  # FIXED_NEWSTYLE only
    (flags,) = struct.unpack(">I", await reader.readexactly(4))
    log.append(f"flags {flags}")
    while True:
        magic, opt, length = struct.unpack(">QII", await reader.readexactly(16))
        assert magic == IHAVEOPT
        data = await reader.readexactly(length)
        if opt != OPT_EXPORT_NAME:
            log.append({OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY"}.get(opt, "?"))
            writer.write(struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
            continue
        assert opt == OPT_EXPORT_NAME
        log.append(f"EXPORT_NAME {data.decode()}")
        writer.write(struct.pack(">QH", len(DATA), 1) + bytes(124))
        break
    while True:
        magic, _flags, cmd, cookie, offset, length = struct.unpack(
            ">IHHQQI", await reader.readexactly(28)
        )
        assert magic == REQUEST_MAGIC
        if cmd == CMD_DISC:
            log.append("DISC")
            writer.close()
            return
        assert cmd == CMD_READ
        writer.write(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
        writer.write(DATA[offset : offset + length])


def test_a_server_without_opt_go_is_asked_with_export_name(tmp_path: Path) -> None:
    path = str(tmp_path / "old.sock")
    log: list[str] = []

    async def go() -> bytes:
        server = await asyncio.start_unix_server(lambda r, w: _old_server(r, w, log), path)
        store = open_url(f"nbd+unix:///legacy?socket={path}", options=OPTIONS)
        try:
            return await store.read(MiB, 3 * MiB)
        finally:
            await store.close()
            server.close()
            await server.wait_closed()

    assert run(go()) == DATA[MiB:]
    # no NO_ZEROES (not offered); structured replies refused: simple ones, and no map
    assert log[:4] == ["flags 1", "STRUCTURED_REPLY", "GO", "EXPORT_NAME legacy"]
    assert log[-1] == "DISC"


def test_a_server_that_never_answers_the_handshake_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)  # accepts in the kernel, never speaks
    quick = RemoteOptions(retry=RetryPolicy(attempts=2, first_delay=0.01, timeout=0.2))
    try:
        store = open_url(f"nbd+unix:///?socket={path}", options=quick)
        with pytest.raises(StoreError, match="no answer to the handshake"):
            run(store.size())
        run(store.close())
    finally:
        listener.close()


def test_something_that_is_not_an_nbd_server_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        await writer.drain()
        writer.close()

    async def go() -> None:
        server = await asyncio.start_unix_server(talk, path)
        store = open_url(f"nbd+unix:///?socket={path}", options=OPTIONS)
        try:
            with pytest.raises(StoreError, match="handshake failed: not an NBD server"):
                await store.size()
        finally:
            await store.close()
            server.close()
            await server.wait_closed()

    run(go())


# ---- structured replies, by hand ------------------------------------------------------

STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_SET_META_CONTEXT = 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
INFO_EXPORT = 0
CMD_BLOCK_STATUS = 7
FLAG_DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR = 2**15 + 1
STATE_HOLE, STATE_ZERO = 1, 2
SPARSE = bytes(64 * KiB) + pattern(64 * KiB, seed=9) + bytes(128 * KiB)  # 256 KiB
CONTEXT_ID = 77


def _chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + (
        payload
    )


async def _structured_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Structured replies and base:allocation. A READ is answered in pieces, out of
    order: the holes first, then the data from the end backwards; a READ at offset
    4096 gets an error chunk, one at 8192 a reply that covers only half of it."""
    writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    await reader.readexactly(4)

    def reply(opt: int, kind: int, data: bytes = b"") -> None:
        writer.write(struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind, len(data)) + data)

    while True:
        _, opt, length = struct.unpack(">QII", await reader.readexactly(16))
        await reader.readexactly(length)
        if opt == OPT_GO:
            reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, len(SPARSE), 1))
            reply(opt, REP_ACK)
            break
        if opt == OPT_SET_META_CONTEXT:
            reply(opt, REP_META_CONTEXT, struct.pack(">I", CONTEXT_ID) + b"base:allocation")
        reply(opt, REP_ACK)
    while True:
        _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", await reader.readexactly(28))
        if cmd == CMD_DISC:
            writer.close()
            return
        if cmd == CMD_BLOCK_STATUS:
            descriptors = [(64 * KiB, STATE_HOLE | STATE_ZERO), (64 * KiB, 0), (1 << 30, 3)]
            payload = struct.pack(">I", CONTEXT_ID) + b"".join(
                struct.pack(">II", n, f) for n, f in descriptors
            )
            writer.write(_chunk(FLAG_DONE, TYPE_BLOCK_STATUS, cookie, payload))
            continue
        if offset == 4096:
            message = b"disk on fire"
            payload = struct.pack(">IH", 5, len(message)) + message
            writer.write(_chunk(FLAG_DONE, TYPE_ERROR, cookie, payload))
            continue
        if offset == 8192:
            half = length // 2
            payload = struct.pack(">Q", offset) + SPARSE[offset : offset + half]
            writer.write(_chunk(FLAG_DONE, TYPE_OFFSET_DATA, cookie, payload))
            continue
        end = offset + length
        pieces = [(o, min(o + 16 * KiB, end)) for o in range(offset, end, 16 * KiB)]
        holes = [p for p in pieces if not any(SPARSE[p[0] : p[1]])]
        datas = [p for p in pieces if p not in holes]
        for start, stop in holes:
            writer.write(
                _chunk(0, TYPE_OFFSET_HOLE, cookie, struct.pack(">QI", start, stop - start))
            )
        for start, stop in reversed(datas):
            payload = struct.pack(">Q", start) + SPARSE[start:stop]
            writer.write(_chunk(0, TYPE_OFFSET_DATA, cookie, payload))
        writer.write(_chunk(FLAG_DONE, TYPE_NONE, cookie, b""))


def test_structured_replies_in_pieces_and_block_status_are_understood(tmp_path: Path) -> None:
    from qedkit.store.base import StoreExtent

    path = str(tmp_path / "structured.sock")

    async def go() -> None:
        server = await asyncio.start_unix_server(_structured_server, path)
        store = open_url(f"nbd+unix:///?socket={path}", options=RemoteOptions(block_size=64 * KiB))
        try:
            assert await store.read(0, len(SPARSE)) == SPARSE  # holes, then data reversed
            assert await store.extents(0, len(SPARSE)) == [
                StoreExtent(0, 64 * KiB, False),
                StoreExtent(64 * KiB, 64 * KiB, True),
                StoreExtent(128 * KiB, 128 * KiB, False),  # clipped to the export
            ]
        finally:
            await store.close()
        # error chunks and short answers (small blocks: those offsets start a request)
        store = open_url(f"nbd+unix:///?socket={path}", options=RemoteOptions(block_size=4096))
        try:
            await store.size()
            with pytest.raises(
                StoreError, match=r"answered EIO \(Input/output error\): disk on fire"
            ):
                await store.read(4096, 10)
            with pytest.raises(
                StoreError, match="answered 2048 of 4096 bytes of a READ at offset 8192"
            ):
                await store.read(8192, 10)
        finally:
            await store.close()
            server.close()
            await server.wait_closed()

    run(go())
