"""The QED driver: an open QED image with reads, writes, zeroing and block status.

Theory of operation
-------------------
*Lookup.* The L1 table lives in memory for the life of the image; L2 tables come
through a write-through LRU cache (engine.l2cache). ``_table_runs`` turns one L2
table and a guest range into runs of DATA / ZERO / UNALLOCATED clusters, merging
neighbours whose host clusters are contiguous. That one primitive serves read,
write, zeroing, block status and the jobs.

*Allocation* happens at ``_file_end``: the file length rounded down to a whole
cluster at open, advanced by each allocation (QEMU's rule; bytes after the last
whole cluster are overwritten). There is no free list. Allocating requests take
``_alloc_lock``, one at a time for the whole image (QEMU does the same), and redo
their lookup once they hold it; reads and writes to allocated clusters never take it.

*Write ordering* (what makes a power loss harmless):

1. without a backing file, set NEED_CHECK in the header and flush, once per dirty
   period, before the first allocation;
2. write the new data clusters whole (the request's data plus copy-on-write fill:
   zeros, or the backing image's bytes for a cluster that was unallocated);
3. with a backing file, flush, so that no L2 entry can reach the disk before the
   data it points to (without one, an entry to unwritten data reads zeros, which is
   what the cluster held before, and the open-time check covers the rest);
4. update the L2 table: an existing table has only the changed 512-byte sectors
   rewritten; a new table is written whole and flushed before
5. the L1 entry pointing to it is written.

NEED_CHECK is cleared by ``flush`` when no allocating request is in flight and on
``close``, each time after a flush, so the flag is clear only when the metadata on
disk is complete. Opening read-write an image with the flag set runs check and
repair first (engine.check); a read-only open never writes.

*Failure guarantee.* If a request fails, clusters it reserved may be leaked (space,
never data); tables in memory change only after their on-disk update succeeded.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections.abc import Callable, Iterable
from dataclasses import replace

from ..errors import (
    BackingFileError,
    CorruptImageError,
    InvalidRequestError,
    UnsupportedFeatureError,
)
from ..format.geometry import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_TABLE_SIZE,
    SECTOR_SIZE,
    Geometry,
    is_valid_cluster_size,
    is_valid_table_size,
    qemu_max_image_size,
)
from ..format.header import (
    HEADER_SIZE_BYTES,
    KNOWN_AUTOCLEAR,
    QEMU_MAX_BACKING_NAME,
    AutoclearFeature,
    Feature,
    Header,
    encode_backing_name,
)
from ..format.tables import (
    L2_ZERO_CLUSTER,
    new_table,
    pack_table,
    unpack_table,
)
from ..store.base import Buffer, ByteStore
from .base import BlockImage, Extent, ExtentKind, ImageInfo
from .l2cache import DEFAULT_BUDGET, L2Cache, StaleLoad
from .layout import META, ClusterMap
from .layout import data_start as layout_data_start

DATA = ExtentKind.DATA
ZERO = ExtentKind.ZERO
UNALLOCATED = ExtentKind.UNALLOCATED

ENTRIES_PER_SECTOR = SECTOR_SIZE // 8  # table entries rewritten together
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


def full_backing_filename(image_filename: str, backing_name: str) -> str:
    """Resolve a stored backing name as QEMU does: absolute names and URLs as they are,
    relative names against the directory of the image (not the working directory).
    A name holding a NUL byte cannot name a file: BackingFileError."""
    if "\0" in backing_name:
        raise BackingFileError(f"backing file name {backing_name!r} contains a NUL byte")
    if os.path.isabs(backing_name) or "://" in backing_name:
        return backing_name
    return os.path.join(os.path.dirname(image_filename), backing_name)


class QedImage(BlockImage):
    format_name = "qed"

    def __init__(
        self,
        store: ByteStore,
        header: Header,
        header_area: bytes,
        l1: array[int],
        *,
        filename: str,
        readonly: bool,
        backing: BlockImage | None,
        file_end: int,
        cache_budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.store = store
        self.header = header
        self.header_area = header_area
        self.geo: Geometry = header.geometry
        self.filename = filename
        self.readonly = readonly
        self.backing = backing
        self.backing_filename = header.backing_filename(header_area)
        self._l1 = l1
        self._cache = L2Cache(self.geo.table_bytes, cache_budget)
        self._file_end = file_end
        self._alloc_lock = asyncio.Lock()
        self._closed = False
        # Per-cluster write stalls (jobs that move clusters): guest cluster index ->
        # a future done when the cluster may be written again. See stall_writes().
        self._stalls: dict[int, asyncio.Future[None]] = {}
        # In-place writes in flight outside the allocation lock: token -> guest
        # cluster range; a mover waits for those on its clusters (stall_writes).
        self._writing: dict[int, tuple[int, int]] = {}
        self._next_write = 0
        self._write_done: asyncio.Future[None] | None = None
        # Ownership of host clusters, kept current on every allocation once a job or
        # the home allocation policy needs it (engine.layout).
        self.cluster_map: ClusterMap | None = None
        self.home_allocation = bool(header.autoclear_features & AutoclearFeature.HOME_ALLOCATION)
        self.data_start = layout_data_start(self)
        self._pread_now: Callable[[int, int], bytes] | None = getattr(store, "pread_now", None)
        self._pwrite_now: Callable[[int, Buffer], None] | None = getattr(store, "pwrite_now", None)
        self._preadinto_now: Callable[[int, memoryview], int] | None = getattr(
            store, "preadinto_now", None
        )
        # Geometry constants of the hot path, as plain attributes.
        geo = self.geo
        self._cluster_bits = geo.cluster_bits
        self._cluster_mask = geo.cluster_size - 1
        self._l2_mask = geo.l2_entries - 1
        self._l1_shift = geo.cluster_bits + geo.l2_bits
        self._header_bytes = geo.header_bytes

    # ======================================================================
    # open / create
    # ======================================================================

    @staticmethod
    async def read_header(store: ByteStore) -> tuple[Header, bytes]:
        """Read and validate the header; returns it with the header area bytes
        (cluster 0 .. header_size, for the backing name). Never writes."""
        size = await store.size()
        first = await store.read(0, 4096)
        header = Header.parse(first, size)
        area_len = min(header.geometry.header_bytes, size)
        area = first if area_len <= len(first) else await store.read(0, area_len)
        return header, area

    @classmethod
    async def open(
        cls,
        store: ByteStore,
        header: Header,
        header_area: bytes,
        *,
        backing: BlockImage | None,
        readonly: bool,
        filename: str | None = None,
        cache_budget: int = DEFAULT_BUDGET,
        repair: bool = True,
    ) -> QedImage:
        """Finish opening once the header is validated and the backing chain is open.

        Read-write opens clear unknown autoclear bits and, if NEED_CHECK is set,
        check and repair the image before returning (``repair=False`` skips this,
        for ``qed check`` itself). A read-only open never writes a byte.
        """
        geo = header.geometry
        size = await store.size()
        file_end = size - size % geo.cluster_size
        l1 = unpack_table(
            await store.read_exact(header.l1_table_offset, geo.table_bytes, "L1 table")
        )
        img = cls(
            store,
            header,
            header_area,
            l1,
            filename=filename or store.name,
            readonly=readonly,
            backing=backing,
            file_end=file_end,
            cache_budget=cache_budget,
        )
        if readonly:
            return img
        if header.autoclear_features & ~KNOWN_AUTOCLEAR:
            # Unknown autoclear bits mean a newer writer's extra data may be stale:
            # clear them before any other write.
            await img._write_header(
                replace(header, autoclear_features=header.autoclear_features & KNOWN_AUTOCLEAR),
                flush=True,
            )
        if header.needs_check and repair:
            from .check import RepairMode, check_image

            # As QEMU: an image that could not be checked must not be written
            # (allocations could land on clusters a damaged table still uses), so a
            # store error fails the open (strict).
            await check_image(img, repair=RepairMode.ALL, strict=True)
        return img

    @staticmethod
    def validate_create_options(
        size: int, cluster_size: int, table_size: int, backing_name: str | None
    ) -> None:
        """Raise InvalidRequestError unless QEMU could open the image these make."""
        if not is_valid_cluster_size(cluster_size):
            raise InvalidRequestError(
                f"invalid cluster_size {cluster_size}: must be a power of two from 4096 to 67108864"
            )
        if not is_valid_table_size(table_size):
            raise InvalidRequestError(
                f"invalid table_size {table_size}: must be a power of two from 1 to 16"
            )
        if table_size == 1:
            raise InvalidRequestError(
                "table_size 1 is valid QED but QEMU cannot open such images; use 2 or more"
            )
        if size < 0 or size % SECTOR_SIZE:
            raise InvalidRequestError(f"invalid image size {size}: must be a multiple of 512")
        limit = qemu_max_image_size(cluster_size, table_size)
        if size > limit:
            raise InvalidRequestError(
                f"image size {size} exceeds the maximum {limit} that QEMU accepts for "
                f"cluster_size {cluster_size} and table_size {table_size}"
            )
        if backing_name is not None:
            n = len(encode_backing_name(backing_name))
            if n > QEMU_MAX_BACKING_NAME or HEADER_SIZE_BYTES + n > cluster_size:
                raise InvalidRequestError(
                    f"backing file name of {n} bytes does not fit in the header "
                    f"(at most {min(QEMU_MAX_BACKING_NAME, cluster_size - HEADER_SIZE_BYTES)})"
                )

    @classmethod
    async def format_store(
        cls,
        store: ByteStore,
        size: int,
        *,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        table_size: int = DEFAULT_TABLE_SIZE,
        backing_name: str | None = None,
        backing_raw: bool = False,
        home_allocation: bool = False,
    ) -> Header:
        """Write a new empty image into ``store`` (which should be empty): the header
        cluster (with the backing name at offset 64) and a zeroed L1 table right after
        it, as QEMU lays them out. The store is flushed before returning."""
        cls.validate_create_options(size, cluster_size, table_size, backing_name)
        features = 0
        name = b""
        if backing_name is not None and backing_name != "":
            name = encode_backing_name(backing_name)
            features |= Feature.BACKING_FILE
            if backing_raw:
                features |= Feature.BACKING_FORMAT_NO_PROBE
        header = Header(
            cluster_size=cluster_size,
            table_size=table_size,
            header_size=1,
            features=features,
            compat_features=0,
            autoclear_features=int(AutoclearFeature.HOME_ALLOCATION) if home_allocation else 0,
            l1_table_offset=cluster_size,
            image_size=size,
            backing_filename_offset=HEADER_SIZE_BYTES if name else 0,
            backing_filename_size=len(name),
        )
        cluster0 = bytearray(cluster_size)
        packed = header.pack()
        cluster0[: len(packed)] = packed
        cluster0[HEADER_SIZE_BYTES : HEADER_SIZE_BYTES + len(name)] = name
        await store.truncate(0)
        await store.writev(0, [cluster0, bytes(table_size * cluster_size)])
        await store.flush()
        return header

    # ======================================================================
    # properties
    # ======================================================================

    @property
    def size(self) -> int:
        return self.header.image_size

    @property
    def cluster_size(self) -> int:
        return self.geo.cluster_size

    @property
    def file_end(self) -> int:
        """The allocation pointer: where the next cluster will be placed."""
        return self._file_end

    @property
    def l1_table(self) -> array[int]:
        """The in-memory L1 table (read-only use, please)."""
        return self._l1

    @property
    def cache(self) -> L2Cache:
        return self._cache

    def allocations_paused(self) -> asyncio.Lock:
        """``async with img.allocations_paused():`` holds off allocating writes (they
        wait) while reads and in-place writes go on: a stable view of the tables for
        a job. Not reentrant."""
        return self._alloc_lock

    # ======================================================================
    # lookup
    # ======================================================================

    def _corrupt(self, message: str, offset: int, field: str) -> CorruptImageError:
        return CorruptImageError(message, filename=self.filename, offset=offset, field=field)

    async def get_l2(self, l1_index: int) -> array[int] | None:
        """The L2 table for ``l1_index`` (None when the L1 entry is 0)."""
        l2_offset = self._l1[l1_index]
        if l2_offset == 0:
            return None
        table = self._cache.get(l2_offset)
        if table is not None:
            return table
        if not self.geo.is_valid_table_offset(l2_offset, self._file_end):
            where = self.header.l1_table_offset + 8 * l1_index
            raise self._corrupt(
                f"L1 entry {l1_index} at offset {where} points to an invalid L2 table "
                f"offset {l2_offset:#x}",
                where,
                "l1_entry",
            )
        while True:
            generation = self._cache.generation(l2_offset)
            data = await self.store.read_exact(l2_offset, self.geo.table_bytes, "L2 table")
            try:
                return self._cache.offer(l2_offset, unpack_table(data), generation)
            except StaleLoad:
                continue

    def _table_runs(
        self, table: array[int] | None, l1_index: int, pos: int, end: int
    ) -> list[Extent]:
        """Runs of ``[pos, end)`` (inside one L2 span) by kind; DATA runs are
        host-contiguous and carry the host offset of their first byte."""
        if table is None:
            return [Extent(pos, end - pos, UNALLOCATED)]
        geo = self.geo
        bits = geo.cluster_bits
        cs = geo.cluster_size
        mask = geo.l2_entries - 1
        base = l1_index * geo.l2_span
        i = (pos >> bits) & mask
        last = ((end - 1) >> bits) & mask
        runs: list[Extent] = []
        while i <= last:
            entry = table[i]
            j = i + 1
            if entry > L2_ZERO_CLUSTER:
                expect = entry + cs
                while j <= last and table[j] == expect:
                    j += 1
                    expect += cs
                self._check_data_run(entry, expect - cs, l1_index, i, j - 1)
                kind = DATA
            else:
                while j <= last and table[j] == entry:
                    j += 1
                kind = ZERO if entry == L2_ZERO_CLUSTER else UNALLOCATED
            start = max(pos, base + (i << bits))
            stop = min(end, base + (j << bits))
            host = entry + (start - base - (i << bits)) if kind is DATA else None
            runs.append(Extent(start, stop - start, kind, host))
            i = j
        return runs

    def _check_data_run(self, first: int, last: int, l1_index: int, i: int, j: int) -> None:
        geo = self.geo
        if first % geo.cluster_size == 0 and first >= geo.header_bytes and last < self._file_end:
            return
        bad, index = (first, i)
        if first % geo.cluster_size == 0 and first >= geo.header_bytes:
            bad, index = (last, j)
        where = self._l1[l1_index] + 8 * index
        raise self._corrupt(
            f"L2 entry {index} of the table at {self._l1[l1_index]:#x} (offset {where}) "
            f"holds an invalid cluster offset {bad:#x}",
            where,
            "l2_entry",
        )

    async def runs(self, offset: int, length: int) -> list[Extent]:
        """All runs of ``[offset, offset + length)``, in order (this layer only)."""
        out: list[Extent] = []
        span = self.geo.l2_span
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos // span
            piece_end = min(end, (l1_index + 1) * span)
            for run in self._table_runs(await self.get_l2(l1_index), l1_index, pos, piece_end):
                prev = out[-1] if out else None
                if (
                    prev is not None
                    and prev.kind is run.kind
                    and (
                        run.kind is not DATA
                        or (
                            prev.host_offset is not None
                            and prev.host_offset + prev.length == run.host_offset
                        )
                    )
                ):
                    out[-1] = Extent(
                        prev.start, prev.length + run.length, run.kind, prev.host_offset
                    )
                else:
                    out.append(run)
            pos = piece_end
        return out

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        return await self.runs(offset, length)

    # ======================================================================
    # read
    # ======================================================================

    def _contiguous_host(self, offset: int, end: int) -> int:
        """Fast path of the lookup: the host offset of ``offset`` when all of
        ``[offset, end)`` (non-empty) is one host-contiguous run of valid data
        clusters in a cached L2 table; -1 otherwise (the slow path then finds out
        why, and raises the precise error for a damaged entry)."""
        l1_index = offset >> self._l1_shift
        l2_offset = self._l1[l1_index]
        if not l2_offset or (end - 1) >> self._l1_shift != l1_index:
            return -1
        table = self._cache.get(l2_offset)
        if table is None:
            return -1
        bits = self._cluster_bits
        i = (offset >> bits) & self._l2_mask
        last = ((end - 1) >> bits) & self._l2_mask
        entry = table[i]
        if entry & self._cluster_mask or entry < self._header_bytes:
            return -1  # 0, 1 or invalid
        expect = entry
        while i < last:
            i += 1
            expect += 1 << bits
            if table[i] != expect:
                return -1
        if expect >= self._file_end:
            return -1
        return entry + (offset & self._cluster_mask)

    def read_now(self, offset: int, length: int) -> bytes | None:
        pread = self._pread_now
        if pread is None or length <= 0 or offset < 0 or offset + length > self.header.image_size:
            return None
        host = self._contiguous_host(offset, offset + length)
        if host < 0:
            return None
        data = pread(host, length)
        return data if len(data) == length else None

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        preadinto = self._preadinto_now
        n = len(view)
        if preadinto is None or n <= 0 or offset < 0 or offset + n > self.header.image_size:
            return False
        host = self._contiguous_host(offset, offset + n)
        return host >= 0 and preadinto(host, view) == n

    def write_now(self, offset: int, data: Buffer) -> bool:
        pwrite = self._pwrite_now
        n = len(data)
        if (
            pwrite is None
            or self._stalls
            or self.readonly
            or n <= 0
            or offset < 0
            or offset + n > self.header.image_size
        ):
            return False
        host = self._contiguous_host(offset, offset + n)
        if host < 0:
            return False
        pwrite(host, data)
        return True

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if view:
            host = self._contiguous_host(offset, offset + len(view))
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
            for run in self._table_runs(table, l1_index, pos, piece_end):
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

    # ---- per-cluster write stalls ---------------------------------------------------

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

    # ---- writing ------------------------------------------------------------------

    async def _write_in_place(self, l1_index: int, pos: int, data: memoryview) -> object:
        """Write ``data`` if every cluster it touches is allocated: _WRITTEN; else
        _ALLOCATE (nothing written), or _STALLED if a stall appeared meanwhile."""
        host = self._contiguous_host(pos, pos + len(data))
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
        runs = self._table_runs(table, l1_index, pos, pos + len(data))
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

    async def _allocating_write(self, l1_index: int, pos: int, data: memoryview) -> None:
        """Write ``data`` at ``pos`` (inside one L2 span), allocating clusters for the
        unallocated and zero clusters it touches. Caller holds ``_alloc_lock`` and
        checked that no cluster of the range is stalled."""
        geo = self.geo
        table = await self.get_l2(l1_index)
        updates: dict[int, int] = {}
        reused = False
        for run in self._table_runs(table, l1_index, pos, pos + len(data)):
            chunk = data[run.start - pos : run.start - pos + run.length]
            if run.kind is DATA:
                assert run.host_offset is not None
                await self.store.write(run.host_offset, chunk)
                continue
            first = geo.start_of_cluster(run.start)
            stop = geo.round_up(run.end)
            count = (stop - first) >> geo.cluster_bits
            await self._mark_need_check()
            host, in_file = await self._place(first >> geo.cluster_bits, count)
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

    async def _place(self, guest_cluster: int, count: int) -> tuple[int, bool]:
        """Host offset for ``count`` new data clusters of guest clusters from
        ``guest_cluster``: their home slots when the home allocation policy is on and
        the slots are free, else the end of the file. The second value says whether
        the slots lie inside the file (reused space, with stale bytes possible)."""
        bits = self._cluster_bits
        if self.home_allocation:
            cmap = await self.ensure_cluster_map()
            home = self.data_start + (guest_cluster << bits)
            if cmap.is_free(home >> bits, count):
                in_file = home < self._file_end
                self._file_end = max(self._file_end, home + (count << bits))
                cmap.claim_data(home >> bits, count, guest_cluster)
                return home, in_file
            # Home taken: go past the home area, never onto another cluster's home.
            old_end = self._file_end
            host = self.place_outside_home(count)
            cmap.claim_data(host >> bits, count, guest_cluster)
            return host, host < old_end
        host = self._allocate(count)
        if self.cluster_map is not None:
            self.cluster_map.claim_data(host >> bits, count, guest_cluster)
        return host, False

    @property
    def home_end(self) -> int:
        """End of the home area: the home slot after the last guest cluster's."""
        return self.data_start + self.geo.round_up(self.size)

    def place_outside_home(self, count: int) -> int:
        """Reserve ``count`` free clusters at or after the end of the home area (the
        first such run; the file grows as needed). Needs the cluster map."""
        cmap = self.cluster_map
        assert cmap is not None
        bits = self._cluster_bits
        index = self.home_end >> bits
        while not cmap.is_free(index, count):
            index += 1
        host = index << bits
        self._file_end = max(self._file_end, host + (count << bits))
        return host

    async def ensure_cluster_map(self) -> ClusterMap:
        """The cluster ownership map, built by one scan of every table on first use
        and kept current from then on."""
        if self.cluster_map is None:
            self.cluster_map = await ClusterMap.scan(self)
        return self.cluster_map

    async def _cow_fill(self, start: int, end: int, kind: ExtentKind) -> Buffer:
        """Bytes for ``[start, end)`` of a cluster being allocated: zeros for a zero
        cluster (never the backing file: QEMU gets this wrong), else what the
        backing chain holds there, up to the image size."""
        n = end - start
        if n <= 0:
            return b""
        if kind is ZERO or self.backing is None or start >= min(self.size, self.backing.size):
            return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
        buf = bytearray(n)
        await self._read_backing(start, memoryview(buf), limit=self.size)
        return buf

    def _allocate(self, count: int) -> int:
        """Reserve ``count`` contiguous clusters at the end of the file."""
        offset = self._file_end
        self._file_end += count << self.geo.cluster_bits
        return offset

    def set_file_end(self, file_end: int) -> None:
        """Move the allocation pointer (a job that truncated the file, or grew it)."""
        self._file_end = file_end

    async def _update_l2(
        self, l1_index: int, table: array[int] | None, updates: dict[int, int]
    ) -> None:
        """Make ``updates`` (L2 index -> entry) durable in order: into the existing
        table's changed sectors, or into a new table written and flushed before the
        L1 entry that links it."""
        if table is not None:
            await self.write_l2_entries(l1_index, table, updates)
            return
        await self._mark_need_check()
        new = new_table(self.geo.l2_entries)
        for index, entry in updates.items():
            new[index] = entry
        if self.home_allocation and self.cluster_map is not None:
            # Tables go past the home area, which stays for data (raw-like layout).
            l2_offset = self.place_outside_home(self.geo.table_size)
        else:
            l2_offset = self._allocate(self.geo.table_size)
        if self.cluster_map is not None:
            self.cluster_map.claim_range(l2_offset >> self._cluster_bits, self.geo.table_size, META)
        await self.store.write(l2_offset, pack_table(new))
        await self.store.flush()
        await self.set_l1_entry(l1_index, l2_offset)
        self._cache.store(l2_offset, new)

    async def write_l2_entries(
        self, l1_index: int, table: array[int], updates: dict[int, int]
    ) -> None:
        """Rewrite the 512-byte sectors of the (cached) L2 table of ``l1_index`` that
        hold ``updates``; the table in memory changes only once that write succeeded.
        No flush. Callers hold the allocation lock."""
        l2_offset = self._l1[l1_index]
        lo = min(updates) // ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR
        hi = (max(updates) // ENTRIES_PER_SECTOR + 1) * ENTRIES_PER_SECTOR
        span = array("Q", table[lo:hi])
        for index, entry in updates.items():
            span[index - lo] = entry
        await self.store.write(l2_offset + 8 * lo, pack_table(span))
        for index, entry in updates.items():
            table[index] = entry
        self._cache.store(l2_offset, table)

    async def set_l1_entry(self, l1_index: int, value: int) -> None:
        """Rewrite the L1 sector holding ``l1_index`` with ``value`` in it (no flush)."""
        lo = l1_index // ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR
        span = array("Q", self._l1[lo : lo + ENTRIES_PER_SECTOR])
        span[l1_index - lo] = value
        await self.store.write(self.header.l1_table_offset + 8 * lo, pack_table(span))
        self._l1[l1_index] = value

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
        (run,) = self._table_runs(table, l1_index, pos, end)
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
        for run in self._table_runs(table, l1_index, pos, end):
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

    # ======================================================================
    # header, need-check, flush, resize, close
    # ======================================================================

    @property
    def _has_backing(self) -> bool:
        """A backing file is attached or recorded: the write ordering must then keep a
        hole from ever exposing backing data (and NEED_CHECK is not used)."""
        return self.backing is not None or self.header.has_backing_file

    async def _write_header(self, header: Header, *, flush: bool) -> None:
        """Rewrite the 64-byte header struct only (bytes after it are preserved)."""
        await self.store.write(0, header.pack())
        if flush:
            await self.store.flush()
        self.header = header

    async def _mark_need_check(self) -> None:
        """Set NEED_CHECK (durably) before the first allocation of a dirty period, for
        images without a backing file."""
        if not self._has_backing and not self.header.needs_check:
            await self._write_header(self.header.with_features(set_=Feature.NEED_CHECK), flush=True)

    async def flush(self) -> None:
        """Make every completed write durable; when no allocating request is in
        flight, also clear NEED_CHECK (after the flush that makes the tables whole)."""
        if self.readonly or self._closed:
            return
        await self.store.flush()
        if self.header.needs_check and not self._alloc_lock.locked():
            async with self._alloc_lock:
                await self.mark_clean()

    async def mark_clean(self) -> None:
        """Clear NEED_CHECK: flush, write the header, flush. Caller excludes allocations."""
        if not self.header.needs_check:
            return
        await self.store.flush()
        await self._write_header(self.header.with_features(clear=Feature.NEED_CHECK), flush=True)

    async def set_home_allocation(self, enabled: bool) -> None:
        """Turn the home allocation policy on or off, recorded in the header (an
        autoclear bit: it lasts until QEMU writes the image, see format.header)."""
        self._check_writable()
        bits = self.header.autoclear_features
        new = (
            bits | AutoclearFeature.HOME_ALLOCATION
            if enabled
            else bits & ~AutoclearFeature.HOME_ALLOCATION
        )
        if new != bits:
            await self._write_header(replace(self.header, autoclear_features=int(new)), flush=True)
        self.home_allocation = enabled

    async def set_backing_file(self, name: str | None, *, raw: bool = False) -> None:
        """Record a new backing file name (or none) in the header, as rebase, commit and
        streaming do. The caller opens and attaches the new backing image.

        Everything written before is flushed first: writes made under one backing
        regime (with or without a backing file, the ordering rules differ) must be
        durable before the other regime's header can be. NEED_CHECK is cleared with
        the same header write, since the flush made the tables complete."""
        self._check_writable()
        async with self._alloc_lock:
            await self.store.flush()
            await self._set_backing_file(name, raw)

    async def _set_backing_file(self, name: str | None, raw: bool) -> None:
        header = self.header.with_features(clear=Feature.NEED_CHECK)
        if name:
            if header.compat_features:
                raise UnsupportedFeatureError(
                    f"cannot set a backing file: unknown compatible features "
                    f"{header.compat_features:#x} may use the header area",
                    filename=self.filename,
                )
            encoded = encode_backing_name(name)
            if (
                HEADER_SIZE_BYTES + len(encoded) > self.geo.header_bytes
                or len(encoded) > QEMU_MAX_BACKING_NAME
            ):
                raise InvalidRequestError(
                    f"backing file name of {len(encoded)} bytes does not fit in the header",
                    filename=self.filename,
                )
            features = Feature.BACKING_FILE | (Feature.BACKING_FORMAT_NO_PROBE if raw else 0)
            offset = self._backing_name_slot(len(encoded))
            header = replace(
                header.with_features(
                    set_=features,
                    clear=0 if raw else Feature.BACKING_FORMAT_NO_PROBE,
                ),
                backing_filename_offset=offset,
                backing_filename_size=len(encoded),
            )
            area = bytearray(self.header_area)
            area[offset : offset + len(encoded)] = encoded
            if offset + len(encoded) <= SECTOR_SIZE:
                # Header and name in one sector: one write, which a power loss
                # cannot tear (sector writes are atomic).
                sector = bytearray(area[:SECTOR_SIZE].ljust(SECTOR_SIZE, b"\0"))
                sector[:HEADER_SIZE_BYTES] = header.pack()
                await self.store.write(0, sector)
                await self.store.flush()
                self.header = header
                self.header_area = bytes(area)
                self.backing_filename = header.backing_filename(self.header_area)
                return
            # A longer name goes where the current header does not point, so that
            # until the new header is durable the old one still reads its old name.
            await self.store.write(offset, encoded)
            await self.store.flush()
            self.header_area = bytes(area)
        else:
            header = replace(
                header.with_features(clear=Feature.BACKING_FILE | Feature.BACKING_FORMAT_NO_PROBE),
                backing_filename_size=0,
            )
        await self._write_header(header, flush=True)
        self.backing_filename = header.backing_filename(self.header_area)

    def _backing_name_slot(self, length: int) -> int:
        """Where a new backing name of ``length`` bytes goes: at 64, as QEMU puts it,
        when header and name then fit in the first sector (written at once); else past
        the current name, if the header area has room, so that the current header
        keeps pointing at intact bytes until it is replaced; else at 64 (a name this
        long, in a header cluster this small, cannot be changed atomically)."""
        if HEADER_SIZE_BYTES + length <= SECTOR_SIZE:
            return HEADER_SIZE_BYTES
        current = self.header
        end = HEADER_SIZE_BYTES
        if current.has_backing_file:
            end = max(end, current.backing_filename_offset + current.backing_filename_size)
        if end + length <= self.geo.header_bytes:
            return end
        return HEADER_SIZE_BYTES

    async def resize(self, new_size: int) -> None:
        """Grow the image. Data of a longer backing file (or stale bytes in the tail of
        the last cluster) must not show through the new range, so that range is
        zeroed first, then the new size is written to the header."""
        self._check_writable()
        old = self.size
        if new_size == old:
            return
        if new_size < old:
            raise UnsupportedFeatureError(
                f"shrinking a QED image is not supported ({old} -> {new_size} bytes)",
                filename=self.filename,
            )
        if new_size % SECTOR_SIZE:
            raise InvalidRequestError(
                f"invalid size {new_size}: must be a multiple of 512", filename=self.filename
            )
        limit = qemu_max_image_size(self.geo.cluster_size, self.geo.table_size)
        if new_size > limit:
            raise InvalidRequestError(
                f"size {new_size} exceeds the maximum {limit} for this image's geometry",
                filename=self.filename,
            )
        zero_end = old
        if self.backing is not None:
            zero_end = max(zero_end, min(new_size, self.backing.size))
        if old % self.geo.cluster_size:
            zero_end = max(zero_end, min(new_size, self.geo.round_up(old)))
        if zero_end > old:
            # Whole unallocated clusters become zero clusters; partial ones get zeros.
            # Requests stay below the old size's cluster, so the range check of the
            # public API does not apply here.
            await self._zero_range(old, zero_end, unmap=False)
            await self.store.flush()
        await self._write_header(replace(self.header, image_size=new_size), flush=True)

    async def info(self) -> ImageInfo:
        name = self.backing_filename
        return ImageInfo(
            filename=self.filename,
            format="qed",
            virtual_size=self.size,
            actual_size=await self.store.allocated_bytes(),
            cluster_size=self.geo.cluster_size,
            backing_filename=name,
            full_backing_filename=full_backing_filename(self.filename, name) if name else None,
            backing_format="raw"
            if name and self.header.has(Feature.BACKING_FORMAT_NO_PROBE)
            else None,
            dirty=self.header.needs_check,
        )

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.readonly:
                await self.store.flush()
                async with self._alloc_lock:
                    await self.mark_clean()
        finally:
            self._closed = True
            try:
                await self.store.close()
            finally:
                if self.backing is not None:
                    await self.backing.close()
