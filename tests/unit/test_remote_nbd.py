"""NBD remote images (store.nbdclient): URLs, the handshake, reconnection and errors,
against qedkit's own server in a thread and small hand-written servers.

Wire constants here are spelled out from proto.md, not imported from qedkit, so that a
wrong constant there cannot hide here."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from remotekit import KiB, MiB, NbdThreadServer, pattern

from qedkit.errors import StoreError, UnsupportedFeatureError
from qedkit.store.nbdclient import NbdAddress, parse_nbd_url
from qedkit.store.remote import RemoteOptions, RetryPolicy
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
OPT_EXPORT_NAME, OPT_GO = 1, 7
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


def test_a_server_that_goes_away_fails_clearly_and_works_once_back(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = NbdThreadServer(DATA, sock).start()
    store = open_url(server.url, options=OPTIONS)

    async def go() -> None:
        try:
            assert await store.read(0, 10) == DATA[:10]
            await asyncio.to_thread(server.stop)
            with pytest.raises(StoreError) as info:
                await store.read(3 * MiB, 10)
            message = str(info.value)
            assert message.startswith(server.url + ": read of 65536 bytes at offset 3145728")
            assert "after 3 attempts" in message
            await asyncio.to_thread(server.start)  # back, on the same socket
            assert await store.read(3 * MiB, 10) == DATA[3 * MiB : 3 * MiB + 10]
        finally:
            await store.close()

    try:
        run(go())
    finally:
        server.stop()


def test_an_export_whose_size_changed_across_a_reconnect_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = NbdThreadServer(DATA, sock).start()
    store = open_url(server.url, options=OPTIONS)

    async def go() -> None:
        try:
            assert await store.read(0, 10) == DATA[:10]
            await asyncio.to_thread(server.stop)
            server.data = DATA + bytes(MiB)
            await asyncio.to_thread(server.start)
            with pytest.raises(StoreError, match="remote size changed from 4194304 to 5242880"):
                await store.read(3 * MiB, 10)
        finally:
            await store.close()

    try:
        run(go())
    finally:
        server.stop()


# ---- hand-written servers -----------------------------------------------------------


async def _old_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[str]
) -> None:
    """A server that knows only NBD_OPT_EXPORT_NAME (answers GO with ERR_UNSUP) and
    simple replies; it logs what it sees."""
    writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1))  # FIXED_NEWSTYLE only
    (flags,) = struct.unpack(">I", await reader.readexactly(4))
    log.append(f"flags {flags}")
    while True:
        magic, opt, length = struct.unpack(">QII", await reader.readexactly(16))
        assert magic == IHAVEOPT
        data = await reader.readexactly(length)
        if opt == OPT_GO:
            log.append("GO")
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
    assert log[:3] == ["flags 1", "GO", "EXPORT_NAME legacy"]  # no NO_ZEROES: not offered
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
