"""Busy-polling (qed serve --busy-poll): a spin returns as soon as a registered
socket is readable, its window adapts as QEMU's does, and it never reads anything."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from qedkit.nbd.poll import BusyPoller


class FakeLoop:
    """Records what the poller schedules (it only ever calls ``call_soon``)."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)


Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected socket pair: the server's end (registered with the poller) and
    the client's."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def poller_for(max_ns: int) -> BusyPoller:
    return BusyPoller(cast(Any, FakeLoop()), max_ns)


def run_spin(poller: BusyPoller) -> float:
    t0 = time.monotonic()
    poller.spin()
    return time.monotonic() - t0


def test_a_spin_ends_when_a_socket_is_readable_and_leaves_the_bytes(pair: Pair) -> None:
    a, b = pair
    poller = poller_for(5_000_000)
    poller.add(a.fileno())
    b.send(b"request")
    assert run_spin(poller) < 0.5
    assert a.recv(100) == b"request"  # the transport reads it, not the poller


def test_windows_that_run_out_halve_until_polling_is_off(pair: Pair) -> None:
    a, _ = pair
    poller = poller_for(64_000)
    poller.add(a.fileno())
    windows = []
    while poller.window_ns:
        windows.append(poller.window_ns)
        run_spin(poller)
    assert windows == [8000, 4000, 2000]
    assert poller.misses == 3 and poller.hits == 0


def test_close_replies_turn_polling_back_on_and_late_hits_widen_it(pair: Pair) -> None:
    a, b = pair
    poller = poller_for(64_000)
    poller.add(a.fileno())
    poller.window_ns = 0
    poller._last_arm = time.monotonic_ns()
    poller.arm()  # right after the last reply: on again
    assert poller.window_ns == 8000 and poller._armed
    assert cast(FakeLoop, poller._loop).soon == [poller.spin]
    poller._armed = False
    poller.window_ns = 2000
    b.send(b"x")
    run_spin(poller)  # found at once: not a late hit, the window stays
    assert poller.window_ns == 2000


def test_a_socket_number_shared_by_two_connections_stays_registered(pair: Pair) -> None:
    a, b = pair
    poller = poller_for(64_000)
    poller.add(a.fileno())
    poller.add(a.fileno())  # a new connection got the number of a closed one
    poller.discard(a.fileno())  # the old one is forgotten late
    b.send(b"x")
    assert poller._ready(poller._poll.poll(0))
    poller.discard(a.fileno())
    assert not poller._fds
