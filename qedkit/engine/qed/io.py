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

*Copy-on-read* (``copy_on_read``, ``copy_up``): clusters read from the backing chain
are written into this image, whole (QEMU aligns copy-on-read to the cluster), as
zero clusters where they hold only zeros (QEMU issues write-zeroes for them). A fill
is an allocating write cut in its two halves (``_place_clusters``, ``_link_clusters``):
the bytes are read from the backing image first, with no lock held (that read may
be a network round trip); under the allocation lock the lookup is redone, and only
the clusters that are *still* unallocated get new clusters holding the data, while
writes to exactly those clusters stall; the data is flushed with the lock released;
under the lock again the L2 entries are written and the stall ends. A guest write
that reached a cluster while its fill was being read therefore wins (it allocated
the cluster under the lock first, and the fill skips it); one that arrives during the
flush waits for that cluster only, then lands in place on the copy. A fill commits
only if the backing image it read from is still this image's backing image.

*Group commit* (``write_batch``): consecutive allocating writes handed over
together (the NBD server's gathered writes) are placed one by one under one hold of
the lock and committed as one: NEED_CHECK once, their new clusters in one ``pwritev``
when they follow each other at the end of the file, one flush where step 3 needs it,
one update per L2 table. A single write, a group and a fill all go through the same
two halves (``_place_clusters``, ``_link_clusters``).

*Per-cluster write stalls* let a job move or fill clusters while the guest runs:
``stall_writes`` makes writes to exactly those guest clusters wait (reads and other
writes go on), after draining in-place writes already in the store on them.

*Fast paths.* Each synchronous fast path sits next to the general path it
shortcuts and shares one guard (``_fast_host``): a local store, a request inside the
image, one host-contiguous run in a cached table, no stall for writes. Anything else
returns "not now" and the caller takes the coroutine. ``write_batch_now`` (and
``write_now``, a batch of one) also allocates at once in the case steps 1 and 3 are
not needed (``_allocate_now``: no backing file, NEED_CHECK already set, end-of-file
placement, the lock free, the table cached): a run of such writes is a group, in
the same order as the general path, with synchronous writes.

Failure guarantee: if a request fails, clusters it reserved may be leaked (space,
never data); tables in memory change only after their on-disk update succeeded.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import InvalidRequestError, QedError, ReadOnlyError
from ...format.header import Header
from ...format.tables import L2_ZERO_CLUSTER
from ...store.base import Buffer
from ..base import BlockImage, Extent, ExtentKind
from ..sync import LazyLock, running_loop
from .lookup import DATA, UNALLOCATED, ZERO, QedLookup

if TYPE_CHECKING:  # asyncio itself is imported only where a wait needs it (engine.sync)
    import asyncio

# Outcomes of _write_in_place.
_WRITTEN = object()
_ALLOCATE = object()
_STALLED = object()
_ZEROS = bytes(1 << 20)  # shared source of zero bytes (1 MiB)
_ZEROS_VIEW = memoryview(_ZEROS)
# Most writes one synchronous group commit takes (_allocate_now): at most three
# buffers each, so that a run stays within one pwritev (IOV_MAX is 1024).
_GROUP_NOW = 256
# What a piece of a copy-on-read fill becomes (_fill_pieces).
_PIECE_DATA, _PIECE_ZERO, _PIECE_SKIP = 0, 1, 2


def is_zero(view: memoryview) -> bool:
    """Whether every byte of ``view`` is zero: ``bytes.startswith`` of a zero buffer
    compares with memcmp and no copy (30 GB/s here; ``memoryview == bytes`` compares
    element by element, 70x slower)."""
    n = len(view)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        if not _ZEROS.startswith(view[pos : pos + k]):
            return False
        pos += k
    return True


@dataclass(slots=True)
class _NewClusters:
    """What the first half of an allocating write placed (engine-internal)."""

    updates: dict[int, int] = field(default_factory=dict)  # L2 index -> new entry
    placed: bool = False  # data clusters were written (a flush must precede the entries)
    reused: bool = False  # some of them in reused slots inside the file
    data: int = 0
    zero: int = 0
    skipped: int = 0

    def filled(self) -> Filled:
        return Filled(self.data, self.zero, self.skipped)


@dataclass(slots=True)
class _Segments:
    """New clusters of a group, gathered for one ``pwritev`` per host-contiguous run
    (engine-internal): (host offset, buffers) in placement order."""

    runs: list[tuple[int, list[Buffer]]] = field(default_factory=list)
    end: int = -1  # host offset where the last run ends

    def add(self, host: int, length: int, buffers: list[Buffer]) -> None:
        if host == self.end:
            self.runs[-1][1].extend(buffers)
        else:
            self.runs.append((host, buffers))
        self.end = host + length


@dataclass(slots=True)
class _PendingLink:
    """A fill whose data is written but not yet linked (``FillGroup``)."""

    l1_index: int
    new: _NewClusters
    release: Callable[[], None]  # ends the write stall on its clusters
    source: BlockImage  # the backing image it was read from


@dataclass
class FillGroup:
    """Fills whose data is written, waiting for one shared flush before their L2
    entries are written (``QedImage.commit_fills``). The stream job groups its steps
    so that 2 GiB cost a few flushes instead of one per step; writes to the clusters
    of a pending fill wait until the group is committed, so commit before pausing."""

    pending: list[_PendingLink] = field(default_factory=list)
    bytes: int = 0

    def __len__(self) -> int:
        return len(self.pending)


@dataclass(frozen=True, slots=True)
class Filled:
    """What a copy-on-read fill did, in clusters: written with data, made zero
    clusters (all-zero data), skipped (allocated, zero or stalled by the time the
    fill held the allocation lock: a guest write or another fill got there first)."""

    data_clusters: int = 0
    zero_clusters: int = 0
    skipped_clusters: int = 0

    def __add__(self, other: Filled) -> Filled:
        return Filled(
            self.data_clusters + other.data_clusters,
            self.zero_clusters + other.zero_clusters,
            self.skipped_clusters + other.skipped_clusters,
        )


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes, without a copy up to 1 MiB."""
    return _ZEROS_VIEW[:n] if n <= len(_ZEROS) else memoryview(bytes(n))


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
    _alloc_lock: LazyLock
    _pread_now: Callable[[int, int], bytes] | None
    _pwrite_now: Callable[[int, Buffer], None] | None
    _pwritev_now: Callable[[int, Sequence[Buffer]], None] | None
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
        self._pwritev_now = getattr(store, "pwritev_now", None)
        self._preadinto_now = getattr(store, "preadinto_now", None)
        # Per-cluster write stalls (jobs that move clusters): guest cluster index ->
        # a future done when the cluster may be written again. See stall_writes().
        self._stalls: dict[int, asyncio.Future[None]] = {}
        # In-place writes in flight outside the allocation lock: token -> guest
        # cluster range; a mover waits for those on its clusters (stall_writes).
        self._writing: dict[int, tuple[int, int]] = {}
        self._next_write = 0
        self._write_done: asyncio.Future[None] | None = None
        # Copy-on-read (see the module docstring), and the reads of the backing image
        # in flight (a backing image is closed only once none is: drop_backing_file).
        self._copy_on_read = False
        self._backing_reads = 0
        self._backing_idle: asyncio.Future[None] | None = None

    @property
    def copy_on_read(self) -> bool:
        """Whether reads of clusters that this image leaves to its backing chain also
        copy them into this image (QEMU's copy-on-read). Setting it on a read-only
        image raises ReadOnlyError."""
        return self._copy_on_read

    @copy_on_read.setter
    def copy_on_read(self, enabled: bool) -> None:
        if enabled and self.readonly:
            raise ReadOnlyError(
                "copy-on-read writes the image: it cannot be open read-only",
                filename=self.filename,
            )
        self._copy_on_read = bool(enabled)

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
                elif self._copy_on_read and self.backing is not None:
                    await self._copy_on_read_run(run.start, dst)
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
            self._backing_reads += 1
            try:
                await backing.readinto(pos, dst[:n])
            finally:
                self._backing_reads -= 1
                idle = self._backing_idle
                if not self._backing_reads and idle is not None:
                    self._backing_idle = None
                    if not idle.done():
                        idle.set_result(None)
        if n < len(dst):
            fill_zero(dst[n:])

    async def _backing_reads_done(self) -> None:
        """Return once no read of the backing image is in flight."""
        while self._backing_reads:
            if self._backing_idle is None:
                self._backing_idle = running_loop().create_future()
            import asyncio

            await asyncio.shield(self._backing_idle)

    # ---- copy-on-read ---------------------------------------------------------------

    async def _copy_on_read_run(self, pos: int, dst: memoryview) -> None:
        """Read ``dst`` (an unallocated run at ``pos``) from the backing chain and copy
        the whole clusters it touches into this image."""
        geo = self.geo
        end = pos + len(dst)
        first = geo.start_of_cluster(pos)
        stop = min(geo.round_up(end), self.header.image_size)
        backing = self.backing
        assert backing is not None
        if first == pos and stop == end:
            await self._read_backing(pos, dst)
            await self._fill(pos, dst, backing)
            return
        view = memoryview(bytearray(stop - first))
        await self._read_backing(first, view)
        dst[:] = view[pos - first : end - first]
        await self._fill(first, view, backing)

    async def copy_up(
        self,
        offset: int,
        length: int,
        buf: memoryview | bytearray | None = None,
        group: FillGroup | None = None,
    ) -> Filled:
        """Copy ``[offset, offset + length)`` from the backing chain into this image
        (the stream job's step; copy-on-read does the same for what a guest reads).

        ``offset`` must be cluster aligned, and so must the end unless it is the image
        end. The range is read from the backing image (zeros past its end) into
        ``buf`` (``length`` bytes at least; a new buffer if None); then the clusters
        of the range that are still unallocated are written into this image (all-zero
        ones become zero clusters), and the others are left alone: see the module
        docstring for why a guest write racing the copy wins. Without a backing image
        nothing is read or written. With ``group``, the data is written and the
        entries wait in the group for ``commit_fills`` (one flush for many steps).

        Failure guarantee: a failed read of the backing image writes nothing; a
        failed write leaves every cluster either unallocated or complete (clusters
        reserved for it may leak: space, never data).
        """
        self._check_writable()
        self._check_range(offset, length)
        geo = self.geo
        end = offset + length
        if offset % geo.cluster_size or (end % geo.cluster_size and end != self.size):
            raise InvalidRequestError(
                f"copy_up of [{offset}, {end}) is not cluster aligned", filename=self.filename
            )
        backing = self.backing
        if backing is None or not length:
            return Filled()
        if buf is None:
            buf = bytearray(length)
        view = memoryview(buf).cast("B")[:length]
        if len(view) < length:
            raise InvalidRequestError(f"copy_up buffer of {len(view)} bytes < {length}")
        await self._read_backing(offset, view)
        return await self._fill(offset, view, backing, group)

    async def commit_fills(self, group: FillGroup) -> Filled:
        """Make the pending fills of ``group`` durable: one flush (their data), then
        their L2 entries, then their write stalls end. Returns the clusters that were
        skipped after all (the backing image changed meanwhile: they leak, space,
        never data). The group is empty afterwards, also when this fails."""
        pending, group.pending, group.bytes = group.pending, [], 0
        if not pending:
            return Filled()
        skipped = 0
        try:
            await self.store.flush()  # the data before the entries
            async with self._alloc_lock:
                for p in pending:
                    if self.backing is p.source:
                        await self._link_clusters(p.l1_index, p.new, flushed=True)
                    else:
                        skipped += len(p.new.updates)
        finally:
            for p in pending:
                p.release()
        return Filled(-skipped, 0, skipped) if skipped else Filled()

    async def _fill(
        self,
        offset: int,
        data: memoryview,
        source: BlockImage,
        group: FillGroup | None = None,
    ) -> Filled:
        """Commit a fill read from ``source``, piece by piece (one L2 span): under the
        allocation lock, the clusters still unallocated get new clusters holding the
        data, and writes to them stall; the data is flushed with the lock released
        (other allocations go on); under the lock again, the L2 entries are written
        and the stall ends. A fill waits for stalls on its clusters first (another
        fill, a mover). Nothing is linked once ``source`` is no longer the backing
        image (it changed meanwhile; the clusters written for it leak: space, never
        data)."""
        span = self.geo.l2_span
        bits = self._cluster_bits
        done = Filled()
        pos, end = offset, offset + len(data)
        while pos < end:
            l1_index = pos // span
            piece_end = min(end, (l1_index + 1) * span)
            piece = data[pos - offset : piece_end - offset]
            while True:
                await self._wait_unstalled(pos, piece_end)
                async with self._alloc_lock:
                    if self._stall_for(pos, piece_end) is not None:
                        continue
                    if self.backing is not source:
                        return done + Filled(skipped_clusters=-(-(end - pos) >> bits))
                    new = await self._place_clusters(l1_index, pos, piece, fill=True)
                    release = None
                    if new.placed:
                        base = l1_index * self.geo.l2_entries
                        release = await self.stall_writes(base + i for i in new.updates)
                    elif new.updates:  # zero clusters only: nothing to flush first
                        await self._link_clusters(l1_index, new)
                break
            if release is not None and group is not None:
                group.pending.append(_PendingLink(l1_index, new, release, source))
                group.bytes += piece_end - pos
            elif release is not None:
                try:
                    await self.store.flush()  # the data before the entries
                    async with self._alloc_lock:
                        if self.backing is source:
                            await self._link_clusters(l1_index, new, flushed=True)
                        else:
                            new = _NewClusters(skipped=new.skipped + len(new.updates))
                finally:
                    release()
            done += new.filled()
            pos = piece_end
        return done

    # ======================================================================
    # write
    # ======================================================================

    def write_now(self, offset: int, data: Buffer) -> bool:
        return self.write_batch_now(((offset, data),)) == 1

    def write_batch_now(self, writes: Sequence[tuple[int, Buffer]]) -> int:
        """Do at once as many of ``writes`` as can be, from the first on: in place
        where ``_fast_host`` allows, else allocating in the synchronous case
        (``_allocate_now``: a run of allocating writes committed as one group).
        Returns how many of the first writes were done; the caller sends the others,
        in order, to ``write``/``write_batch`` (a StoreError also stops here, and
        the general path then redoes the write and reports it)."""
        pwrite = self._pwrite_now
        if pwrite is None:
            return 0
        done, n = 0, len(writes)
        try:
            while done < n:
                offset, data = writes[done]
                host = self._fast_host(offset, len(data), True)
                if host >= 0:
                    pwrite(host, data)
                    done += 1
                    continue
                taken = self._allocate_now(writes, done)
                if not taken:
                    break
                done += taken
        except QedError:
            pass  # this write is redone by the general path, which reports the error
        return done

    def _allocate_now(self, writes: Sequence[tuple[int, Buffer]], start: int) -> int:
        """The synchronous allocating write, for the run of allocating writes from
        ``writes[start]`` on (at most ``_GROUP_NOW``), committed as a group:
        ``_allocating_writes`` in the case that needs neither a flush nor a read nor
        a wait, done with synchronous store writes and no coroutine. That case: a
        local store; no backing file (copy-on-write fills zeros, no flush between
        data and entry) and the end-of-file placement policy (no reused slot);
        NEED_CHECK already set by an earlier allocation of this dirty period; no
        allocating request in progress (the lock is free) and no stall; each write
        inside one L2 span whose table is cached, every cluster it touches
        unallocated or a zero cluster, none touched by an earlier write of the
        group. Returns how many writes the group took; 0: nothing done.

        Order on disk, as ``_allocating_writes``: the new clusters of the group
        (data and zero fill) in one ``pwritev`` per host-contiguous run, then the
        L2 sectors (``write_entries_now``). Raises StoreError if a write fails (the
        clusters reserved are leaked; tables whose update did not reach the store
        are unchanged, and the general path redoes the whole group: what did
        reach it is then written again in place, which is harmless as none of
        these writes has been answered)."""
        pwritev = self._pwritev_now
        pwrite = self._pwrite_now
        header = self.header
        if (
            pwritev is None
            or pwrite is None
            or self._stalls
            or self.readonly
            or self._alloc_lock.locked()
            or not header.needs_check
            or self._has_backing
            or self.alloc.home_allocation
        ):
            return 0
        size = header.image_size
        bits = self._cluster_bits
        shift = self._l1_shift
        mask = self._l2_mask
        place = self.alloc.place_at_end
        runs: list[tuple[int, list[Buffer]]] = []  # host-contiguous runs of new clusters
        run_end = -1
        tables: dict[int, tuple[array[int], dict[int, int]]] = {}  # l1 index -> updates
        planned: set[int] = set()  # guest clusters the group allocates
        taken = 0
        for k in range(start, min(len(writes), start + _GROUP_NOW)):
            offset, data = writes[k]
            n = len(data)
            end = offset + n
            if n <= 0 or offset < 0 or end > size:
                break
            l1_index = offset >> shift
            if (end - 1) >> shift != l1_index:
                break
            entry = tables.get(l1_index)
            if entry is None:
                l2_offset = self._l1[l1_index]
                table = self._cache.get(l2_offset) if l2_offset else None
                if table is None:
                    break
                entry = tables[l1_index] = (table, {})
            table, updates = entry
            first = offset >> bits
            count = ((end - 1) >> bits) - first + 1
            index = first & mask
            if count == 1:  # (the common case, without a generator)
                if table[index] > L2_ZERO_CLUSTER or first in planned:
                    break  # allocated (or damaged: the general path says how), or ours
                planned.add(first)
            else:
                clusters = range(first, first + count)
                if any(table[i] > L2_ZERO_CLUSTER for i in range(index, index + count)):
                    break
                if not planned.isdisjoint(clusters):
                    break
                planned.update(clusters)
            host = place(first, count)
            head = offset - (first << bits)
            tail = ((first + count) << bits) - end
            buffers = runs[-1][1] if host == run_end else []
            if host != run_end:
                runs.append((host, buffers))
            if head:
                buffers.append(_zeros(head))
            buffers.append(data)
            if tail:
                buffers.append(_zeros(tail))
            run_end = host + (count << bits)
            for i in range(count):
                updates[index + i] = host + (i << bits)
            taken += 1
        if not taken:
            return 0
        for host, buffers in runs:
            if len(buffers) == 1:  # whole clusters (4 KiB writes, 4 KiB clusters)
                pwrite(host, buffers[0])
            else:
                pwritev(host, buffers)
        for l1_index, (table, updates) in tables.items():
            if updates:  # (a table looked up for a write that ended the group)
                self.tables.write_entries_now(l1_index, table, updates, pwrite)
        return taken

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

    # ---- group commit --------------------------------------------------------------

    async def write_batch(self, writes: Sequence[tuple[int, Buffer]]) -> list[QedError | None]:
        """``write`` each of ``writes`` in turn, except that consecutive allocating
        writes are committed together (``_allocating_writes``). Returns, per write,
        None or the error it raised (the others still run)."""
        out: list[QedError | None] = [None] * len(writes)
        i, n = 0, len(writes)
        while i < n:
            offset, data = writes[i]
            try:
                if self.contiguous_host(offset, offset + len(data)) < 0:
                    self._check_writable()
                    async with self._alloc_lock:
                        done = await self._allocating_writes(writes, i, out)
                    if done:
                        i += done
                        continue
                await self.write(offset, data)
            except QedError as exc:
                out[i] = exc
            i += 1
        return out

    async def _allocating_writes(
        self, writes: Sequence[tuple[int, Buffer]], start: int, out: list[QedError | None]
    ) -> int:
        """The allocating writes from ``writes[start]`` on, as many as can share the
        work, committed as a group. Caller holds the allocation lock (stalls are set
        only under it).

        Each write is placed on its own (``_place_clusters``: in place where
        allocated, new clusters whole), its new clusters gathered rather than
        written; then, for the whole group, the order of the module docstring:
        NEED_CHECK once (the first placement sets it), the new clusters in one
        ``pwritev`` per host-contiguous run, one flush where step 3 needs it, and one
        update per L2 table touched.

        Returns how many writes the group took (0 when ``writes[start]`` is not one
        to group: invalid, across an L2 span, stalled, all in place; the caller then
        writes it alone); their outcomes (None or the error) are set in ``out``. A
        group ends before a write that is not one to group, or that touches a
        cluster the group allocates already."""
        bits = self.geo.cluster_bits
        span = self.geo.l2_span
        size = self.header.image_size
        planned: set[int] = set()  # guest clusters the group allocates
        group: dict[int, _NewClusters] = {}  # l1 index -> its new entries
        members: dict[int, list[int]] = {}  # l1 index -> the writes with entries in it
        segments = _Segments()
        taken = 0
        for k in range(start, len(writes)):
            offset, data = writes[k]
            view = memoryview(data).cast("B")
            end = offset + len(view)
            if not view or offset < 0 or end > size:
                break
            l1_index = offset // span
            if (end - 1) // span != l1_index or self._stall_for(offset, end) is not None:
                break
            first, last = offset >> bits, (end - 1) >> bits
            if taken and not planned.isdisjoint(range(first, last + 1)):
                break
            table = await self.get_l2(l1_index)
            runs = self.table_runs(table, l1_index, offset, end)
            if all(run.kind is DATA for run in runs):
                break
            new = group.setdefault(l1_index, _NewClusters())
            await self._place_clusters(
                l1_index, offset, view, runs=runs, new=new, segments=segments
            )
            planned.update(range(first, last + 1))
            members.setdefault(l1_index, []).append(k)
            taken += 1
        if not taken:
            return 0
        try:
            for host, buffers in segments.runs:
                await self.store.writev(host, buffers)
            await self._flush_placed(*group.values())
        except QedError as exc:
            for k in range(start, start + taken):
                out[k] = exc
            return taken
        for l1_index, new in group.items():
            try:
                await self._link_clusters(l1_index, new, flushed=True)
            except QedError as exc:
                for k in members[l1_index]:
                    out[k] = exc
        return taken

    # ---- the allocating write --------------------------------------------------------

    async def _allocating_write(self, l1_index: int, pos: int, data: memoryview) -> None:
        """Write ``data`` at ``pos`` (inside one L2 span), allocating clusters for the
        unallocated and zero clusters it touches. Caller holds ``_alloc_lock`` and
        checked that no cluster of the range is stalled."""
        new = await self._place_clusters(l1_index, pos, data)
        await self._link_clusters(l1_index, new)

    async def _place_clusters(
        self,
        l1_index: int,
        pos: int,
        data: memoryview,
        *,
        fill: bool = False,
        runs: list[Extent] | None = None,
        new: _NewClusters | None = None,
        segments: _Segments | None = None,
    ) -> _NewClusters:
        """The first half of an allocating write: allocated clusters of the range are
        written in place, the others get new clusters written whole (copy-on-write
        head, data, tail); returns the L2 entries to write. Caller holds the lock.

        ``fill`` (copy-on-read; ``data`` cluster aligned): only clusters that are
        unallocated and not stalled are written, all-zero ones as zero clusters; the
        others are left as they are (the guest got there first).

        A group (``_allocating_writes``) passes the ``runs`` it looked up, the
        ``new`` entries it collects for the table, and ``segments``: the new
        clusters are then gathered there for the group to write, not written."""
        geo = self.geo
        bits = geo.cluster_bits
        if runs is None:
            runs = self.table_runs(await self.get_l2(l1_index), l1_index, pos, pos + len(data))
        if new is None:
            new = _NewClusters()
        for run in runs:
            chunk = data[run.start - pos : run.start - pos + run.length]
            if fill and run.kind is not UNALLOCATED:
                new.skipped += (geo.round_up(run.end) - run.start) >> bits
                continue
            if run.kind is DATA:
                assert run.host_offset is not None
                await self.store.write(run.host_offset, chunk)
                continue
            pieces = self._fill_pieces(run, chunk) if fill else [(run.start, run.end, chunk, 0)]
            for start, end, piece, what in pieces:
                first = geo.start_of_cluster(start)
                stop = geo.round_up(end)
                count = (stop - first) >> bits
                index = geo.l2_index(first)
                if what == _PIECE_SKIP:
                    new.skipped += count
                    continue
                await self._mark_need_check()
                if what == _PIECE_ZERO:
                    for k in range(count):
                        new.updates[index + k] = L2_ZERO_CLUSTER
                    new.zero += count
                    continue
                host, in_file = await self.alloc.place_data(
                    self.tables.source(), first >> bits, count
                )
                new.reused = new.reused or in_file
                new.placed = True
                buffers: list[Buffer] = [piece]
                if first < start:
                    buffers.insert(0, await self._cow_fill(first, start, run.kind))
                if end < stop:
                    buffers.append(await self._cow_fill(end, stop, run.kind))
                if segments is None:
                    await self.store.writev(host, buffers)
                else:
                    segments.add(host, count << bits, buffers)
                for k in range(count):
                    new.updates[index + k] = host + (k << bits)
                new.data += count
        return new

    async def _link_clusters(
        self, l1_index: int, new: _NewClusters, *, flushed: bool = False
    ) -> None:
        """The second half: make the entries of ``_place_clusters`` durable, after a
        flush where a lost data write could otherwise show something else than the
        cluster's old content (backing data hidden by a hole, or stale bytes of a
        reused slot), unless the caller ``flushed`` since. Caller holds the lock."""
        if not new.updates:
            return
        if not flushed:
            await self._flush_placed(new)
        await self._update_l2(l1_index, await self.get_l2(l1_index), new.updates)

    async def _flush_placed(self, *news: _NewClusters) -> None:
        """Step 3 of the order: flush the new clusters ``news`` placed before their
        entries are written, where a lost data write could show something else than
        the cluster's old content (backing data hidden by a hole, or stale bytes of a
        reused slot)."""
        if any(n.placed for n in news) and (self._has_backing or any(n.reused for n in news)):
            await self.store.flush()

    def _fill_pieces(
        self, run: Extent, chunk: memoryview
    ) -> list[tuple[int, int, memoryview, int]]:
        """An unallocated run of a fill cut into pieces of whole clusters (start, end,
        bytes, what): data, all zeros, or stalled (a mover's: left alone)."""
        cs = self.geo.cluster_size
        stalls = self._stalls
        out: list[tuple[int, int, memoryview, int]] = []
        start = run.start
        while start < run.end:
            stop = min(start - start % cs + cs, run.end)
            piece = chunk[start - run.start : stop - run.start]
            if stalls and (start >> self._cluster_bits) in stalls:
                what = _PIECE_SKIP
            else:
                what = _PIECE_ZERO if is_zero(piece) else _PIECE_DATA
            if out and out[-1][3] == what:
                a, _, _, _ = out[-1]
                out[-1] = (a, stop, chunk[a - run.start : stop - run.start], what)
            else:
                out.append((start, stop, piece, what))
            start = stop
        return out

    async def _cow_fill(self, start: int, end: int, kind: ExtentKind) -> Buffer:
        """Bytes for ``[start, end)`` of a cluster being allocated: zeros for a zero
        cluster (never the backing file: QEMU gets this wrong), else what the
        backing chain holds there, up to the image size."""
        n = end - start
        if n <= 0:
            return b""
        size = self.header.image_size
        if kind is ZERO or self.backing is None or start >= min(size, self.backing.size):
            return _zeros(n)
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
        fut: asyncio.Future[None] = running_loop().create_future()
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
                    self._write_done = running_loop().create_future()
                import asyncio

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
        await self._allocating_write(l1_index, pos, _zeros(end - pos))

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
