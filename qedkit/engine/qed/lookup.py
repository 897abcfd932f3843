"""Address lookup: guest ranges to runs of data, zero and unallocated clusters.

References: qed_spec "Address translation"; QEMU block/qed-cluster.c
(qed_find_cluster, qed_count_contiguous_clusters).

Theory of operation
-------------------
``table_runs`` turns one L2 table and a guest range inside its span into runs of
DATA / ZERO / UNALLOCATED clusters, merging neighbours whose host clusters are
contiguous (and validating every data entry it passes: an invalid one is a
CorruptImageError naming the entry). That one primitive serves read, write, zeroing,
block status, the cluster map and the jobs; ``runs`` strings it across L2 spans.

``contiguous_host`` is the lookup's fast path: one cached table, one host-contiguous
run of valid data clusters, answered without building runs. It says -1 for
everything else, and the general path then finds out why.
"""

from __future__ import annotations

from array import array

from ...format.geometry import Geometry
from ...format.tables import L2_ZERO_CLUSTER
from ..base import BlockImage, Extent, ExtentKind
from ..l2cache import L2Cache
from .alloc import Allocator
from .tables import Tables

DATA = ExtentKind.DATA
ZERO = ExtentKind.ZERO
UNALLOCATED = ExtentKind.UNALLOCATED


class QedLookup(BlockImage):
    """Lookup methods of QedImage (the driver class is built in layers: lookup, io,
    image; the state is the image's tables and allocator, and the hot-path
    constants bound at open)."""

    geo: Geometry
    tables: Tables
    alloc: Allocator
    _l1: array[int]
    _cache: L2Cache
    _cluster_bits: int
    _cluster_mask: int
    _l2_mask: int
    _l1_shift: int
    _header_bytes: int

    def _bind_lookup(self) -> None:
        """Bind the geometry constants of the hot path as plain attributes."""
        geo = self.geo
        self._l1 = self.tables.l1
        self._cache = self.tables.cache
        self._cluster_bits = geo.cluster_bits
        self._cluster_mask = geo.cluster_size - 1
        self._l2_mask = geo.l2_entries - 1
        self._l1_shift = geo.cluster_bits + geo.l2_bits
        self._header_bytes = geo.header_bytes

    async def get_l2(self, l1_index: int) -> array[int] | None:
        """The L2 table for ``l1_index`` (None when the L1 entry is 0)."""
        return await self.tables.get_l2(l1_index)

    def table_runs(
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
                self.check_data_run(entry, expect - cs, l1_index, i, j - 1)
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

    def check_data_run(self, first: int, last: int, l1_index: int, i: int, j: int) -> None:
        """Raise CorruptImageError unless host clusters ``first`` (entry ``i``) to
        ``last`` (entry ``j``) are valid data cluster offsets."""
        geo = self.geo
        file_end = self.alloc.file_end
        if first % geo.cluster_size == 0 and first >= geo.header_bytes and last < file_end:
            return
        bad, index = (first, i)
        if first % geo.cluster_size == 0 and first >= geo.header_bytes:
            bad, index = (last, j)
        raise self.tables.invalid_entry(l1_index, index, bad)

    async def runs(self, offset: int, length: int) -> list[Extent]:
        """All runs of ``[offset, offset + length)``, in order (this layer only)."""
        out: list[Extent] = []
        span = self.geo.l2_span
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos // span
            piece_end = min(end, (l1_index + 1) * span)
            for run in self.table_runs(await self.get_l2(l1_index), l1_index, pos, piece_end):
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

    def contiguous_host(self, offset: int, end: int) -> int:
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
        if expect >= self.alloc.file_end:
            return -1
        return entry + (offset & self._cluster_mask)
