"""The QED driver's image: open and create, the header and its flags, flush, resize,
backing-name changes, close.

References: qed_spec "Header", "Consistency checking"; QEMU block/qed.c
(bdrv_qed_do_open, qed_create, qed_write_header, bdrv_qed_co_truncate,
bdrv_qed_change_backing_file, qed_need_check_timer_cb).

Theory of operation
-------------------
``QedImage`` is assembled from the driver's parts, one owner per mechanism:

* ``alloc`` (engine.qed.alloc): the end of the file, the cluster map, the placement
  policy;
* ``tables`` (engine.qed.tables): the L1 table, the L2 cache and every table write;
* lookup (engine.qed.lookup) and guest I/O (engine.qed.io), the layers of this class.

This module keeps the header. NEED_CHECK is set (and flushed) before the first
allocation of a dirty period on an image without a backing file, and cleared by
``flush`` when no allocating request is in flight and by ``close``, each time after
a flush, so the flag is clear only when the metadata on disk is complete. Opening
never repairs: the chain (engine.chain) runs check and repair on a read-write open of
a flagged image. A read-only open never writes.
"""

from __future__ import annotations

from array import array
from dataclasses import replace

from ...errors import InvalidRequestError, UnsupportedFeatureError
from ...format.geometry import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_TABLE_SIZE,
    SECTOR_SIZE,
    Geometry,
    is_valid_cluster_size,
    is_valid_table_size,
    qemu_max_image_size,
)
from ...format.header import (
    HEADER_SIZE_BYTES,
    KNOWN_AUTOCLEAR,
    QEMU_MAX_BACKING_NAME,
    AutoclearFeature,
    Feature,
    Header,
    encode_backing_name,
)
from ...format.tables import unpack_table
from ...store.base import ByteStore
from ..base import BlockImage, Extent, ImageInfo
from ..l2cache import DEFAULT_BUDGET, L2Cache
from ..sync import LazyLock
from .alloc import Allocator, ClusterMap
from .io import QedIO
from .tables import Tables


class QedImage(QedIO):
    format_name = "qed"
    host_offsets_are_data = True

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
        self._closed = False
        # Created without asyncio: see engine.sync.LazyLock.
        self._alloc_lock = LazyLock()
        self.alloc = Allocator(
            self.geo,
            file_end,
            data_start=header.data_start,
            image_size=header.image_size,
            home=bool(header.autoclear_features & AutoclearFeature.HOME_ALLOCATION),
        )
        self.tables = Tables(
            store,
            self.geo,
            header.l1_table_offset,
            l1,
            self.alloc,
            filename=filename,
            cache_budget=cache_budget,
        )
        self._bind_lookup()
        self._init_io()

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
    ) -> QedImage:
        """Finish opening once the header is validated and the backing chain is open.

        A read-write open clears unknown autoclear bits (before any other write). It
        does not check or repair an image with NEED_CHECK set: engine.chain does
        (``open_qed``). A read-only open never writes a byte.
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
        if not readonly and header.autoclear_features & ~KNOWN_AUTOCLEAR:
            # Unknown autoclear bits mean a newer writer's extra data may be stale:
            # clear them before any other write.
            await img._write_header(
                replace(header, autoclear_features=header.autoclear_features & KNOWN_AUTOCLEAR),
                flush=True,
            )
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
        return self.alloc.file_end

    @property
    def l1_table(self) -> array[int]:
        """The in-memory L1 table (read-only use, please)."""
        return self.tables.l1

    @property
    def cache(self) -> L2Cache:
        return self.tables.cache

    @property
    def data_start(self) -> int:
        """The fixed start of the data area: past the header and the L1 table."""
        return self.alloc.data_start

    @property
    def home_end(self) -> int:
        """End of the home area: the home slot after the last guest cluster's."""
        return self.alloc.home_end

    @property
    def home_allocation(self) -> bool:
        return self.alloc.home_allocation

    @property
    def cluster_map(self) -> ClusterMap | None:
        return self.alloc.cluster_map

    async def ensure_cluster_map(self) -> ClusterMap:
        """The cluster ownership map (engine.qed.alloc), built on first use."""
        return await self.alloc.ensure_map(self.tables.source())

    def allocations_paused(self) -> LazyLock:
        """``async with img.allocations_paused():`` holds off allocating writes (they
        wait) while reads and in-place writes go on: a stable view of the tables for
        a job. Not reentrant."""
        return self._alloc_lock

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        return await self.runs(offset, length)

    # ======================================================================
    # header, need-check, flush
    # ======================================================================

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

    async def relocate_l1(self, dst: int) -> int:
        """Move the L1 table to ``dst`` (``table_size`` clusters claimed by the caller,
        not overlapping the current table): write it whole there, flush, rewrite the
        64-byte header with the new offset (one write inside sector 0, which a power
        loss cannot tear), flush. Until that header write is durable the old header
        points at the old, intact copy. Returns the old offset, free once this returns.
        The data area (``data_start``) follows the table. Caller excludes allocations."""
        self._check_writable()
        old = self.header.l1_table_offset
        await self.tables.copy_l1(dst)
        await self._write_header(replace(self.header, l1_table_offset=dst), flush=True)
        self.tables.use_l1_at(dst)
        self.alloc.data_start = self.header.data_start
        return old

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
        self.alloc.home_allocation = enabled

    # ======================================================================
    # backing file
    # ======================================================================

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

    async def drop_backing_file(self) -> None:
        """Remove the backing file link from the header and detach the backing image
        (the last step of streaming, once every cluster that read from the backing
        chain is in this image: the caller's duty, see jobs.stream).

        As ``set_backing_file(None)``: under the allocation lock, everything written
        before is flushed (so every fill's L2 entry is durable before the header
        stops naming the backing file), then the 64-byte header is written in one
        sector write and flushed. The backing image is detached under the same lock,
        so the next allocation follows the no-backing rules (NEED_CHECK); it is
        closed once the reads of it still in flight are done.

        Failure guarantee: if the header write fails the backing image stays
        attached, and on disk the header is the old one or the new one (one sector
        write), each consistent with the tables."""
        self._check_writable()
        async with self._alloc_lock:
            await self.store.flush()
            await self._set_backing_file(None, False)
            old, self.backing = self.backing, None
        if old is not None:
            await self._backing_reads_done()
            await old.close()

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

    # ======================================================================
    # resize, info, close
    # ======================================================================

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
        self.alloc.image_size = new_size

    async def shrink(self, new_size: int) -> None:
        """Cut the image to ``new_size`` bytes.

        Order (each step durable before the next):

        1. the cut tail's entries become 0: entries past the new last cluster in
           the table that straddles the new end (sector writes), and every table
           whose span lies wholly past it is unlinked (its L1 entry 0);
        2. the header gets the new size (one sector write).

        The clusters and tables nothing references any more are leaks (space, never
        data) until the caller reclaims them (jobs.resize compacts with Mover).
        A crash after step 1 leaves the old size with a tail that reads as
        unallocated (the part of the disk that stays is intact). The
        entries go before the header so that no state has the new size with stale
        entries past it, which a later grow would show again. A cluster cut in two
        by the new end keeps its entry; a later grow zeroes its tail (``resize``).
        Nothing here checks that the tail held no data: callers decide that.
        """
        self._check_writable()
        old = self.size
        if new_size % SECTOR_SIZE or not 0 <= new_size <= old:
            raise InvalidRequestError(
                f"invalid size {new_size} for a shrink from {old} bytes: must be a "
                "multiple of 512 and not larger",
                filename=self.filename,
            )
        geo = self.geo
        cut = geo.round_up(new_size)  # first guest byte of the first cluster that goes
        if new_size == old:
            return
        async with self._alloc_lock:
            await self.store.flush()
            first_table = -(-cut // geo.l2_span)  # first table wholly past the cut
            for l1_index in range(first_table, len(self.tables.l1)):
                if self.tables.l1[l1_index]:
                    await self.tables.unlink(l1_index)
            if cut % geo.l2_span:
                l1_index = cut // geo.l2_span
                table = await self.get_l2(l1_index)
                if table is not None:
                    start = geo.l2_index(cut)
                    updates = {i: 0 for i in range(start, geo.l2_entries) if table[i]}
                    if updates:
                        await self.tables.write_entries(l1_index, table, updates)
            await self.store.flush()
            await self._write_header(replace(self.header, image_size=new_size), flush=True)
            self.alloc.image_size = new_size
            self.alloc.forget_map()  # freed clusters: a new scan knows them

    # ======================================================================
    # geometry changes (amend)
    # ======================================================================

    async def switch_header(self, header: Header) -> tuple[ByteStore, BlockImage | None]:
        """Make the file another image: write ``header`` (another geometry, whose L1
        and L2 tables and data the caller placed past the end of the file with
        ``alloc.at_end`` and flushed) as the 64-byte header struct, in one sector
        write, and flush. The header area past 64 bytes (the backing name) is kept.

        This object describes the old geometry and is done with afterwards: it is
        closed without another write, and the store (still open) and the backing
        image are handed back for ``QedImage.open`` on the new header. Every crash
        state is the old image (with leaked space at its end) or the new one."""
        self._check_writable()
        async with self._alloc_lock:
            if header.needs_check:
                raise InvalidRequestError(
                    "a new header must not carry NEED_CHECK", filename=self.filename
                )
            await self.store.flush()
            await self.store.write(0, header.pack())
            await self.store.flush()
            self._closed = True
        backing, self.backing = self.backing, None
        return self.store, backing

    async def info(self) -> ImageInfo:
        no_probe = self.header.has(Feature.BACKING_FORMAT_NO_PROBE)
        return await self._info(
            backing_filename=self.backing_filename,
            backing_format="raw" if no_probe else None,
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
