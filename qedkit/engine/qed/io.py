"""Guest I/O of a QED image: read, write, write-zeroes, discard, and write stalls.

References: qed_spec "Cluster allocation", "Zero clusters"; QEMU block/qed.c
(qed_aio_read_data, qed_aio_write_data, qed_aio_write_alloc, qed_aio_write_inplace,
qed_co_pwrite_zeroes).

Theory of operation
-------------------
*Reads* look up runs (engine.qed.lookup) and read DATA runs from the store, fill
ZERO runs with zeros and read UNALLOCATED runs from the backing image (zeros past its
end, or when there is none).

*Writes* to clusters that are all allocated go in place with no metadata and no
lock. Anything else is an *allocating write*, serialized by the image's allocation
lock (QEMU does the same), which redoes its lookup once it holds the lock. The order
that makes a power loss harmless:

1. without a backing file, set NEED_CHECK in the header and flush, once per dirty
   period, before the first allocation;
2. write the new clusters whole in one ``pwritev``: copy-on-write head (zeros for a
   zero cluster, never backing data; else what the backing chain holds), data, tail;
3. with a backing file (or into a reused slot that may hold stale bytes), flush, so
   that no L2 entry reaches the disk before its data;
4. update the L2 table (engine.qed.tables: changed sectors, or a new table written
   and flushed before the L1 entry that links it).

*Per-cluster write stalls* let a job move or fill clusters while the guest runs:
``stall_writes`` makes writes to exactly those guest clusters wait (reads and other
writes go on), after draining in-place writes already in the store on them.

*Fast paths.* Each synchronous fast path sits next to the general path it
shortcuts and shares one guard (``_fast_host``): a local store, a request inside the
image, one host-contiguous run in a cached table, no stall for writes. Anything else
returns "not now" and the caller takes the coroutine.

Failure guarantee: if a request fails, clusters it reserved may be leaked (space,
never data); tables in memory change only after their on-disk update succeeded.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable, Iterable

from ...errors import InvalidRequestError
from ...format.header import Header
from ...format.tables import L2_ZERO_CLUSTER
from ...store.base import Buffer
from ..base import ExtentKind
from .lookup import DATA, UNALLOCATED, ZERO, QedLookup

# Outcomes of _write_in_place.
_WRITTEN = object()
_ALLOCATE = object()
_STALLED = object()
_ZEROS = bytes(1 << 20)  # shared source of zero bytes (1 MiB)


def fill_zero(view: memoryview) -> None:
    """Set every byte of ``view`` to zero without allocating more than 1 MiB."""
    n = len(view)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos : pos + k] = _ZEROS[:k]
        pos += k


class QedIO(QedLookup):
    """Guest I/O methods of QedImage (a mixin over the image's state)."""

    header: Header
    _alloc_lock: asyncio.Lock
    _pread_now: Callable[[int, int], bytes] | None
    _pwrite_now: Callable[[int, Buffer], None] | None
    _preadinto_now: Callable[[int, memoryview], int] | None

    async def _mark_need_check(self) -> None:
        """Set NEED_CHECK before an allocation (the image's header code)."""
        raise NotImplementedError

    @property
    def _has_backing(self) -> bool:
        """A backing file is attached or recorded: the write ordering must then keep a
        hole from ever exposing backing data (and NEED_CHECK is not used)."""
        return self.backing is not None or self.header.has_backing_file

    def _init_io(self) -> None:
        store = self.store
        self._pread_now = getattr(store, "pread_now", None)
        self._pwrite_now = getattr(store, "pwrite_now", None)
        self._preadinto_now = getattr(store, "preadinto_now", None)
        # Per-cluster write stalls (jobs that move clusters): guest cluster index ->
        # a future done when the cluster may be written again. See stall_writes().
        self._stalls: dict[int, asyncio.Future[None]] = {}
        # In-place writes in flight outside the allocation lock: token -> guest
        # cluster range; a mover waits for those on its clusters (stall_writes).
        self._writing: dict[int, tuple[int, int]] = {}
        self._next_write = 0
        self._write_done: asyncio.Future[None] | None = None

    # ======================================================================
    # read
    # ======================================================================

    def _fast_host(self, offset: int, length: int, write: bool) -> int:
        """The one guard of the synchronous fast paths: the host offset of
        ``[offset, offset + length)`` if it can be served at once (non-empty, inside
        the image, one host-contiguous run of a cached table; for a write, writable
        and no stall anywhere), else -1."""
        if length <= 0 or offset < 0 or offset + length > self.header.image_size:
            return -1
        if write and (self._stalls or self.readonly):
            return -1
        return self.contiguous_host(offset, offset + length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        pread = self._pread_now
        if pread is None:
            return None
        host = self._fast_host(offset, length, False)
        if host < 0:
            return None
        data = pread(host, length)
        return data if len(data) == length else None

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        preadinto = self._preadinto_now
        if preadinto is None:
            return False
        host = self._fast_host(offset, len(view), False)
        return host >= 0 and preadinto(host, view) == len(view)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if view:
            host = self.contiguous_host(offset, offset + len(view))
            if host >= 0:
                n = await self.store.readinto(host, view)
                if n < len(view):
                    fill_zero(view[n:])
                return
        span = self.geo.l2_span
        pos, end = offset, offset + len(view)
        while pos < end:
            l1_index = pos // span
            piece_end = min(end, (l1_index + 1) * span)
            table = await self.get_l2(l1_index)
            for run in self.table_runs(table, l1_index, pos, piece_end):
                dst = view[run.start - offset : run.start - offset + run.length]
                if run.kind is DATA:
                    assert run.host_offset is not None
                    n = await self.store.readinto(run.host_offset, dst)
                    if n < len(dst):
                        fill_zero(dst[n:])
                elif run.kind is ZERO:
                    fill_zero(dst)
                else:
                    await self._read_backing(run.start, dst)
            pos = piece_end

    async def _read_backing(self, pos: int, dst: memoryview, limit: int | None = None) -> None:
        """Guest bytes below this layer: the backing image, zeros past its end (or past
        ``limit``), zeros if there is none."""
        backing = self.backing
        stop = backing.size if backing is not None else 0
        if limit is not None:
            stop = min(stop, limit)
        n = max(0, min(len(dst), stop - pos))
        if n:
            assert backing is not None
            await backing.readinto(pos, dst[:n])
        if n < len(dst):
            fill_zero(dst[n:])

    # ======================================================================
    # write
    # ======================================================================

    def write_now(self, offset: int, data: Buffer) -> bool:
        pwrite = self._pwrite_now
        if pwrite is None:
            return False
        host = self._fast_host(offset, len(data), True)
        if host < 0:
            return False
        pwrite(host, data)
        return True

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        span = self.geo.l2_span
        pos, end = offset, offset + len(view)
        while pos < end:
            l1_index = pos // span
            piece_end = min(end, (l1_index + 1) * span)
            piece = view[pos - offset : piece_end - offset]
            while True:
                await self._wait_unstalled(pos, piece_end)
                outcome = await self._write_in_place(l1_index, pos, piece)
                if outcome is _WRITTEN:
                    break
                if outcome is _ALLOCATE:
                    async with self._alloc_lock:
                        # Stalls are only set under this lock: none can appear
                        # while the allocating write runs.
                        if self._stall_for(pos, piece_end) is None:
                            await self._allocating_write(l1_index, pos, piece)
                            break
            pos = piece_end

    async def _write_in_place(self, l1_index: int, pos: int, data: memoryview) -> object:
        """Write ``data`` if every cluster it touches is allocated: _WRITTEN; else
        _ALLOCATE (nothing written), or _STALLED if a stall appeared meanwhile."""
        host = self.contiguous_host(pos, pos + len(data))
        if host >= 0:
            token = self._begin_write(pos, pos + len(data))
            try:
                await self.store.write(host, data)
            finally:
                self._end_write(token)
            return _WRITTEN
        table = await self.get_l2(l1_index)
        if table is None:
            return _ALLOCATE
        runs = self.table_runs(table, l1_index, pos, pos + len(data))
        for run in runs:
            if run.kind is not DATA:
                return _ALLOCATE
        if self._stall_for(pos, pos + len(data)) is not None:
            return _STALLED  # loading the table let a mover in
        token = self._begin_write(pos, pos + len(data))
        try:
            for run in runs:
                assert run.host_offset is not None
                await self.store.write(
                    run.host_offset, data[run.start - pos : run.start - pos + run.length]
                )
        finally:
            self._end_write(token)
        return _WRITTEN

    async def _allocating_write(self, l1_index: int, pos: int, data: memoryview) -> None:
        """Write ``data`` at ``pos`` (inside one L2 span), allocating clusters for the
        unallocated and zero clusters it touches. Caller holds ``_alloc_lock`` and
        checked that no cluster of the range is stalled."""
        geo = self.geo
        table = await self.get_l2(l1_index)
        updates: dict[int, int] = {}
        reused = False
        for run in self.table_runs(table, l1_index, pos, pos + len(data)):
            chunk = data[run.start - pos : run.start - pos + run.length]
            if run.kind is DATA:
                assert run.host_offset is not None
                await self.store.write(run.host_offset, chunk)
                continue
            first = geo.start_of_cluster(run.start)
            stop = geo.round_up(run.end)
            count = (stop - first) >> geo.cluster_bits
            await self._mark_need_check()
            host, in_file = await self.alloc.place_data(
                self.tables.source(), first >> geo.cluster_bits, count
            )
            reused = reused or in_file
            head = await self._cow_fill(first, run.start, run.kind)
            tail = await self._cow_fill(run.end, stop, run.kind)
            await self.store.writev(host, [head, chunk, tail])
            index = geo.l2_index(first)
            for k in range(count):
                updates[index + k] = host + (k << geo.cluster_bits)
        if updates:
            # Data before the entries that point to it, where a lost data write could
            # otherwise show something else than the cluster's old content: backing
            # data (hidden by a hole), or stale bytes of a reused slot.
            if self._has_backing or reused:
                await self.store.flush()
            await self._update_l2(l1_index, table, updates)

    async def _cow_fill(self, start: int, end: int, kind: ExtentKind) -> Buffer:
        """Bytes for ``[start, end)`` of a cluster being allocated: zeros for a zero
        cluster (never the backing file: QEMU gets this wrong), else what the
        backing chain holds there, up to the image size."""
        n = end - start
        if n <= 0:
            return b""
        size = self.header.image_size
        if kind is ZERO or self.backing is None or start >= min(size, self.backing.size):
            return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
        buf = bytearray(n)
        await self._read_backing(start, memoryview(buf), limit=size)
        return buf

    async def _update_l2(
        self, l1_index: int, table: array[int] | None, updates: dict[int, int]
    ) -> None:
        """Make ``updates`` (L2 index -> entry) durable in order: into the existing
        table's changed sectors, or into a new table (engine.qed.tables)."""
        if table is not None:
            await self.tables.write_entries(l1_index, table, updates)
            return
        await self._mark_need_check()
        await self.tables.add_table(l1_index, updates)

    # ---- per-cluster write stalls ---------------------------------------------------

    @property
    def stalled_clusters(self) -> list[int]:
        """Guest clusters whose writes wait at the moment (sorted)."""
        return sorted(self._stalls)

    def _stall_for(self, pos: int, end: int) -> asyncio.Future[None] | None:
        """The stall covering a guest cluster of ``[pos, end)``, if any."""
        stalls = self._stalls
        if not stalls:
            return None
        first = pos >> self._cluster_bits
        last = (end - 1) >> self._cluster_bits
        if last - first < len(stalls):
            for cluster in range(first, last + 1):
                fut = stalls.get(cluster)
                if fut is not None:
                    return fut
            return None
        for cluster, fut in stalls.items():
            if first <= cluster <= last:
                return fut
        return None

    async def _wait_unstalled(self, pos: int, end: int) -> None:
        while (fut := self._stall_for(pos, end)) is not None:
            await fut

    async def stall_writes(self, clusters: Iterable[int]) -> Callable[[], None]:
        """Make writes to guest ``clusters`` wait until the returned function is called;
        returns once no in-place write that began before is still in flight on them.

        For jobs that move clusters. The caller must hold ``allocations_paused()``
        while calling this, so that no allocating write is half done on a cluster that
        becomes stalled; writes to other clusters, and reads, go on. Raises
        InvalidRequestError if a cluster is stalled already (one mover at a time).
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        taken = list(dict.fromkeys(clusters))
        for cluster in taken:
            if cluster in self._stalls:
                raise InvalidRequestError(
                    f"guest cluster {cluster} is already being moved", filename=self.filename
                )
        for cluster in taken:
            self._stalls[cluster] = fut

        # An in-place write that looked its clusters up before the stall and is
        # still in the store (a store that suspends) would land after our copy.
        def release() -> None:
            for cluster in taken:
                if self._stalls.get(cluster) is fut:
                    del self._stalls[cluster]
            if not fut.done():
                fut.set_result(None)

        wanted = set(taken)
        try:
            while any(first <= c <= last for first, last in self._writing.values() for c in wanted):
                if self._write_done is None:
                    self._write_done = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._write_done)
        except BaseException:
            release()
            raise
        return release

    def _begin_write(self, pos: int, end: int) -> int:
        """Record an in-place write in flight (for stall_writes); returns its token."""
        token = self._next_write
        self._next_write += 1
        self._writing[token] = (pos >> self._cluster_bits, (end - 1) >> self._cluster_bits)
        return token

    def _end_write(self, token: int) -> None:
        del self._writing[token]
        done = self._write_done
        if done is not None:
            self._write_done = None
            if not done.done():
                done.set_result(None)

    # ======================================================================
    # zeroing, discard
    # ======================================================================

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range. Whole clusters that are unallocated become zero clusters
        (entry 1); whole allocated clusters are zeroed in place (their space released
        when ``unmap``); partial clusters get real zeros, skipped where the cluster
        already reads as zeros."""
        self._check_writable()
        self._check_range(offset, length)
        await self._zero_range(offset, offset + length, unmap)

    async def _zero_range(self, pos: int, end: int, unmap: bool) -> None:
        """Zeroing works under the allocation lock, piece by piece (one L2 span): it
        may allocate, and holding the lock keeps movers (stalls) out meanwhile."""
        geo = self.geo
        while pos < end:
            l1_index = pos // geo.l2_span
            piece_end = min(end, (l1_index + 1) * geo.l2_span)
            while True:
                await self._wait_unstalled(pos, piece_end)
                async with self._alloc_lock:
                    if self._stall_for(pos, piece_end) is not None:
                        continue
                    head_end = min(piece_end, geo.round_up(pos))
                    tail_start = max(head_end, geo.start_of_cluster(piece_end))
                    if head_end > pos:
                        await self._zero_partial(l1_index, pos, head_end)
                    if tail_start > head_end:
                        await self._zero_clusters(l1_index, head_end, tail_start, unmap)
                    if piece_end > tail_start:
                        await self._zero_partial(l1_index, tail_start, piece_end)
                    break
            pos = piece_end

    async def _zero_partial(self, l1_index: int, pos: int, end: int) -> None:
        """Zero part of one cluster (or a whole last cluster cut by the image end).
        Caller holds the allocation lock."""
        if pos == end:
            return
        table = await self.get_l2(l1_index)
        (run,) = self.table_runs(table, l1_index, pos, end)
        if run.kind is ZERO or (run.kind is UNALLOCATED and self._below_is_zero(pos, end)):
            return
        if run.kind is DATA:
            assert run.host_offset is not None
            await self.store.write_zeroes(run.host_offset, end - pos)
            return
        await self._allocating_write(l1_index, pos, memoryview(_ZEROS)[: end - pos])

    def _below_is_zero(self, pos: int, end: int) -> bool:
        return self.backing is None or pos >= self.backing.size

    async def _zero_clusters(self, l1_index: int, pos: int, end: int, unmap: bool) -> None:
        """Zero whole clusters ``[pos, end)`` inside one L2 span. Caller holds the
        allocation lock."""
        table = await self.get_l2(l1_index)
        updates: dict[int, int] = {}
        for run in self.table_runs(table, l1_index, pos, end):
            if run.kind is DATA:
                assert run.host_offset is not None
                await self.store.write_zeroes(run.host_offset, run.length, punch=unmap)
            elif run.kind is UNALLOCATED:
                first = self.geo.l2_index(run.start)
                for k in range(run.length >> self.geo.cluster_bits):
                    updates[first + k] = L2_ZERO_CLUSTER
        if updates:
            await self._mark_need_check()
            await self._update_l2(l1_index, table, updates)

    async def discard(self, offset: int, length: int) -> None:
        """Release the host space of whole allocated clusters in the range by punching
        holes in the file. The L2 entries stay: the clusters read as zeros (never as
        backing data), ``qemu-img check`` sees no leak, and the file's allocated size
        shrinks. Partial clusters, zero and unallocated clusters are left alone."""
        self._check_writable()
        self._check_range(offset, length)
        start = self.geo.round_up(offset)
        end = self.geo.start_of_cluster(offset + length)
        if end <= start:
            return
        while True:
            await self._wait_unstalled(start, end)
            async with self._alloc_lock:
                if self._stall_for(start, end) is not None:
                    continue
                for run in await self.runs(start, end - start):
                    if run.kind is DATA:
                        assert run.host_offset is not None
                        await self.store.discard(run.host_offset, run.length)
                return
