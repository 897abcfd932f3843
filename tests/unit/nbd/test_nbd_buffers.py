"""The READ reply buffer pool: a buffer is given out again only once nothing refers
to it any more (a reply the transport has not sent keeps it)."""

from __future__ import annotations

import mmap

from qedkit.nbd.buffers import MIN_SIZE, BufferPool


def _base(view: memoryview) -> object:
    return view.obj


def test_a_buffer_is_reused_once_its_views_are_gone() -> None:
    pool = BufferPool()
    first = pool.get(256 * 1024)
    assert isinstance(_base(first), mmap.mmap) and len(first) == 256 * 1024
    base = id(_base(first))  # (a reference would keep it in use)
    kept = first[100:200]  # a slice, as a reply chunk might be
    del first
    second = pool.get(256 * 1024)
    newest = id(_base(second))
    assert newest != base  # the slice still refers to the first buffer
    del kept, second
    third = pool.get(200 * 1024)  # same size class (256 KiB)
    assert id(_base(third)) == newest  # the newest free one: still in the CPU's caches
    fourth = pool.get(256 * 1024)
    assert id(_base(fourth)) == base  # the first, free now
    assert (pool.made, pool.reused) == (2, 2)


def test_a_reply_sent_at_once_keeps_reusing_one_buffer() -> None:
    """Replies the socket takes at once: the same buffer every time, not each of the
    pool's buffers in turn (a working set that leaves the caches)."""
    pool = BufferPool()
    held = [pool.get(256 * 1024) for _ in range(4)]  # made while in use
    bases = [id(_base(v)) for v in held]
    del held
    for _ in range(10):
        view = pool.get(256 * 1024)
        assert id(_base(view)) == bases[-1]
        del view
    assert pool.made == 4


def test_sizes_round_up_to_powers_of_two_from_the_minimum() -> None:
    pool = BufferPool()
    small = pool.get(1)
    assert len(small) == 1 and len(_base(small)) == MIN_SIZE  # type: ignore[arg-type]
    odd = pool.get(MIN_SIZE + 1)
    assert len(_base(odd)) == 2 * MIN_SIZE  # type: ignore[arg-type]
    assert pool.kept == 3 * MIN_SIZE


def test_past_the_limit_buffers_are_fresh_and_not_kept() -> None:
    pool = BufferPool(limit=2 * MIN_SIZE)
    views = [pool.get(MIN_SIZE) for _ in range(4)]  # all in use at once
    assert pool.kept == 2 * MIN_SIZE and pool.made == 2
    assert len({id(_base(v)) for v in views}) == 4
    views[0][:3] = b"abc"  # writable
    assert bytes(views[0][:3]) == b"abc"
