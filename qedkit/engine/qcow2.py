"""The qcow2 driver, read-only: versions 2 and 3, every cluster size QEMU reads.

Theory of operation
-------------------
*Open.* Cluster 0 is read and decoded by format.qcow2 (header, extensions, backing
name; every field validated before anything else is read), then the active L1 table,
which stays in memory. Encryption and external data files are refused with an error
naming the feature; unknown incompatible feature bits likewise (named from the
image's feature name table). The dirty bit (lazy refcounts) does not matter to a
reader: the L1/L2 tables are complete, only refcounts may be stale. The corrupt bit
forbids writing, which this driver never does, so such an image is read as it is
(QEMU also opens it read-only), and ``qed info`` reports ``corrupt: true``.

*Lookup.* L2 tables (one cluster each) come through the byte-budgeted LRU cache
(engine.l2cache) and are decoded on demand. ``iter_runs`` is the one mapping
primitive: per L2 span it yields format.qcow2 ``Run`` records (kind, guest range,
host offset or compressed descriptor) at subcluster granularity, merged while
kind and host contiguity allow. Reads, block status and (later) an in-place
converter are built on it.

*Reads* are complete: NORMAL runs are read from the file (bytes past its end read
as zeros, as in QEMU), ZERO runs are zeros, UNALLOCATED runs (plain, or subclusters
of an allocated cluster) go to the backing image (zeros past its end, or with no
backing image), COMPRESSED runs are inflated one cluster at a time: raw deflate with
window bits 12 (as QEMU), or zstd frames through the optional ``zstandard`` package
(``pip install qedkit[zstd]``), imported on first use. The last cluster inflated is
kept, so reading one compressed cluster in small pieces inflates it once.

*Block status* answers for this layer: DATA with a host offset for uncompressed data,
DATA without one for compressed clusters, ZERO (with the host offset of a
preallocated zero cluster, as QEMU reports it), UNALLOCATED otherwise (carrying the
host offset of an allocated cluster's unallocated subclusters, as QEMU does).

*Writes* raise ReadOnlyError: qcow2 images are read-only in qedkit for now, and an
open for writing is refused up front (``read_metadata(readonly=False)``).

Failure guarantee: nothing here ever writes to the store; an error leaves the file
as it was, and the image usable for other ranges.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptImageError, ReadOnlyError, UnsupportedFeatureError
from ..format import qcow2 as fmt
from ..format.qcow2 import CompressedDescriptor, Metadata, Run, SubclusterType
from ..store.base import Buffer, ByteStore
from .base import BlockImage, Extent, ExtentKind, ImageInfo, SnapshotInfo
from .l2cache import DEFAULT_BUDGET, L2Cache, StaleLoad

# The first read of a probe: the whole header and, usually, its extensions and the
# backing name; cluster 0 is read whole only when it is larger and they are past it.
HEADER_READ = 4096

_BLOCK_KIND = {
    SubclusterType.NORMAL: ExtentKind.DATA,
    SubclusterType.COMPRESSED: ExtentKind.DATA,
    SubclusterType.ZERO_PLAIN: ExtentKind.ZERO,
    SubclusterType.ZERO_ALLOC: ExtentKind.ZERO,
    SubclusterType.UNALLOCATED_PLAIN: ExtentKind.UNALLOCATED,
    SubclusterType.UNALLOCATED_ALLOC: ExtentKind.UNALLOCATED,
}

_ZEROS = bytes(1 << 20)


def _fill_zero(view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos : pos + k] = _ZEROS[:k]
        pos += k


@dataclass(frozen=True, slots=True)
class MetadataClusters:
    """Host clusters (byte offsets) holding qcow2 metadata: what an in-place
    converter must not reuse as data and may reclaim afterwards. The active state's
    tables, the refcount structures, the snapshot table and the snapshots' L1 tables
    (their L2 tables and data are shared or the snapshots' own: a converter that
    drops snapshots finds them through ``refcount``), the bitmap directory."""

    header: tuple[int, ...]
    l1_table: tuple[int, ...]
    l2_tables: tuple[int, ...]
    refcount_table: tuple[int, ...]
    refcount_blocks: tuple[int, ...]
    snapshot_table: tuple[int, ...]
    snapshot_l1_tables: tuple[int, ...] = ()
    bitmap_directory: tuple[int, ...] = ()

    def all(self) -> frozenset[int]:
        return frozenset(
            self.header
            + self.l1_table
            + self.l2_tables
            + self.refcount_table
            + self.refcount_blocks
            + self.snapshot_table
            + self.snapshot_l1_tables
            + self.bitmap_directory
        )


class Qcow2Image(BlockImage):
    format_name = "qcow2"

    def __init__(
        self,
        store: ByteStore,
        meta: Metadata,
        l1: array[int],
        *,
        filename: str,
        backing: BlockImage | None,
        file_size: int,
        cache_budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.store = store
        self.meta = meta
        self.header = meta.header
        self.geo = meta.geometry
        self.filename = filename
        self.readonly = True
        self.backing = backing
        self.backing_filename = meta.backing_filename
        self._l1 = l1
        self._file_size = file_size
        self._cache = L2Cache(self.geo.cluster_size, cache_budget)
        self._inflated: tuple[int, bytes] | None = None  # (entry, cluster bytes)
        self._closed = False
        geo = self.geo
        self._l1_shift = geo.cluster_bits + geo.l2_bits
        self._cluster_bits = geo.cluster_bits
        self._cluster_mask = geo.cluster_size - 1
        self._l2_mask = geo.l2_entries - 1
        self._words = geo.l2_entry_words
        self._preadinto_now: Callable[[int, memoryview], int] | None = getattr(
            store, "preadinto_now", None
        )
        self._pread_now: Callable[[int, int], bytes] | None = getattr(store, "pread_now", None)

    # ======================================================================
    # open
    # ======================================================================

    @staticmethod
    async def read_metadata(store: ByteStore, *, readonly: bool = True) -> Metadata:
        """Read and validate cluster 0; refuse what cannot be read (encryption,
        external data files) and, with ``readonly=False``, refuse the open itself
        (ReadOnlyError: qedkit does not write qcow2). Never writes."""
        size = await store.size()
        first = await store.read(0, HEADER_READ)
        header = fmt.Header.unpack(first)
        header.validate(size)
        if header.cluster_size > len(first) and size > len(first):
            first = await store.read(0, min(header.cluster_size, size))
        meta = Metadata.parse(first, size)
        meta.check_readable()
        if not readonly:
            raise ReadOnlyError(
                "qcow2 images open read-only in qedkit (qed convert --in-place makes it "
                "QED in the same file; qed serve --convert-qcow2 does that while serving it)",
                filename=store.name,
            )
        return meta

    @classmethod
    async def open(
        cls,
        store: ByteStore,
        meta: Metadata,
        *,
        backing: BlockImage | None,
        filename: str | None = None,
        cache_budget: int = DEFAULT_BUDGET,
    ) -> Qcow2Image:
        """Finish opening once cluster 0 is validated and the backing chain is open:
        read the active L1 table (validated to lie inside the file)."""
        header = meta.header
        size = await store.size()
        l1 = fmt.unpack_table(
            await store.read_exact(header.l1_table_offset, 8 * header.l1_size, "L1 table")
        )
        return cls(
            store,
            meta,
            l1,
            filename=filename or store.name,
            backing=backing,
            file_size=size,
            cache_budget=cache_budget,
        )

    # ======================================================================
    # properties
    # ======================================================================

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self.geo.cluster_size

    @property
    def l1_table(self) -> array[int]:
        """The active L1 table, raw entries (read-only use, please)."""
        return self._l1

    @property
    def cache(self) -> L2Cache:
        return self._cache

    # ======================================================================
    # lookup
    # ======================================================================

    def _corrupt(self, message: str, offset: int, field: str) -> CorruptImageError:
        return CorruptImageError(message, filename=self.filename, offset=offset, field=field)

    def l2_offset(self, l1_index: int) -> int:
        """The L2 table offset for ``l1_index`` (0: none); CorruptImageError when the
        L1 entry is not cluster-aligned or the table is not inside the file."""
        if l1_index >= len(self._l1):
            return 0
        offset = fmt.l2_table_offset(self._l1[l1_index])
        if offset == 0:
            return 0
        where = self.header.l1_table_offset + 8 * l1_index
        if offset & self._cluster_mask:
            raise self._corrupt(
                f"L1 entry {l1_index} at offset {where} holds an L2 table offset "
                f"{offset:#x} not aligned to the cluster size",
                where,
                "l1_entry",
            )
        if offset + self.geo.cluster_size > self._file_size:
            raise self._corrupt(
                f"L1 entry {l1_index} at offset {where} points to an L2 table at "
                f"{offset:#x}, past the end of the file ({self._file_size} bytes)",
                where,
                "l1_entry",
            )
        return offset

    async def get_l2(self, l1_index: int) -> array[int] | None:
        """The decoded L2 table for ``l1_index`` (None when the L1 entry is 0): u64
        words, two per entry (entry, subcluster bitmap) with extended L2."""
        offset = self.l2_offset(l1_index)
        if offset == 0:
            return None
        table = self._cache.get(offset)
        if table is not None:
            return table
        while True:
            generation = self._cache.generation(offset)
            data = await self.store.read_exact(offset, self.geo.cluster_size, "L2 table")
            try:
                return self._cache.offer(offset, fmt.unpack_table(data), generation)
            except StaleLoad:  # pragma: no cover - nothing writes qcow2 tables
                continue

    async def iter_runs(self, offset: int, length: int) -> AsyncIterator[Run]:
        """Runs of ``[offset, offset + length)`` in order, this layer only (pieces of
        one kind in neighbouring L2 spans are not merged)."""
        span = self.geo.l2_span
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> self._l1_shift
            base = l1_index * span
            piece_end = min(end, base + span)
            table = await self.get_l2(l1_index)
            l2_offset = fmt.l2_table_offset(self._l1[l1_index]) if table is not None else 0
            for run in fmt.table_runs(self.geo, table, l2_offset, base, pos, piece_end):
                yield run
            pos = piece_end

    async def runs(self, offset: int, length: int) -> list[Run]:
        return [run async for run in self.iter_runs(offset, length)]

    async def entries(self, l1_index: int) -> list[fmt.L2Entry]:
        """Every entry of one L2 table, decoded (empty when the L1 entry is 0)."""
        table = await self.get_l2(l1_index)
        if table is None:
            return []
        w = self._words
        return [
            fmt.decode_l2_entry(table[i * w], table[i * w + 1] if w == 2 else 0, self.geo)
            for i in range(self.geo.l2_entries)
        ]

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        out: list[Extent] = []
        async for run in self.iter_runs(offset, length):
            kind = _BLOCK_KIND[run.kind]
            host = run.host_offset
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.kind is kind
                and (prev.host_offset is None) == (host is None)
                and (host is None or prev.host_offset == host - prev.length)
            ):
                out[-1] = Extent(prev.start, prev.length + run.length, kind, prev.host_offset)
            else:
                out.append(Extent(run.start, run.length, kind, host))
        return out

    # ======================================================================
    # read
    # ======================================================================

    def _contiguous_host(self, offset: int, end: int) -> int:
        """The host offset of ``offset`` when ``[offset, end)`` (non-empty) is one
        host-contiguous run of plain data clusters in a cached L2 table; else -1
        (the general path then reads, or raises the precise error)."""
        l1_index = offset >> self._l1_shift
        if (end - 1) >> self._l1_shift != l1_index or l1_index >= len(self._l1):
            return -1
        l2 = self._l1[l1_index] & fmt.OFFSET_MASK
        table = self._cache.get(l2) if l2 else None
        if table is None:
            return -1
        bits = self._cluster_bits
        w = self._words
        i = (offset >> bits) & self._l2_mask
        last = ((end - 1) >> bits) & self._l2_mask
        expect = table[i * w] & ~fmt.OFLAG_COPIED
        if not expect or expect & ~fmt.OFFSET_MASK or expect & self._cluster_mask:
            return -1
        first = expect
        while True:
            if (table[i * w] & ~fmt.OFLAG_COPIED) != expect:
                return -1
            if w == 2 and table[i * w + 1] != fmt.SUBCLUSTER_ALLOC_MASK:
                return -1
            if i == last:
                break
            i += 1
            expect += 1 << bits
        return first + (offset & self._cluster_mask)

    def read_now(self, offset: int, length: int) -> bytes | None:
        pread = self._pread_now
        if pread is None or length <= 0 or offset < 0 or offset + length > self.header.size:
            return None
        host = self._contiguous_host(offset, offset + length)
        if host < 0 or host + length > self._file_size:
            return None
        data = pread(host, length)
        return data if len(data) == length else None

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        preadinto = self._preadinto_now
        n = len(view)
        if preadinto is None or n <= 0 or offset < 0 or offset + n > self.header.size:
            return False
        host = self._contiguous_host(offset, offset + n)
        return host >= 0 and host + n <= self._file_size and preadinto(host, view) == n

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if not view:
            return
        if self.readinto_now(offset, view):
            return
        async for run in self.iter_runs(offset, len(view)):
            dst = view[run.start - offset : run.end - offset]
            kind = run.kind
            if kind is SubclusterType.NORMAL:
                assert run.host_offset is not None
                n = await self.store.readinto(run.host_offset, dst)
                if n < len(dst):  # past the end of the file: zeros, as in QEMU
                    _fill_zero(dst[n:])
            elif kind is SubclusterType.COMPRESSED:
                assert run.compressed is not None and run.entry_offset is not None
                cluster = await self._inflate(run.compressed, run.entry_offset)
                at = run.start & self._cluster_mask
                dst[:] = cluster[at : at + len(dst)]
            elif kind.reads_zero:
                _fill_zero(dst)
            else:
                await self._read_backing(run.start, dst)

    async def _read_backing(self, pos: int, dst: memoryview) -> None:
        backing = self.backing
        n = max(0, min(len(dst), (backing.size if backing is not None else 0) - pos))
        if n:
            assert backing is not None
            await backing.readinto(pos, dst[:n])
        if n < len(dst):
            _fill_zero(dst[n:])

    async def _inflate(self, desc: CompressedDescriptor, entry_offset: int) -> bytes:
        """The guest bytes of one compressed cluster (the last one is kept)."""
        key = desc.host_offset << 16 | desc.sectors
        cached = self._inflated
        if cached is not None and cached[0] == key:
            return cached[1]
        data = await self.store.read(desc.host_offset, desc.length)
        cs = self.geo.cluster_size
        ctype = self.header.compression
        where = (
            f"compressed cluster at {desc.host_offset:#x} ({desc.length} bytes; "
            f"L2 entry at offset {entry_offset})"
        )
        try:
            if ctype is fmt.CompressionType.ZSTD:
                out = _zstd_decompress(data, cs, self.filename)
            else:
                out = zlib.decompressobj(-12).decompress(data, cs)
        except (zlib.error, BadCompressedData) as exc:
            raise self._corrupt(f"{where}: {exc}", entry_offset, "l2_entry") from exc
        if len(out) != cs:
            raise self._corrupt(
                f"{where} inflates to {len(out)} bytes, not a cluster of {cs}",
                entry_offset,
                "l2_entry",
            )
        self._inflated = (key, out)
        return out

    # ======================================================================
    # writes: refused
    # ======================================================================

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()

    async def resize(self, new_size: int) -> None:
        self._check_writable()

    def _check_writable(self) -> None:
        raise ReadOnlyError("qcow2 images are read-only in qedkit", filename=self.filename)

    async def flush(self) -> None:
        return None

    # ======================================================================
    # metadata for info and for a converter
    # ======================================================================

    async def snapshots(self) -> tuple[fmt.Snapshot, ...]:
        """The snapshot table (internal snapshots are listed, never read)."""
        out: list[fmt.Snapshot] = []
        pos = self.header.snapshots_offset
        for _ in range(self.header.nb_snapshots):
            fixed = await self.store.read(pos, fmt.SNAPSHOT_HEADER.size)
            if len(fixed) < fmt.SNAPSHOT_HEADER.size:
                raise self._corrupt(
                    f"the snapshot table entry at offset {pos} is cut off by the end of the file",
                    pos,
                    "snapshot_table",
                )
            need = fmt.snapshot_entry_size(fixed)
            entry = fmt.parse_snapshot(await self.store.read(pos, need), pos)
            out.append(entry)
            pos += entry.entry_size
        return tuple(out)

    async def refcount_table(self) -> array[int]:
        """The refcount table, raw entries (validated to lie inside the file at open)."""
        h = self.header
        data = await self.store.read_exact(
            h.refcount_table_offset, h.refcount_table_bytes, "refcount table"
        )
        return fmt.unpack_table(data)

    async def refcount(self, host_offset: int, table: array[int] | None = None) -> int:
        """The refcount of the host cluster holding ``host_offset`` (0 when its
        refcount block is not allocated). May be stale if the dirty bit is set."""
        table = table if table is not None else await self.refcount_table()
        t_index, b_index = fmt.refcount_location(self.header, host_offset)
        if t_index >= len(table):
            return 0
        block = fmt.refcount_block_offset(table[t_index])
        if block == 0:
            return 0
        data = await self.store.read_exact(block, self.geo.cluster_size, "refcount block")
        return fmt.refcount_entry(data, b_index, self.header.refcount_order)

    async def metadata_clusters(self) -> MetadataClusters:
        """Every host cluster the metadata occupies (see MetadataClusters; one pass
        over the L1 table, the refcount table and the snapshot table; no L2 table is
        read)."""
        h = self.header
        fixed = fmt.metadata_clusters(h)
        bits = h.cluster_bits

        def offsets(r: range) -> tuple[int, ...]:
            return tuple(i << bits for i in r)

        def span(offset: int, nbytes: int) -> tuple[int, ...]:
            return offsets(range(offset >> bits, (offset + nbytes + (1 << bits) - 1) >> bits))

        l2s = tuple(sorted({fmt.l2_table_offset(e) for e in self._l1} - {0}))
        blocks = tuple(
            sorted({fmt.refcount_block_offset(e) for e in await self.refcount_table()} - {0})
        )
        snaps: tuple[int, ...] = ()
        snap_l1s: set[int] = set()
        if h.nb_snapshots:
            table = await self.snapshots()
            snaps = span(h.snapshots_offset, sum(s.entry_size for s in table))
            for snap in table:
                snap_l1s.update(span(snap.l1_table_offset, 8 * snap.l1_size))
        bitmaps = self.meta.extensions.bitmaps
        directory = span(bitmaps.directory_offset, bitmaps.directory_size) if bitmaps else ()
        return MetadataClusters(
            offsets(fixed["header"]),
            offsets(fixed["l1_table"]),
            l2s,
            offsets(fixed["refcount_table"]),
            blocks,
            snaps,
            tuple(sorted(snap_l1s)),
            directory,
        )

    async def bitmaps(self) -> tuple[fmt.Bitmap, ...]:
        """The persistent bitmaps, as QEMU lists them: none unless the bitmaps
        extension is there and its autoclear bit says it is consistent."""
        ext = self.meta.extensions.bitmaps
        h = self.header
        if ext is None or not h.autoclear_features & fmt.AutoclearFeature.BITMAPS:
            return ()
        if (
            ext.directory_size > fmt.MAX_BITMAP_DIRECTORY
            or ext.directory_offset % self.geo.cluster_size
            or ext.directory_offset + ext.directory_size > self._file_size
        ):
            raise self._corrupt(
                f"the bitmap directory ({ext.directory_size} bytes at "
                f"{ext.directory_offset:#x}) is not a valid range of the file",
                ext.directory_offset,
                "bitmap_directory",
            )
        data = await self.store.read(ext.directory_offset, ext.directory_size)
        return fmt.parse_bitmap_directory(data, ext.nb_bitmaps, ext.directory_offset)

    async def format_specific(self) -> tuple[tuple[str, object], ...]:
        """``qemu-img info``'s format-specific data for qcow2 (ImageInfoSpecificQCow2,
        in its schema order; encryption and data files never get this far)."""
        h = self.header
        pairs: list[tuple[str, object]] = [("compat", h.compat)]
        if h.version >= 3:
            pairs += [
                ("extended-l2", h.extended_l2),
                ("lazy-refcounts", h.lazy_refcounts),
                ("corrupt", h.corrupt),
            ]
        pairs.append(("refcount-bits", h.refcount_bits))
        bitmaps = await self.bitmaps() if h.version >= 3 else ()
        if bitmaps:
            pairs.append(
                (
                    "bitmaps",
                    [
                        (("name", b.name), ("granularity", b.granularity),
                         ("flags", list(b.flag_names)))
                        for b in bitmaps
                    ],
                )
            )  # fmt: skip
        compression = h.compression or fmt.CompressionType.ZLIB
        pairs.append(("compression-type", compression.name.lower()))
        return tuple(pairs)

    async def info(self) -> ImageInfo:
        return await self._info(
            backing_filename=self.backing_filename,
            backing_format=self.meta.backing_format,
            dirty=self.header.dirty,
            format_specific=await self.format_specific(),
            snapshots=tuple(
                SnapshotInfo(
                    id=s.id,
                    name=s.name,
                    vm_state_size=s.vm_state_size,
                    date_sec=s.date_sec,
                    date_nsec=s.date_nsec,
                    vm_clock_nsec=s.vm_clock_nsec,
                    icount=s.icount,
                )
                for s in await self.snapshots()
            ),
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.store.close()
        finally:
            if self.backing is not None:
                await self.backing.close()


# ==========================================================================================
# zstd (optional)
# ==========================================================================================

_zstd: Any = None


class BadCompressedData(Exception):
    """A compressed cluster's bytes do not decode (turned into CorruptImageError)."""


def _zstd_decompress(data: bytes, cluster_size: int, filename: str) -> bytes:
    """Decode zstd frames until a cluster of output is produced (QEMU's
    qcow2_zstd_decompress: frames follow each other; input left over is ignored)."""
    global _zstd
    if _zstd is None:
        try:
            import zstandard
        except ImportError:
            raise UnsupportedFeatureError(
                "the image has zstd-compressed clusters and the Python package "
                "'zstandard' is not installed (pip install qedkit[zstd])",
                filename=filename,
                field="compression_type",
                offset=fmt.COMPRESSION_TYPE_OFFSET,
            ) from None
        _zstd = zstandard
    try:
        reader = _zstd.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        chunks: list[bytes] = []
        got = 0
        while got < cluster_size:
            chunk = reader.read(cluster_size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except _zstd.ZstdError as exc:
        raise BadCompressedData(f"zstd: {exc}") from exc
