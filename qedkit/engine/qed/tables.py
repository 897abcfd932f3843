"""L1 and L2 table I/O, each write in the order that makes a power loss harmless.

References: qed_spec "Tables", "Cluster allocation"; QEMU block/qed-table.c,
block/qed-l2-cache.c.

Theory of operation
-------------------
The L1 table lives in memory for the life of the image (``l1``: the array is never
replaced, only changed in place, so every holder of a reference sees updates). L2
tables come through a write-through LRU cache (engine.l2cache): a table changes in
memory only after its on-disk update succeeded, so eviction is free and a crash can
never lose a cached update.

Write ordering:

* an update of an existing L2 table rewrites only the 512-byte sectors holding the
  changed entries (sector writes are atomic), no flush: the caller orders it after
  the data it points to;
* a new L2 table is written whole and flushed before the L1 entry that links it;
* a moved table is copied and flushed, then linked, then flushed, so that the old
  copy may be reused once ``relocate`` returns;
* a moved L1 table is written whole at its new place and flushed (``copy_l1``)
  before the header that points at it is rewritten (engine.qed.image owns that).

An L1 entry is validated against the allocator's ``file_end`` before its table is
read (an invalid one is a CorruptImageError naming the entry's offset).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from ...errors import CorruptImageError
from ...format.geometry import SECTOR_SIZE, Geometry
from ...format.tables import new_table, pack_table, unpack_table
from ...store.base import Buffer, ByteStore
from ..l2cache import DEFAULT_BUDGET, L2Cache, StaleLoad
from .alloc import Allocator, TableSource

ENTRIES_PER_SECTOR = SECTOR_SIZE // 8  # table entries rewritten together


class Tables:
    """The L1 table and the L2 cache of one open image, and every table write."""

    def __init__(
        self,
        store: ByteStore,
        geo: Geometry,
        l1_table_offset: int,
        l1: array[int],
        alloc: Allocator,
        *,
        filename: str,
        cache_budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.store = store
        self.geo = geo
        self.l1_table_offset = l1_table_offset
        self.l1 = l1
        self.alloc = alloc
        self.filename = filename
        self.cache = L2Cache(geo.table_bytes, cache_budget)
        self._source: TableSource | None = None

    def _corrupt(self, message: str, offset: int, field: str) -> CorruptImageError:
        return CorruptImageError(message, filename=self.filename, offset=offset, field=field)

    # ---- reading ----------------------------------------------------------------

    async def get_l2(self, l1_index: int) -> array[int] | None:
        """The L2 table for ``l1_index`` (None when the L1 entry is 0)."""
        l2_offset = self.l1[l1_index]
        if l2_offset == 0:
            return None
        table = self.cache.get(l2_offset)
        if table is not None:
            return table
        if not self.geo.is_valid_table_offset(l2_offset, self.alloc.file_end):
            where = self.l1_table_offset + 8 * l1_index
            raise self._corrupt(
                f"L1 entry {l1_index} at offset {where} points to an invalid L2 table "
                f"offset {l2_offset:#x}",
                where,
                "l1_entry",
            )
        while True:
            generation = self.cache.generation(l2_offset)
            data = await self.store.read_exact(l2_offset, self.geo.table_bytes, "L2 table")
            try:
                return self.cache.offer(l2_offset, unpack_table(data), generation)
            except StaleLoad:
                continue

    def invalid_entry(self, l1_index: int, index: int, entry: int) -> CorruptImageError:
        """The error for L2 entry ``index`` of table ``l1_index`` holding ``entry``."""
        l2_offset = self.l1[l1_index]
        where = l2_offset + 8 * index
        return self._corrupt(
            f"L2 entry {index} of the table at {l2_offset:#x} (offset {where}) "
            f"holds an invalid cluster offset {entry:#x}",
            where,
            "l2_entry",
        )

    def source(self) -> TableSource:
        """The narrow view a cluster-map scan reads (made once: the L1 array and the
        table offset never change identity)."""
        if self._source is None:
            self._source = self._make_source()
        return self._source

    def _make_source(self) -> TableSource:
        def check_entry(index: int, entry: int, l1_index: int) -> None:
            raise self.invalid_entry(l1_index, index, entry)

        return TableSource(
            geo=self.geo,
            l1_table_offset=self.l1_table_offset,
            l1=self.l1,
            get_l2=self.get_l2,
            check_entry=check_entry,
            filename=self.filename,
        )

    # ---- writing ----------------------------------------------------------------

    async def write_entries(
        self, l1_index: int, table: array[int], updates: dict[int, int]
    ) -> None:
        """Rewrite the 512-byte sectors of the (cached) L2 table of ``l1_index`` that
        hold ``updates`` (index -> entry): one write from the first to the last of
        them (the sectors between are rewritten unchanged, and each sector alone is
        old or new after a crash); the table in memory changes only once that write
        succeeded. No flush. Callers hold the allocation lock."""
        offset, data = self._sectors(l1_index, table, updates)
        await self.store.write(offset, data)
        self._apply(l1_index, table, updates)

    def write_entries_now(
        self,
        l1_index: int,
        table: array[int],
        updates: dict[int, int],
        pwrite: Callable[[int, Buffer], None],
    ) -> None:
        """``write_entries`` through a synchronous store write (``pwrite_now``), for
        the synchronous group commit of engine.qed.io, whose entries may lie far
        apart in the table: entries more than ``_NEAR`` sectors from the next are
        written separately (rewriting the sectors between would cost more than
        another write), each run applied in memory once its write succeeded."""
        runs = _near_runs(updates) if len(updates) > 1 else (updates,)
        try:
            for run in runs:
                offset, data = self._sectors(l1_index, table, run)
                pwrite(offset, data)
                for index, entry in run.items():
                    table[index] = entry
        finally:  # the cached table is ``table`` itself: this files what was applied
            self.cache.store(self.l1[l1_index], table)

    def _sectors(
        self, l1_index: int, table: array[int], updates: dict[int, int]
    ) -> tuple[int, bytes]:
        """Where to write ``updates`` and the bytes: whole sectors of the table."""
        lo = min(updates) // ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR
        hi = (max(updates) // ENTRIES_PER_SECTOR + 1) * ENTRIES_PER_SECTOR
        span = array("Q", table[lo:hi])
        for index, entry in updates.items():
            span[index - lo] = entry
        return self.l1[l1_index] + 8 * lo, pack_table(span)

    def _apply(self, l1_index: int, table: array[int], updates: dict[int, int]) -> None:
        for index, entry in updates.items():
            table[index] = entry
        self.cache.store(self.l1[l1_index], table)

    async def set_l1_entry(self, l1_index: int, value: int) -> None:
        """Rewrite the L1 sector holding ``l1_index`` with ``value`` in it (no flush)."""
        lo = l1_index // ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR
        span = array("Q", self.l1[lo : lo + ENTRIES_PER_SECTOR])
        span[l1_index - lo] = value
        await self.store.write(self.l1_table_offset + 8 * lo, pack_table(span))
        self.l1[l1_index] = value

    async def add_table(self, l1_index: int, updates: dict[int, int]) -> None:
        """Link a new L2 table holding ``updates`` at ``l1_index`` (whose entry is 0):
        placed by the allocator, written whole and flushed, then the L1 entry."""
        table = new_table(self.geo.l2_entries)
        for index, entry in updates.items():
            table[index] = entry
        l2_offset = self.alloc.place_table()
        await self.store.write(l2_offset, pack_table(table))
        await self.store.flush()
        await self.set_l1_entry(l1_index, l2_offset)
        self.cache.store(l2_offset, table)

    async def relocate(self, l1_index: int, dst: int) -> int:
        """Move the L2 table of ``l1_index`` to ``dst`` (claimed by the caller): copy,
        flush, link, flush. Returns the old offset, free for reuse once this returns
        (the caller releases it)."""
        table = await self.get_l2(l1_index)
        assert table is not None
        old = self.l1[l1_index]
        await self.store.copy_range(old, dst, self.geo.table_bytes)
        await self.store.flush()
        await self.set_l1_entry(l1_index, dst)
        await self.store.flush()
        self.cache.forget(old)
        self.cache.store(dst, table)
        return old

    async def copy_l1(self, dst: int) -> None:
        """Write the whole L1 table at ``dst`` (claimed by the caller, not overlapping
        the current table) and flush; the header still points at the old copy, which
        stays intact. ``use_l1_at`` follows once the header points at ``dst``."""
        await self.store.write(dst, pack_table(self.l1))
        await self.store.flush()

    def use_l1_at(self, offset: int) -> None:
        """The header now points at the L1 copy at ``offset``: later L1 writes go there."""
        self.l1_table_offset = offset

    async def unlink(self, l1_index: int) -> int:
        """Drop the L2 table of ``l1_index`` (it maps nothing): the L1 entry becomes 0,
        flushed; returns the table's old offset, free once this returns (the caller
        releases it)."""
        old = self.l1[l1_index]
        await self.set_l1_entry(l1_index, 0)
        await self.store.flush()
        self.cache.forget(old)
        return old

    async def rewrite_table(self, l2_offset: int, table: array[int]) -> None:
        """Write a whole L2 table in place (repair); the cached copy is dropped."""
        await self.store.write(l2_offset, pack_table(table))
        self.cache.forget(l2_offset)

    async def rewrite_l1(self) -> None:
        """Write the whole in-memory L1 table (repair)."""
        await self.store.write(self.l1_table_offset, pack_table(self.l1))

    async def read_table(self, l2_offset: int) -> array[int]:
        """An L2 table read from disk, bypassing the cache (check and repair)."""
        return unpack_table(await self.read_table_bytes(l2_offset))

    async def read_table_bytes(self, l2_offset: int) -> bytes:
        """The bytes of an L2 table as on disk (little-endian entries), bypassing the
        cache (the check's bulk tests work on them)."""
        return await self.store.read_exact(l2_offset, self.geo.table_bytes, "L2 table")


# Sectors of unchanged entries one table write may carry between two changed ones
# (write_entries_now): 4 KiB, about what a write call costs in copying.
_NEAR = 8


def _near_runs(updates: dict[int, int]) -> list[dict[int, int]]:
    """``updates`` (index -> entry) cut where two consecutive changed entries lie
    more than ``_NEAR`` sectors apart."""
    runs: list[dict[int, int]] = []
    run: dict[int, int] = {}
    last = 0
    for index in sorted(updates):
        sector = index // ENTRIES_PER_SECTOR
        if run and sector - last > _NEAR:
            runs.append(run)
            run = {}
        run[index] = updates[index]
        last = sector
    runs.append(run)
    return runs
