"""Read-only remote images: a block cache with readahead over a fetch function.

A :class:`RemoteStore` turns a :class:`RemoteSource` (an HTTP server answering range
requests, an NBD export: see store.http and store.nbdclient) into a
:class:`~qedkit.store.base.ByteStore`. The source knows one thing, how to fetch a
byte range; everything that makes a network image usable as a backing file lives
here, the same for every protocol.

Theory of operation
===================

*Blocks.* The remote image is cut into blocks of ``block_size`` bytes (256 KiB by
default: QEMU's curl driver reads ahead by 256 KiB too). A read is served from the
blocks that hold it; a block is fetched whole, once, and kept in an LRU cache whose
bytes never exceed ``cache_bytes``. A run of missing blocks is fetched with one
request (up to ``max_request`` bytes), and the source hands the answer back cut into
block-sized pieces, which the cache keeps as they are (no copy).

*Coalescing.* A block being fetched is *in flight*: it maps to the task fetching it,
and a second reader of the block waits for that task (behind ``asyncio.shield``, so a
reader that is cancelled does not cancel the fetch others wait for) instead of asking
again.

*Readahead* (as a kernel does it for files). The store keeps a few sequential
*streams* (``streams``, 4 by default), each where its reader's last read ended, a
window and how far ahead it has been fetched. A read that begins where a stream
ended (or up to a block later) continues that stream; any other read starts a new
candidate stream in place of the least recently used one, so a guest's random reads
do not disturb a
stream job reading the whole image. Each time a stream advances, the store tops up
what is fetched ahead of its reader to the stream's window, in requests of a quarter
window, and doubles the window (from ``readahead_min`` to ``readahead_max``, never
more than a quarter of the cache, so readahead cannot evict itself). Requests of a
quarter window keep two or three in flight while the reader waits for the oldest; a
whole window per request would leave the next one unasked until the last arrived. A
reader that
never suspends (every block already cached) still overlaps with the network: sources
start their I/O when ``fetch`` is *called* (an HTTP request goes to a worker thread, an
NBD request is written to the socket), not when the result is awaited.

*Retries.* A source raises :class:`TransientError` for what may pass (connection
refused or reset, a timeout, HTTP 5xx and 429) and StoreError for what will not (404,
416, a changed size, a broken protocol). A transient failure is tried again after
``first_delay`` seconds, doubling up to ``max_delay``, ``attempts`` times in all;
then a StoreError names the URL, the range and the last failure. Nothing is
remembered of a failure: the next read tries afresh, so reads work again once the
server is back.

*Event loops.* The cache and the in-flight table belong to one event loop; a store
used from another loop (the synchronous API's thread loop, then ``qed serve``'s)
forgets what was in flight on the old one. Cached blocks stay valid.

Failure guarantee: a failed read leaves the cache as it was (blocks that did arrive
are kept, they are correct) and the store usable. Writes always raise ReadOnlyError.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError, StoreError
from .base import Buffer, ByteStore, StoreCapabilities, StoreExtent

KiB = 1024
MiB = 1024 * KiB


class TransientError(Exception):
    """A failure of one request that is worth trying again (the connection was
    refused, reset or timed out; HTTP 5xx or 429). Raised by sources, caught by
    :class:`RemoteStore`: it never escapes a public call (after the last attempt it
    becomes a StoreError, chained from it)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a request that failed transiently is tried again."""

    attempts: int = 6  # tries in all, the first included
    first_delay: float = 0.25  # seconds before the second try; doubles each time
    max_delay: float = 8.0  # 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s of waiting by default
    timeout: float = 30.0  # seconds a connect or a read may go without progress
    # Tries of the very first connection: a server that was never reached is more
    # likely a wrong URL than a passing fault, so it fails fast (after one retry).
    first_open_attempts: int = 2

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay < 0 or self.timeout <= 0:
            raise InvalidRequestError(f"invalid retry policy {self}")

    def delays(self, attempts: int | None = None) -> Iterator[float]:
        """The waits before the second, third ... attempt (of ``attempts``)."""
        delay = self.first_delay
        for _ in range((self.attempts if attempts is None else attempts) - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Tuning of a :class:`RemoteStore`; every size in bytes."""

    block_size: int = 256 * KiB  # QEMU's curl driver reads ahead 256 KiB
    cache_bytes: int = 64 * MiB
    readahead_min: int = 1 * MiB  # first window of a stream
    # A stream keeps up to readahead_max fetched ahead, in requests of a quarter of it,
    # so that two or three are in flight while the reader waits for the oldest: one
    # request at a time halved the speed from nginx over loopback (bench/bench_remote.py).
    readahead_max: int = 16 * MiB
    max_request: int = 8 * MiB  # the largest range asked for at once (a source may lower it)
    streams: int = 4  # sequential readers followed at once
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs < 4096 or bs & (bs - 1):
            raise InvalidRequestError(f"block size {bs} is not a power of two >= 4096")
        if self.cache_bytes < 2 * bs:
            raise InvalidRequestError(f"cache of {self.cache_bytes} bytes holds < 2 blocks")
        if self.max_request < bs or self.streams < 1:
            raise InvalidRequestError(f"invalid remote options {self}")


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """What a :class:`RemoteStore` did so far (``RemoteStore.statistics()``)."""

    requests: int  # fetch calls made (each an HTTP range request or an NBD READ)
    readahead_requests: int  # of those, fetches no reader was waiting for yet
    retries: int  # of those, attempts after a transient failure
    bytes_fetched: int
    block_hits: int  # blocks a read found cached or in flight
    block_misses: int  # blocks a read had to fetch itself
    cached_bytes: int
    peak_cached_bytes: int  # the most the cache ever held


class RemoteSource(ABC):
    """One remote image, as a protocol sees it.

    ``name`` names it in every message (a URL, with any secret hidden).
    ``max_request`` may be lowered by :meth:`open` (an NBD server's maximum block
    size). Permanent failures raise StoreError naming ``name``; failures worth
    retrying raise :class:`TransientError`.
    """

    name: str
    max_request: int = 1 << 62

    @abstractmethod
    async def open(self, head: int) -> tuple[int, Sequence[bytes]]:
        """Connect; return the image's size in bytes and its first ``min(head, size)``
        bytes (as pieces, like :meth:`fetch`): every open probes the format in the
        first block, so asking for it with the size saves a round trip."""

    @abstractmethod
    def fetch(self, offset: int, length: int) -> Awaitable[Sequence[bytes]]:
        """The bytes of ``[offset, offset + length)`` (inside the image), as
        consecutive pieces whose lengths add up to ``length``; pieces of
        ``piece_size`` bytes are stored by the cache without a copy. Called from a
        coroutine; the I/O should start at the call, not when the result is awaited.
        A size different from the one :meth:`open` returned is a StoreError."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and threads; idempotent."""

    async def extents(self, offset: int, length: int) -> list[StoreExtent] | None:
        """The data and holes of ``[offset, offset + length)`` (inside the image), or
        None when the protocol cannot tell (the default)."""
        return None


class _Stream:
    """A sequential reader being followed (internal, mutable)."""

    __slots__ = ("ahead", "end", "window")

    def __init__(self, end: int, ahead: int, window: int) -> None:
        self.end = end  # the byte where the reader's last read ended
        self.ahead = ahead  # the first block not yet fetched for it
        self.window = window  # blocks to keep fetched ahead of it


_Blocks = dict[int, bytes]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done callback: mark a failure as seen (readahead nobody awaited may fail)."""
    if not fut.cancelled():
        fut.exception()


class RemoteStore(ByteStore):
    """A read-only byte store over a :class:`RemoteSource` (see the module docstring).

    The size is learnt at the first call that needs it (``size``, a read), so that
    constructing a store does no I/O. Never writes: ``capabilities.writable`` is
    False and every write raises ReadOnlyError."""

    def __init__(self, source: RemoteSource, options: RemoteOptions | None = None) -> None:
        self.source = source
        self.options = options or RemoteOptions()
        self.name = source.name
        self.capabilities = StoreCapabilities(writable=False, flush=False)
        self._bs = self.options.block_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._peak = 0
        self._inflight: dict[int, asyncio.Task[_Blocks]] = {}
        self._streams: list[_Stream] = []
        self._size: int | None = None
        self._max_blocks = self._max_window = self._min_window = 1  # set by _open
        self._opening: asyncio.Task[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._requests = self._readahead = self._retries = self._fetched = 0
        self._hits = self._misses = 0

    # ---- statistics -------------------------------------------------------------------

    def statistics(self) -> RemoteStats:
        return RemoteStats(
            requests=self._requests,
            readahead_requests=self._readahead,
            retries=self._retries,
            bytes_fetched=self._fetched,
            block_hits=self._hits,
            block_misses=self._misses,
            cached_bytes=self._cached,
            peak_cached_bytes=self._peak,
        )

    # ---- opening ----------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # tasks of another loop cannot be awaited here
            self._loop = loop
            self._inflight = {}
            self._opening = None
        return loop

    async def size(self) -> int:
        if self._size is None:
            await self._open()
        assert self._size is not None
        return self._size

    async def _open(self) -> None:
        if self._closed:
            raise StoreError("store is closed", filename=self.name)
        loop = self._bind_loop()
        if self._opening is None:
            attempts = self.options.retry.first_open_attempts
            self._opening = loop.create_task(
                self._retrying("opening", self._open_source, attempts=attempts)
            )
        task = self._opening
        try:
            size = await asyncio.shield(task)
        except BaseException:
            if task.done() and self._opening is task:
                self._opening = None  # the next call tries afresh
            raise
        if self._size is None:
            self._size = size
        self._max_blocks = max(
            1, min(self.options.max_request, self.source.max_request) // self._bs
        )
        window_cap = min(self.options.readahead_max, self.options.cache_bytes // 4)
        self._max_window = max(1, window_cap // self._bs)
        self._min_window = max(1, min(self.options.readahead_min // self._bs, self._max_window))

    async def _open_source(self) -> int:
        size, head = await self.source.open(self._bs)
        length = min(self._bs, size)
        if length:
            self._fetched += length
            for idx, data in self._split(0, length, head).items():
                self._insert(idx, data)
        return size

    async def _retrying(self, what: str, attempt: Any, *, attempts: int | None = None) -> Any:
        """``await attempt()``, again after each TransientError, per the policy."""
        policy = self.options.retry
        started = time.monotonic()
        delays = policy.delays(attempts)
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except TransientError as exc:
                delay = next(delays, None)
                if delay is None:
                    elapsed = time.monotonic() - started
                    raise StoreError(
                        f"{what} failed after {tries} attempts in {elapsed:.1f} s: {exc}",
                        filename=self.name,
                    ) from exc
            self._retries += 1
            await asyncio.sleep(delay)

    # ---- fetching ---------------------------------------------------------------------

    def _start(self, first: int, count: int, *, readahead: bool) -> asyncio.Task[_Blocks]:
        """Fetch blocks ``first .. first + count - 1`` with one request (its first
        attempt starts now) and mark them in flight."""
        assert self._size is not None and self._loop is not None
        offset = first * self._bs
        length = min(count * self._bs, self._size - offset)
        started = self._attempt(offset, length)
        task = self._loop.create_task(self._finish(first, offset, length, started))
        for idx in range(first, first + count):
            self._inflight[idx] = task

        def forget(done: asyncio.Task[_Blocks]) -> None:
            for idx in range(first, first + count):
                if self._inflight.get(idx) is done:
                    del self._inflight[idx]
            _retrieve(done)

        task.add_done_callback(forget)
        if readahead:
            self._readahead += 1
        return task

    def _attempt(self, offset: int, length: int) -> asyncio.Future[Sequence[bytes]]:
        self._requests += 1
        fut: asyncio.Future[Sequence[bytes]]
        try:
            fut = asyncio.ensure_future(self.source.fetch(offset, length))
        except Exception as exc:  # a source that fails at once still fails as a future
            assert self._loop is not None
            fut = self._loop.create_future()
            fut.set_exception(exc)
        fut.add_done_callback(_retrieve)  # an attempt abandoned by a cancelled read
        return fut

    async def _finish(
        self, first: int, offset: int, length: int, started: asyncio.Future[Sequence[bytes]]
    ) -> _Blocks:
        pending: list[asyncio.Future[Sequence[bytes]]] = [started]

        async def once() -> Sequence[bytes]:
            fut = pending.pop() if pending else self._attempt(offset, length)
            return await fut

        what = f"read of {length} bytes at offset {offset}"
        try:
            pieces = await self._retrying(what, once)
        finally:
            for fut in pending:  # never awaited (cancelled early): retrieve it
                fut.cancel()
        blocks = self._split(first, length, pieces)
        self._fetched += length
        for idx, data in blocks.items():
            self._insert(idx, data)
        return blocks

    def _split(self, first: int, length: int, pieces: Sequence[bytes]) -> _Blocks:
        """Cut a fetched range into blocks; pieces that are whole blocks are kept."""
        bs = self._bs
        if sum(len(p) for p in pieces) != length:  # a source bug, not the server's
            raise StoreError(
                f"fetch of {length} bytes at offset {first * bs} returned "
                f"{sum(len(p) for p in pieces)} bytes",
                filename=self.name,
            )
        blocks: _Blocks = {}
        if all(len(p) == bs for p in pieces[:-1]) and pieces and len(pieces[-1]) <= bs:
            for i, piece in enumerate(pieces):
                blocks[first + i] = bytes(piece)  # no copy for bytes
            return blocks
        data = b"".join(pieces)
        for i, pos in enumerate(range(0, length, bs)):
            blocks[first + i] = data[pos : pos + bs]
        return blocks

    def _insert(self, idx: int, data: bytes) -> None:
        old = self._cache.pop(idx, None)
        if old is not None:
            self._cached -= len(old)
        budget = self.options.cache_bytes
        while self._cache and self._cached + len(data) > budget:
            _, evicted = self._cache.popitem(last=False)
            self._cached -= len(evicted)
        self._cache[idx] = data
        self._cached += len(data)
        self._peak = max(self._peak, self._cached)

    def _fetch_missing(self, first: int, last: int, *, readahead: bool) -> None:
        """Start requests for the blocks of ``first .. last`` neither cached nor in
        flight, one request per contiguous run (of at most max_request bytes)."""
        idx = first
        while idx <= last:
            if idx in self._cache or idx in self._inflight:
                idx += 1
                continue
            end = idx
            while (
                end + 1 <= last
                and end + 1 - idx < self._max_blocks
                and end + 1 not in self._cache
                and end + 1 not in self._inflight
            ):
                end += 1
            self._start(idx, end - idx + 1, readahead=readahead)
            idx = end + 1

    # ---- readahead --------------------------------------------------------------------

    def _follow(self, offset: int, end: int) -> None:
        """Note a read of ``[offset, end)`` and read ahead for its stream.

        A read continues a stream if it begins where the stream's last read ended, or
        at most a block further (a stream job skips the clusters the overlay already
        has); a read of 4 KiB at random continues one of 4 streams over a 1 GiB image
        with a chance of 1 in 1000. A new candidate reads nothing ahead: the first
        read that continues it does."""
        bs = self._bs
        for stream in self._streams:
            if stream.end <= offset <= stream.end + bs:
                break
        else:
            if len(self._streams) >= self.options.streams:
                self._streams.pop(0)
            self._streams.append(_Stream(end, (end - 1) // bs + 1, self._min_window))
            return
        self._streams.remove(stream)  # most recently used last
        self._streams.append(stream)
        stream.end = end
        nxt = (end - 1) // bs + 1  # the first block after this read
        stream.ahead = max(stream.ahead, nxt)
        nblocks = -(-self._size_known() // bs)
        unit = max(1, min(stream.window // 4, self._max_blocks))
        while stream.ahead < nblocks and stream.ahead - nxt <= stream.window - unit:
            stop = min(stream.ahead + unit, nblocks)
            self._fetch_missing(stream.ahead, stop - 1, readahead=True)
            stream.ahead = stop
        stream.window = min(stream.window * 2, self._max_window)

    def _size_known(self) -> int:
        assert self._size is not None
        return self._size

    # ---- reads ------------------------------------------------------------------------

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        view = memoryview(buf).cast("B")
        size = await self.size()
        self._bind_loop()
        end = min(offset + len(view), size)
        if offset < 0:
            raise InvalidRequestError(f"read at negative offset {offset}", filename=self.name)
        if end <= offset:
            return 0
        bs = self._bs
        first, last = offset // bs, (end - 1) // bs
        for idx in range(first, last + 1):
            if idx in self._cache or idx in self._inflight:
                self._hits += 1
            else:
                self._misses += 1
        self._fetch_missing(first, last, readahead=False)  # what is needed goes out first
        self._follow(offset, end)
        pos = offset
        for idx in range(first, last + 1):
            data = self._cache.get(idx)
            if data is not None:
                self._cache.move_to_end(idx)
            else:
                task = self._inflight.get(idx)
                if task is None:  # evicted meanwhile by a tiny cache: fetch it again
                    task = self._start(idx, 1, readahead=False)
                data = (await asyncio.shield(task))[idx]
            start = pos - idx * bs
            n = min(len(data) - start, end - pos)
            view[pos - offset : pos - offset + n] = memoryview(data)[start : start + n]
            pos += n
        return end - offset

    # ---- everything else ----------------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        """The source's map when it has one (NBD base:allocation), else all data."""
        size = await self.size()
        end = min(offset + length, size)
        if end <= offset:
            return []

        async def ask() -> list[StoreExtent] | None:
            return await self.source.extents(offset, end - offset)

        found = await self._retrying(f"block status at offset {offset}", ask)
        return found if found else [StoreExtent(offset, end - offset, True)]

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self._check_writable()

    async def truncate(self, size: int) -> None:
        self._check_writable()

    async def copy_range(self, src: int, dst: int, length: int) -> None:
        self._check_writable()

    async def flush(self) -> None:
        """Nothing to flush: the store never writes."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks: set[asyncio.Future[Any]] = set(self._inflight.values())
        if self._opening is not None:
            tasks.add(self._opening)
        current = asyncio.get_running_loop()
        for task in tasks:
            if task.get_loop() is current:
                task.cancel()
        self._inflight = {}
        self._cache.clear()
        self._cached = 0
        await self.source.close()
