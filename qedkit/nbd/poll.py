"""Busy-polling for the next request, as QEMU's adaptive polling does
(``qed serve --busy-poll USEC``, on by default; docs/DESIGN.md §3 has the
measurements).

Theory of operation
-------------------
At queue depth 1 a request's round trip is mostly wake-ups: the server replies, its
event loop finds nothing to do and sleeps in ``epoll_wait``, the vCPU halts, and the
client's next request has to wake it again (an inter-processor interrupt through the
hypervisor on a VM: tens of microseconds). ``BusyPoller`` spins for a short while
after replies went out, so that a client that answers quickly finds the server awake.

``arm()`` is called once a connection has sent its replies; it schedules ``spin``
for the loop's next iteration (``call_soon``: after the callbacks already due). The
spin polls every served socket with ``poll(2)`` and a zero timeout; as soon as one is
readable it returns, and the loop's own ``epoll_wait`` returns at once with that
socket: the spin never reads anything itself, so TLS, flow control and the order of
bytes are the transports' business as before. Between polls it calls
``sched_yield``, so that a client sharing the server's CPU still runs.

The window adapts (QEMU's rule, ``util/aio-posix.c``): a poll that finds a request
late in its window doubles it, up to ``max_ns``; a window that runs out is halved,
down to nothing; while it is off, two replies less than ``2 * max_ns`` apart turn it
on again. An idle connection therefore costs nothing after a few misses. A client
at queue depth 1 that needs longer than the window to answer (the usual case on the
development VM when it is idle: ~50 µs) keeps the window cycling between 8 µs and
off; measured, even those short spins take ~25% off such a round trip (a vCPU that
does not halt the moment the reply is out), which is why they are kept.

Tried and dropped: choosing whether to spin from measured gaps between the replies
and the next request (two running averages, after a spin and after sleeping, with
one reply in 16 going the other way): the gaps came out alike and it chose to
sleep, losing the gain above.
"""

from __future__ import annotations

import asyncio
import os
import select
import time

_START_NS = 8_000  # the window when polling turns (back) on
_MIN_NS = 2_000  # a window halved below this is turned off


class BusyPoller:
    """Spins for the next request on any of the registered sockets (see module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_ns: int) -> None:
        self._loop = loop
        self.max_ns = max_ns
        self.window_ns = min(_START_NS, max_ns)
        self._poll = select.poll()
        # fd -> connections using it: a closed socket's number can come back for a
        # new connection before the old one is forgotten.
        self._fds: dict[int, int] = {}
        self._armed = False
        self._last_arm = 0  # monotonic ns of the last arm() (replies sent)
        # Statistics, for tests and for tuning: spins that found a request, spins
        # whose window ran out.
        self.hits = 0
        self.misses = 0

    def add(self, fd: int) -> None:
        users = self._fds.get(fd, 0)
        self._fds[fd] = users + 1
        if not users:
            self._poll.register(fd, select.POLLIN)

    def discard(self, fd: int) -> None:
        users = self._fds.get(fd, 0)
        if users > 1:
            self._fds[fd] = users - 1
        elif users:
            del self._fds[fd]
            self._poll.unregister(fd)

    def arm(self) -> None:
        """Replies went out: spin once the loop has run what is due."""
        if self._armed or not self._fds:
            return
        if self.window_ns == 0:
            # Off: back on when replies follow each other closely enough that a
            # spin would have caught the request in between (the gap also holds the
            # wake-up a spin saves, hence twice the window).
            now = time.monotonic_ns()
            last, self._last_arm = self._last_arm, now
            if now - last > 2 * self.max_ns:
                return
            self.window_ns = min(_START_NS, self.max_ns)
        self._armed = True
        self._loop.call_soon(self.spin)

    def spin(self) -> None:
        self._armed = False
        poll = self._poll.poll
        if self._ready(poll(0)):
            return  # something is waiting already: the loop takes it
        clock = time.monotonic_ns
        start = clock()
        window = self.window_ns
        deadline = start + window
        yield_ = os.sched_yield
        while True:
            yield_()
            now = clock()
            if self._ready(poll(0)):
                self.hits += 1
                if now - start > window // 2:
                    self.window_ns = min(self.max_ns, window * 2)
                return
            if now >= deadline:
                self.misses += 1
                self._last_arm = now
                half = window // 2
                self.window_ns = half if half >= _MIN_NS else 0
                return

    def _ready(self, events: list[tuple[int, int]]) -> bool:
        """Whether ``events`` hold a readable socket; closed ones are dropped."""
        ready = False
        for fd, mask in events:
            if mask & select.POLLNVAL:  # closed under us: forget it whoever used it
                self._fds.pop(fd, None)
                self._poll.unregister(fd)
            else:
                ready = True
        return ready
