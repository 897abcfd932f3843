"""Reused page-aligned buffers for large READ replies and WRITE payloads.

Theory of operation
-------------------
A large READ is read from the page cache into a buffer that then goes to the socket.
A fresh buffer per reply (``os.pread``'s bytes, or a new ``mmap``) costs the kernel a
page fault, a zeroed page and a memory-cgroup charge for every 4 KiB before the copy
can start: perf put ~20% of ``qed serve``'s CPU there in nbdcopy's sequential read
(256 KiB requests), and qemu-nbd, which reuses its buffers, pays none of it.

A reply's buffer cannot simply be handed back after the send: the transport keeps the
buffers it could not send yet (uvloop's ``writelines`` queues them uncopied) until
the socket takes them. So ``BufferPool`` gives out views of its ``mmap`` buffers and
takes a buffer again only once nothing else refers to it: every view of an ``mmap``
(and every slice of one) holds one reference to it, through the buffer export, so
its reference count tells whether a reply still uses it.

Buffers come in powers of two from 64 KiB; each size keeps its buffers in a queue in
the order they were last handed out. ``get`` looks at the newest few first and reuses
the first free one: a reply the socket took at once frees its buffer right away, and
handing that one out again keeps the working set to a few buffers that stay in the
CPU's caches (a 256 KiB read from the page cache into a buffer just used took 25 us
here, into the next of 128 buffers in turn 48 us; the send out of it gains the same).
Then it looks at the oldest few, which go to the back when in use (a reply a paused
client has not taken must not hold up the reuse of the others: with only the oldest
looked at, the pool of nbdcopy's two connections grew to its limit).
When all it looked at are in use, a new buffer is made while the pool is under its
byte limit, and past it a fresh buffer is given that the pool does not keep (the
cost of a fresh buffer, never a wait).

Large WRITE payloads are received into these buffers too (the server's
``payload_buffer``): the same cost of a fresh one, the same rule for reuse (the
Write event's data, and anything the engine keeps of it, are views of the buffer).
"""

from __future__ import annotations

import collections
import mmap
import sys

MIN_SIZE = 64 * 1024  # smaller buffers are cheap to allocate (malloc, no faults)
DEFAULT_LIMIT = 32 * 1024 * 1024  # bytes kept: 2 connections x 64 x 256 KiB in flight
# A pooled buffer nobody uses is referred to by its queue, the local name in
# _free_buffer() and getrefcount's argument.
_FREE_REFS = 3
# Buffers looked at before a new one is made: one reply a slow client has not taken
# must not stop the reuse of the others (two connections, one of them paused).
_LOOK = 8


class BufferPool:
    """Page-aligned buffers of at least ``MIN_SIZE`` bytes, reused once free."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.kept = 0  # bytes of the buffers the pool holds
        self._queues: dict[int, collections.deque[mmap.mmap]] = {}
        # For tests and tuning: buffers handed out again, buffers made.
        self.reused = 0
        self.made = 0

    def get(self, length: int) -> memoryview:
        """A writable, page-aligned view of ``length`` bytes (``length`` > 0)."""
        size = max(MIN_SIZE, 1 << (length - 1).bit_length())
        queue = self._queues.get(size)
        if queue is None:
            queue = self._queues[size] = collections.deque()
        buf = _free_buffer(queue)
        if buf is not None:
            self.reused += 1
            return memoryview(buf)[:length]
        if self.kept + size > self.limit:
            return memoryview(mmap.mmap(-1, length))
        buf = mmap.mmap(-1, size)
        queue.append(buf)
        self.kept += size
        self.made += 1
        return memoryview(buf)[:length]


def _free_buffer(queue: collections.deque[mmap.mmap]) -> mmap.mmap | None:
    """A buffer of ``queue`` (in hand-out order, newest last) that nothing refers to,
    moved to the back as the newest; None if the ones looked at are all in use.
    The newest first: one handed out last and already sent is still in the CPU's
    caches, for the read into it and the send out of it. Then the oldest, each sent
    to the back when in use, so that the replies a paused client holds do not keep
    the others from being reused."""
    for i in range(1, min(len(queue), _LOOK) + 1):
        buf = queue[-i]
        if sys.getrefcount(buf) == _FREE_REFS:
            if i > 1:
                del queue[-i]
                queue.append(buf)
            return buf
    for _ in range(min(len(queue) - _LOOK, _LOOK)):
        buf = queue[0]
        queue.rotate(-1)
        if sys.getrefcount(buf) == _FREE_REFS:
            return buf
    return None
