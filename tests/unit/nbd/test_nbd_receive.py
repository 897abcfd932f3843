"""Where the server reads a connection's bytes into (``receive_target``): a stream of
large WRITEs is read mostly straight into the payloads' own buffers, whatever the
sizes the socket hands over, and the events are those of the general path."""

from __future__ import annotations

import random

import pytest
from nbd_wire import CMD_READ, CMD_WRITE, MiB, drain, fast_feed, feed, request, transmission

from qedkit.nbd import Event, Export, ServerConnection
from qedkit.nbd.server import receive_target

KiB = 1024
EXPORT = Export("disk", 64 * MiB, max_block_size=4 * MiB)


def connection() -> ServerConnection:
    return transmission(EXPORT, structured=True)


def receive(message: bytes, rng: random.Random, short: float) -> tuple[list[Event], int]:
    """Drive ``receive_target`` as the transport does: each recv fills its target
    from the stream, or (with probability ``short``) less of it. Returns the events
    and how many bytes were read directly into payload buffers."""
    conn = connection()
    recv = memoryview(bytearray(256 * KiB))
    events: list[Event] = []
    direct = False
    pos = direct_bytes = 0
    while pos < len(message):
        target, direct = receive_target(conn, recv, direct)
        count = min(len(target), len(message) - pos)
        if rng.random() < short:
            count = rng.randrange(1, count + 1)
        target[:count] = message[pos : pos + count]
        pos += count
        if direct:
            direct_bytes += count
            if conn.received_into_window(count):
                events += drain(conn)
            continue
        events += fast_feed(conn, target[:count].tobytes())
    return events, direct_bytes


@pytest.mark.parametrize("size", [64 * KiB, 256 * KiB, MiB, 4 * MiB])
@pytest.mark.parametrize("short", [0.0, 0.3])
def test_a_stream_of_large_writes_is_read_mostly_in_place(size: int, short: float) -> None:
    rng = random.Random(size)
    payloads = [rng.randbytes(size) for _ in range(4)]
    message = b"".join(
        request(CMD_WRITE, cookie=i, offset=i * size % EXPORT.size, payload=payloads[i % 4])
        for i in range(48)
    )
    events, direct_bytes = receive(message, rng, short)
    assert events == feed(connection(), message)
    payload_bytes = 48 * size
    # not read directly: the first read of the connection, the start of each payload
    # (read with its header) and, when recvs come back short, a short rest now and then
    if short:
        assert direct_bytes >= 0.75 * payload_bytes
    else:
        assert direct_bytes >= payload_bytes - 256 * KiB - 48 * 4 * KiB


def test_small_requests_are_read_in_full_size_chunks() -> None:
    rng = random.Random(1)
    message = b"".join(
        request(CMD_WRITE, cookie=i, offset=4 * KiB * i, payload=rng.randbytes(4 * KiB))
        if i % 3
        else request(CMD_READ, cookie=i, offset=0, length=4 * KiB)
        for i in range(300)
    )
    conn = connection()
    recv = memoryview(bytearray(256 * KiB))
    target, direct = receive_target(conn, recv, False)
    assert (len(target), direct) == (256 * KiB, False)
    events, direct_bytes = receive(message, rng, 0.0)
    assert direct_bytes == 0 and events == feed(connection(), message)


@pytest.mark.parametrize("size", [4 * KiB, 16 * KiB, 40 * KiB])
def test_small_writes_cut_by_a_read_do_not_shorten_the_next(size: int) -> None:
    """A read that ends inside a small payload is followed by a full-size one: reading
    only that rest and a little more would read about one request per recv."""
    rng = random.Random(size)
    message = b"".join(
        request(CMD_WRITE, cookie=i, offset=size * i, payload=rng.randbytes(size))
        for i in range(200)
    )
    conn = connection()
    recv = memoryview(bytearray(256 * KiB))
    conn.receive_requests(message[: 6 * (size + 28) - 1000], 64, MiB)
    window = conn.receive_window()
    assert window is not None and len(window) == 1000  # the sixth payload's rest waits
    target, direct = receive_target(conn, recv, False)
    assert (len(target), direct) == (256 * KiB, False)
