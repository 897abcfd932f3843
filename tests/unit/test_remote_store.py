"""The block cache of remote images (store.remote) over a source in memory: readahead,
the byte budget, coalescing, retries and what a failure leaves behind."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from remotekit import KiB, MemorySource, MiB

from qedkit.errors import InvalidRequestError, StoreError
from qedkit.store.remote import RemoteOptions, RemoteStore, RetryPolicy, TransientError

T = TypeVar("T")

AT = 256 * KiB  # an offset in block 1 (block 0 comes with the open)
FAST_RETRY = RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.004, timeout=5)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def data_of(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def store_over(data: bytes, **options: Any) -> tuple[RemoteStore, MemorySource]:
    options.setdefault("retry", FAST_RETRY)
    opts = RemoteOptions(**options)
    source = MemorySource(data, piece=opts.block_size)
    return RemoteStore(source, opts), source


# ---- readahead ----------------------------------------------------------------------


def test_a_sequential_read_issues_far_fewer_requests_than_blocks() -> None:
    data = data_of(64 * MiB)
    store, source = store_over(data)  # 256 KiB blocks: 256 of them

    async def go() -> None:
        for pos in range(0, len(data), 64 * KiB):  # cluster by cluster, as a stream job
            assert await store.read(pos, 64 * KiB) == data[pos : pos + 64 * KiB]
        await store.close()

    run(go())
    blocks = len(data) // (256 * KiB)
    stats = store.statistics()
    assert stats.bytes_fetched == len(data)  # every byte fetched once
    assert len(source.fetches) == stats.requests <= blocks // 8, stats
    assert stats.readahead_requests >= stats.requests - 2
    assert stats.block_misses <= 2  # the reader almost never waited for its own request


def test_sequential_readahead_keeps_several_requests_in_flight() -> None:
    data = data_of(32 * MiB)
    store, source = store_over(data)
    source.delay = 0.002  # a network of sorts: pipelining shows

    async def go() -> None:
        for pos in range(0, len(data), MiB):
            await store.read(pos, MiB)
        await store.close()

    run(go())
    assert source.peak_in_flight >= 2


def test_random_reads_fetch_only_the_blocks_they_touch() -> None:
    data = data_of(16 * MiB)
    store, source = store_over(data, block_size=64 * KiB)
    # every third block, shuffled: no read begins within a block of another's end
    offsets = [b * 64 * KiB + 8192 for b in range(0, len(data) // (64 * KiB), 3)]
    random.Random(1).shuffle(offsets)

    async def go() -> None:
        for off in offsets:
            assert await store.read(off, 4096) == data[off : off + 4096]
        await store.close()

    run(go())
    touched = {off // (64 * KiB) for off in offsets} - {0}  # block 0 came with the open
    assert all(length == 64 * KiB for _, length in source.fetches)
    assert len(source.fetches) == len(touched)


def test_a_random_reader_does_not_stop_a_sequential_stream() -> None:
    data = data_of(32 * MiB)
    store, source = store_over(data, block_size=64 * KiB)
    rng = random.Random(2)

    async def go() -> None:
        for pos in range(0, len(data), 64 * KiB):
            await store.read(pos, 64 * KiB)  # the stream job
            off = rng.randrange(0, len(data) // 4096) * 4096
            assert await store.read(off, 4096) == data[off : off + 4096]  # the guest
        await store.close()

    run(go())
    stream_requests = [f for f in source.fetches if f[1] > 64 * KiB]
    assert sum(n for _, n in stream_requests) >= len(data) * 3 // 4  # mostly read ahead
    assert len(source.fetches) < (len(data) // (64 * KiB)) * 3 // 2


def test_readahead_stops_at_the_end_of_an_image_of_odd_size() -> None:
    data = data_of(5 * MiB + 12345)
    store, source = store_over(data)

    async def go() -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(data):
            chunk = await store.read(pos, 100 * KiB)
            out += chunk
            pos += len(chunk)
        await store.close()
        return bytes(out)

    assert run(go()) == data  # MemorySource asserts every fetch lies inside the image
    assert source.fetches[-1][0] + source.fetches[-1][1] == len(data)


# ---- the cache ----------------------------------------------------------------------


def test_the_cache_stays_under_its_byte_budget() -> None:
    data = data_of(16 * MiB)
    budget = 1 * MiB
    store, _ = store_over(data, block_size=64 * KiB, cache_bytes=budget)
    rng = random.Random(3)

    async def go() -> None:
        for pos in range(0, len(data), 100 * KiB):  # sequential, with readahead
            await store.read(pos, 100 * KiB)
            assert store.statistics().cached_bytes <= budget
        for _ in range(300):  # and random
            off = rng.randrange(len(data))
            assert await store.read(off, 5000) == data[off : off + 5000]
            assert store.statistics().cached_bytes <= budget
        await store.close()

    run(go())
    stats = store.statistics()
    assert budget // 2 < stats.peak_cached_bytes <= budget


def test_blocks_in_the_cache_are_not_fetched_again() -> None:
    data = data_of(2 * MiB)
    store, source = store_over(data)

    async def go() -> None:
        for _ in range(3):
            assert await store.read(300 * KiB, 10) == data[300 * KiB : 300 * KiB + 10]
        await store.close()

    run(go())
    assert source.fetches == [(256 * KiB, 256 * KiB)]
    assert store.statistics().block_hits == 2


def test_concurrent_reads_of_one_block_share_one_request() -> None:
    data = data_of(2 * MiB)
    store, source = store_over(data)
    source.delay = 0.02

    async def go() -> None:
        offsets = [300 * KiB - i * 100 for i in range(10)]  # backwards: no stream to follow
        results = await asyncio.gather(*(store.read(off, 50) for off in offsets))
        for off, got in zip(offsets, results, strict=True):
            assert got == data[off : off + 50]
        await store.close()

    run(go())
    assert len(source.fetches) == 1


def test_the_first_block_comes_with_the_open() -> None:
    data = data_of(2 * MiB)
    store, source = store_over(data)

    async def go() -> None:
        assert await store.read(0, 100) == data[:100]  # a format probe
        await store.close()

    run(go())
    assert source.fetches == []
    assert store.statistics().block_hits == 1


def test_a_cancelled_reader_does_not_cancel_the_fetch_others_wait_for() -> None:
    data = data_of(2 * MiB)
    store, source = store_over(data)
    source.delay = 0.05

    async def go() -> None:
        await store.size()  # block 0 comes with the open: use block 1
        first = asyncio.ensure_future(store.read(AT, 100))
        second = asyncio.ensure_future(store.read(AT + 50, 100))
        await asyncio.sleep(0.01)
        first.cancel()
        assert await second == data[AT + 50 : AT + 150]
        with pytest.raises(asyncio.CancelledError):
            await first
        await store.close()

    run(go())
    assert len(source.fetches) == 1


def test_a_store_used_from_a_second_event_loop_still_reads() -> None:
    data = data_of(2 * MiB)
    store, _ = store_over(data)
    assert run(store.read(0, 10)) == data[:10]  # one loop (the synchronous API's, say)
    assert run(store.read(MiB, 10)) == data[MiB : MiB + 10]  # then another (a server's)
    run(store.close())


# ---- failures -----------------------------------------------------------------------


def test_transient_failures_within_the_retry_budget_are_invisible() -> None:
    data = data_of(MiB)
    store, source = store_over(data)

    async def go() -> None:
        await store.size()
        source.failures = [TransientError("HTTP 503")] * (FAST_RETRY.attempts - 1)
        assert await store.read(AT, 4096) == data[AT : AT + 4096]
        await store.close()

    run(go())
    assert store.statistics().retries == FAST_RETRY.attempts - 1


def test_transient_failures_beyond_the_budget_name_the_source_and_pass() -> None:
    data = data_of(MiB)
    store, source = store_over(data)

    async def go() -> None:
        await store.size()
        source.failures = [TransientError("HTTP 503 Service Unavailable")] * FAST_RETRY.attempts
        with pytest.raises(StoreError) as info:
            await store.read(AT, 4096)
        message = str(info.value)
        assert message.startswith("mem://disk: read of 262144 bytes at offset 262144 failed")
        assert f"after {FAST_RETRY.attempts} attempts" in message
        assert "HTTP 503" in message
        assert isinstance(info.value.__cause__, TransientError)
        assert await store.read(AT, 4096) == data[AT : AT + 4096]  # nothing is remembered
        await store.close()

    run(go())


def test_a_permanent_failure_is_not_retried() -> None:
    data = data_of(MiB)
    store, source = store_over(data)

    async def go() -> None:
        await store.size()
        source.failures = [StoreError("not found (HTTP 404)", filename="mem://disk")]
        with pytest.raises(StoreError, match="HTTP 404"):
            await store.read(AT, 10)
        await store.close()

    run(go())
    assert len(source.fetches) == 1


def test_a_failed_readahead_does_not_fail_later_reads() -> None:
    data = data_of(8 * MiB)
    store, source = store_over(data)

    async def go() -> None:
        await store.read(0, 4096)
        await store.read(256 * KiB, 4096)  # a stream: readahead starts
        assert source.fetches[-1][0] > 256 * KiB
        source.failures = [StoreError("gone", filename="mem://disk")] * 20
        await asyncio.sleep(0.01)  # the readahead fails, unseen
        source.failures = []
        assert await store.read(MiB, 4096) == data[MiB : MiB + 4096]
        await store.close()

    run(go())


def test_the_first_open_fails_fast_and_a_later_one_succeeds() -> None:
    data = data_of(MiB)
    store, source = store_over(data)
    source.open_failures = [TransientError("cannot connect: Connection refused")] * 3

    async def go() -> None:
        with pytest.raises(StoreError, match="opening failed after 2 attempts"):
            await store.size()
        assert len(source.open_failures) == 1
        source.open_failures = []
        assert await store.size() == MiB
        await store.close()

    run(go())


def test_reads_after_close_fail_clearly() -> None:
    store, _ = store_over(data_of(MiB))

    async def go() -> None:
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            await store.read(0, 1)

    run(go())


def test_options_are_checked() -> None:
    with pytest.raises(InvalidRequestError):
        RemoteOptions(block_size=3000)
    with pytest.raises(InvalidRequestError):
        RemoteOptions(block_size=MiB, cache_bytes=MiB)
    with pytest.raises(InvalidRequestError):
        RetryPolicy(attempts=0)
    assert list(RetryPolicy(attempts=5, first_delay=1, max_delay=3).delays()) == [1, 2, 3, 3]
