"""Hostile and broken clients, packed by hand on raw sockets (proto.md).

Each test lets a misbehaving client do its worst, then proves that a well-behaved
client (qemu-io, and a raw client that was connected all along) still reads and
writes correctly, and that the image checks clean and equals its shadow at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from e2ekit import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    IHAVEOPT,
    MAX_PAYLOAD,
    Closed,
    KiB,
    MiB,
    RawClient,
    Served,
    ServerFactory,
    Shadow,
    assert_same_bytes,
    pattern,
    qemu_io,
    rss_kib,
)
from qedtest import Qemu

Disk = Callable[..., tuple[Path, Shadow]]
SIZE = 16 * MiB


def assert_still_serves(qemu: Qemu, server: Served, shadow: Shadow, seed: int) -> None:
    """A fresh qemu-io client writes and reads back a pattern, and the whole export
    read through the server equals the shadow."""
    offset = (seed % 12) * MiB + 4096
    qemu_io(
        server.uri(),
        f"write -P {seed:#x} {offset} 256k",
        f"read -P {seed:#x} {offset} 256k",
    )
    shadow.fill(offset, 256 * KiB, seed)
    result = qemu.img("compare", "-f", "raw", "-F", "raw", server.uri(), shadow.path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_raw_client_works(client: RawClient, shadow: Shadow, offset: int) -> None:
    data = pattern(offset, 64 * KiB)
    client.write(offset, data)
    shadow.write(offset, data)
    assert_same_bytes(client.read(offset, 64 * KiB), data)


def start(serve: ServerFactory, disk: Disk) -> tuple[Served, Shadow]:
    image, shadow = disk(SIZE)
    return serve(image, "--shared", "4"), shadow


# ---- the handshake --------------------------------------------------------------------


def greeted(server: Served) -> RawClient:
    client = RawClient(server.address)
    client.greeting()
    return client


HANDSHAKE_ABUSE: dict[str, Callable[[RawClient], None]] = {
    "bad option magic": lambda c: c.send(
        struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES)
        + struct.pack(">QII", 0x0BADC0DE0BADC0DE, 7, 0)
    ),
    "unknown client flags": lambda c: c.send(struct.pack(">I", 0xFFFFFFFF)),
    "garbage bytes instead of the client flags": lambda c: c.send(random.Random(7).randbytes(4096)),
    "NBD_OPT_EXPORT_NAME of an export that does not exist": lambda c: c.send(
        struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES)
        + struct.pack(">QII", IHAVEOPT, 1, 4)
        + b"nope"
    ),
    "an option claiming 4 GiB of data": lambda c: c.send(
        struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES)
        + struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF)
        + b"x" * 100_000
    ),
}


def send_flood(
    sock: socket.socket, burst: bytes, pid: int, *, seconds: float, stalled: float
) -> tuple[int, int]:
    """Send ``burst`` again and again for ``seconds`` without reading anything, or until
    the server has not taken a byte for ``stalled`` seconds (it stopped reading: what
    a bounded server must do). Returns the bytes sent and the server's peak RSS (KiB)."""
    sock.setblocking(False)
    sent = peak = 0
    deadline = time.monotonic() + seconds
    blocked_since: float | None = None
    while time.monotonic() < deadline:
        try:
            sent += sock.send(burst)
            blocked_since = None
        except BlockingIOError:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if now - blocked_since > stalled:
                break
            time.sleep(0.01)
        peak = max(peak, rss_kib(pid))
    return sent, peak


@pytest.mark.parametrize("abuse", list(HANDSHAKE_ABUSE))
def test_handshake_abuse_drops_that_client_and_others_are_served(
    abuse: str, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    bystander = server.client()  # in transmission all along
    hostile = greeted(server)
    try:
        HANDSHAKE_ABUSE[abuse](hostile)
        if abuse == "an option claiming 4 GiB of data":
            # a server may skip the data unread: the client gives up, the server must
            # forget it without having buffered anything
            hostile.close()
        else:
            assert hostile.closed_by_server(), f"{abuse}: the server kept the connection"
    finally:
        hostile.close()
    assert_raw_client_works(bystander, shadow, 13 * MiB)
    assert_still_serves(qemu, server, shadow, 0x21)
    bystander.disconnect()
    server.finish(qemu, shadow)


def test_a_client_that_connects_and_says_nothing_does_not_block_others(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    silent = [RawClient(server.address) for _ in range(2)]  # never read, never write
    try:
        assert_still_serves(qemu, server, shadow, 0x22)
    finally:
        for client in silent:
            client.close()
    server.finish(qemu, shadow)


# ---- transmission -----------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_bad_request_magic_drops_that_client_only(
    tcp: bool, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(SIZE)
    server = serve(image, "--shared", "4", tcp=tcp)
    bystander = server.client()
    hostile = server.client()
    hostile.request(CMD_READ, 1, 0, 4096, magic=0x12345678)
    assert hostile.closed_by_server(), "a request with a bad magic must end the session"
    hostile.close()
    assert_raw_client_works(bystander, shadow, 2 * MiB)
    assert_still_serves(qemu, server, shadow, 0x23)
    bystander.disconnect()
    server.finish(qemu, shadow)


def test_garbage_during_transmission_drops_that_client_only(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    bystander = server.client()
    hostile = server.client()
    junk = random.Random(11).randbytes(256 * KiB)
    assert junk[:4] != struct.pack(">I", 0x25609513)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        hostile.send(junk)  # the server may hang up before it all went out
    assert hostile.closed_by_server()
    hostile.close()
    assert_raw_client_works(bystander, shadow, 3 * MiB)
    assert_still_serves(qemu, server, shadow, 0x24)
    bystander.disconnect()
    server.finish(qemu, shadow)


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 64 * MiB, 0xFFFFFFFF])
def test_write_over_32_mib_ends_that_session_and_writes_nothing(
    length: int, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    bystander = server.client()
    hostile = server.client()
    hostile.request(CMD_WRITE, 77, 0, length)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        hostile.send(b"\xee" * MiB)  # the start of a payload nobody should buffer
    # A hard disconnect, possibly after an error reply for that request.
    hostile.sock.settimeout(10)
    try:
        head = hostile.recv_exact(16)
    except (Closed, ConnectionResetError):
        head = b""
    if head:
        magic, error, cookie = struct.unpack(">IIQ", head)
        assert (magic, cookie) == (0x67446698, 77) and error != 0, (magic, error, cookie)
    assert hostile.closed_by_server(), "an oversized WRITE must end the session"
    hostile.close()
    assert_same_bytes(bystander.read(0, MiB), bytes(MiB))
    assert_raw_client_works(bystander, shadow, 4 * MiB)
    assert_still_serves(qemu, server, shadow, 0x25)
    bystander.disconnect()
    server.finish(qemu, shadow)


def test_requests_past_the_end_are_refused_and_the_session_goes_on(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    client = server.client()
    assert client.size == SIZE
    base = pattern(5, 8192)
    client.write(SIZE - 8192, base)
    shadow.write(SIZE - 8192, base)
    # WRITE crossing the end, with its whole payload sent: ENOSPC, payload skipped
    reply = client.call(CMD_WRITE, SIZE - 4096, payload=b"\x99" * 8192)
    assert reply.error == ENOSPC
    # WRITE larger than the export (but under 32 MiB): refused, its 20 MiB skipped
    reply = client.call(CMD_WRITE, 0, payload=b"\x98" * (20 * MiB))
    assert reply.error == ENOSPC
    # WRITE far past the end, and at an offset whose end overflows 64 bits
    assert client.call(CMD_WRITE, 1 << 62, payload=b"\x97" * 512).error == ENOSPC
    assert client.call(CMD_WRITE, (1 << 64) - 1, payload=b"\x96" * 2).error == ENOSPC
    assert client.call(CMD_WRITE_ZEROES, SIZE - 512, 1024).error == ENOSPC
    # READ past the end: EINVAL (and no payload follows the error reply)
    assert client.call(CMD_READ, SIZE - 100, 200).error == EINVAL
    assert client.call(CMD_READ, SIZE, 1).error == EINVAL
    assert client.call(CMD_READ, (1 << 64) - 1, 1).error == EINVAL
    assert client.call(CMD_TRIM, SIZE - 512, 1024).error == EINVAL
    # the session is intact: the stream is still in step and nothing was written
    assert client.read(SIZE - 8192, 8192) == base
    assert_same_bytes(client.read(0, MiB), bytes(MiB))
    assert_raw_client_works(client, shadow, 6 * MiB)
    assert_still_serves(qemu, server, shadow, 0x26)
    client.disconnect()
    server.finish(qemu, shadow)


@pytest.mark.parametrize("command", [99, 0xFFFF, 8])
def test_unknown_command_gets_einval_and_the_session_goes_on(
    command: int, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    client = server.client()
    assert client.call(command, 0, 4096).error == EINVAL
    # BLOCK_STATUS without a negotiated meta context is refused the same way
    assert client.call(CMD_BLOCK_STATUS, 0, 4096).error == EINVAL
    assert_raw_client_works(client, shadow, 7 * MiB)
    assert_still_serves(qemu, server, shadow, 0x27)
    client.disconnect()
    server.finish(qemu, shadow)


@pytest.mark.parametrize("how", ["close", "reset", "half a request header"])
def test_client_vanishing_mid_write_writes_nothing(
    how: str, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    server, shadow = start(serve, disk)
    old = pattern(9, MiB)
    setup = server.client()
    setup.write(8 * MiB, old)
    shadow.write(8 * MiB, old)
    setup.disconnect()
    hostile = server.client()
    if how == "half a request header":
        hostile.send(struct.pack(">IHHQ", 0x25609513, 0, CMD_WRITE, 5))
    else:
        hostile.request(CMD_WRITE, 5, 8 * MiB, MiB)
        hostile.send(b"\x5c" * (300 * KiB))  # of the 1 MiB promised
    time.sleep(0.2)
    if how == "reset":  # an abortive close: RST instead of FIN
        hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    hostile.close()
    time.sleep(0.2)
    check = server.client()
    assert_same_bytes(check.read(8 * MiB, MiB), old, "a partial WRITE payload reached the image")
    check.disconnect()
    assert_still_serves(qemu, server, shadow, 0x28)
    server.finish(qemu, shadow)


@pytest.mark.parametrize(
    ("allocated", "tcp"),
    [(True, False), (False, True)],
    ids=["allocated-over-unix", "unallocated-over-tcp"],
)
def test_flooding_client_that_never_reads_replies_cannot_grow_server_memory(
    allocated: bool, tcp: bool, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(64 * MiB)
    server = serve(image, "--shared", "4", tcp=tcp)
    if allocated:  # reads of allocated clusters take the server's fast path
        qemu_io(server.uri(), "write -P 0x42 0 32M")
        shadow.fill(0, 32 * MiB, 0x42)
    assert_still_serves(qemu, server, shadow, 0x29)  # warm up before the baseline
    baseline = rss_kib(server.pid)

    flood = server.client()
    request = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, MAX_PAYLOAD)
    sent, peak = send_flood(flood.sock, request * 64, server.pid, seconds=3.0, stalled=1.0)
    peak = max(peak, baseline)
    requests = sent // len(request)
    asked = requests * MAX_PAYLOAD
    # the flood asked for far more than the server may hold
    assert asked > 1 << 30, f"only {requests} requests went out"
    for _ in range(20):
        peak = max(peak, rss_kib(server.pid))
        time.sleep(0.025)
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 256, f"RSS grew by {growth_mib:.0f} MiB for {asked >> 20} MiB asked"

    # the flooder is still connected; everyone else is served
    assert_still_serves(qemu, server, shadow, 0x2A)
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    flood.close()
    time.sleep(0.2)
    assert_still_serves(qemu, server, shadow, 0x2B)
    server.finish(qemu, shadow)


def test_option_flood_without_reading_replies_cannot_grow_server_memory(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """NBD_OPT_INFO again and again during the handshake, replies never read."""
    server, shadow = start(serve, disk)
    baseline = rss_kib(server.pid)
    flood = greeted(server)
    flood.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    option = struct.pack(">QII", IHAVEOPT, 6, 6) + struct.pack(">IH", 0, 0)  # INFO ""
    sent, peak = send_flood(flood.sock, option * 1000, server.pid, seconds=2.0, stalled=0.5)
    peak = max(peak, baseline)
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 128, f"RSS grew by {growth_mib:.0f} MiB for {sent // len(option)} options"
    assert_still_serves(qemu, server, shadow, 0x2D)
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    flood.close()
    server.finish(qemu, shadow)


def test_read_over_the_maximum_block_size_gets_einval(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(64 * MiB)
    server = serve(image)
    client = server.client()
    assert client.call(CMD_READ, 0, MAX_PAYLOAD + 1).error == EINVAL
    assert client.call(CMD_READ, 0, 0xFFFFFFFF).error == EINVAL
    assert_same_bytes(client.read(0, MAX_PAYLOAD), bytes(MAX_PAYLOAD))  # the maximum is fine
    client.disconnect()
    assert_still_serves(qemu, server, shadow, 0x2E)
    server.finish(qemu, shadow)


def test_writes_sent_before_disconnect_are_all_applied(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """proto.md, NBD_CMD_DISC: the server MUST handle all outstanding requests. The
    client pipelines 100 writes and a DISC and never reads a reply."""
    server, shadow = start(serve, disk)
    client = server.client()
    for cookie in range(1, 101):
        data = pattern(cookie, 64 * KiB)
        client.request(CMD_WRITE, cookie, cookie * 100 * KiB, payload=data)
        shadow.write(cookie * 100 * KiB, data)
    client.request(CMD_DISC, 0)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed_by_server()
    client.close()
    assert_still_serves(qemu, server, shadow, 0x2F)
    server.finish(qemu, shadow)


def test_cookie_reuse_and_zero_length_requests_are_answered(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """Odd but legal: the same cookie twice in flight, zero-length requests."""
    server, shadow = start(serve, disk)
    client = server.client()
    data = os.urandom(4096)
    client.request(CMD_WRITE, 9, 0, payload=data)
    client.request(CMD_WRITE, 9, 4096, payload=data)
    replies = [client.reply(), client.reply()]
    assert [(r.cookie, r.error) for r in replies] == [(9, 0), (9, 0)]
    shadow.write(0, data + data)
    assert client.call(CMD_READ, 100, 0).error == 0
    assert client.call(CMD_WRITE, 100, 0).error == 0
    assert_same_bytes(client.read(0, 8192), data + data)
    client.disconnect()
    assert_still_serves(qemu, server, shadow, 0x2C)
    server.finish(qemu, shadow)
