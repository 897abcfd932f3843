"""A write-through LRU cache of L2 tables with a byte budget.

Tables are keyed by their file offset. The cache never holds dirty state: writers
update the table on disk first and then ``store`` the new version here, so eviction
is free and a crash can never lose a cached update.

A load races with a writer when the load's disk read started before the writer's
table write finished: the load would then cache stale entries. Every ``store`` bumps
a per-table generation; ``offer`` (used by loaders) caches a table only if the
generation it saw before reading is still current.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

# Default budget: 4 MiB = 16 tables of the default 256 KiB, mapping 32 GiB of guest
# space; QEMU keeps up to 50 tables (12.5 MiB). Opening never loads an L2 table, so a
# 1 TiB image opens in the size of its L1 (256 KiB by default) plus this budget.
DEFAULT_BUDGET = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    tables: int
    bytes: int
    budget: int


class L2Cache:
    def __init__(self, table_bytes: int, budget: int = DEFAULT_BUDGET) -> None:
        self.table_bytes = table_bytes
        # Always room for at least two tables: a request crossing an L2 boundary.
        self.budget = max(budget, 2 * table_bytes)
        self._tables: OrderedDict[int, array[int]] = OrderedDict()
        self._generation: dict[int, int] = {}
        self._hits = 0
        self._misses = 0

    def get(self, offset: int) -> array[int] | None:
        table = self._tables.get(offset)
        if table is None:
            self._misses += 1
            return None
        self._hits += 1
        self._tables.move_to_end(offset)
        return table

    def generation(self, offset: int) -> int:
        return self._generation.get(offset, 0)

    def store(self, offset: int, table: array[int]) -> None:
        """Cache ``table`` as the current content of the table at ``offset``."""
        self._generation[offset] = self._generation.get(offset, 0) + 1
        self._insert(offset, table)

    def offer(self, offset: int, table: array[int], generation: int) -> array[int]:
        """Cache a freshly loaded table unless a writer stored a newer one meanwhile;
        returns the table to use."""
        if self._generation.get(offset, 0) != generation:
            current = self._tables.get(offset)
            if current is not None:
                return current
            # Newer version was evicted already: the disk holds it; the caller
            # retries its load.
            raise StaleLoad
        existing = self._tables.get(offset)
        if existing is not None:
            return existing
        self._insert(offset, table)
        return table

    def forget(self, offset: int) -> None:
        self._tables.pop(offset, None)
        self._generation[offset] = self._generation.get(offset, 0) + 1

    def clear(self) -> None:
        for offset in list(self._tables):
            self.forget(offset)

    def _insert(self, offset: int, table: array[int]) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) * self.table_bytes > self.budget and len(self._tables) > 1:
            self._tables.popitem(last=False)

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            tables=len(self._tables),
            bytes=len(self._tables) * self.table_bytes,
            budget=self.budget,
        )


class StaleLoad(Exception):
    """A load lost a race with a writer whose newer table was already evicted: load again."""
