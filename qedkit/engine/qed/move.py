"""Moving clusters and tables inside a QED file, crash-safely, while it is in use.

References: QED's design ("online defragmentation", never shipped by QEMU); the
ordering rules of qed_spec "Cluster allocation".

Theory of operation
-------------------
A move copies a data cluster (or an L2 table) to a free slot and repoints its entry.
The order makes every instant safe:

1. claim the destination in the cluster map (nobody else may place there);
2. stall guest writes to the moving guest clusters (engine.qed.io), with
   allocations paused while the stall is set, so none is half done on them;
3. copy, flush;
4. rewrite the L2 entries (for a table: the L1 entry), flush;
5. release the stall, then the source slot: only now may it be reused.

At every instant each entry points at a complete copy of its cluster, and a slot is
never overwritten while a durable entry still points to it. A batch of data moves
shares one flush pair. If a move fails midway the cluster map may be wrong, so it
is dropped (the next user rescans).

The L1 table moves the same way (``move_l1``: written whole at its new place,
flushed, the header repointed in one sector write, flushed, then released). This is
the one mechanism behind defragmentation (jobs.defrag plans, this moves), leak
compaction in repair (engine.check), the reclaim step of the in-place qcow2
conversion (jobs.inplace), the L1 move of a geometry change (jobs.amend) and the
final compaction of a defrag, a shrink and an amend:
``compact`` moves the clusters past the end of the used space into the free slots
below it, then ``truncate`` cuts the file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import JobError
from ...format.tables import L2_ZERO_CLUSTER
from .alloc import FREE, META

if TYPE_CHECKING:
    from .image import QedImage


@dataclass
class CompactStats:
    clusters_moved: int = 0
    tables_moved: int = 0
    truncated_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Move:
    """Guest cluster ``guest`` moved from host offset ``src`` to ``dst``."""

    guest: int
    src: int
    dst: int
    home: bool  # dst is where the plan wanted it


@dataclass(frozen=True, slots=True)
class Planned:
    """One data move asked of ``Mover.move_data``: guest cluster ``guest``, now at
    host ``src``, to ``dst``; ``dst`` None means the first free slot at or after
    ``spill`` (never a slot below it)."""

    guest: int
    src: int
    dst: int | None
    home: bool = False


class Mover:
    """Crash-safe moves in one open QED image (see the module docstring). Needs the
    image's cluster map (``await img.ensure_cluster_map()`` first)."""

    def __init__(self, img: QedImage, *, spill: int | None = None) -> None:
        self.img = img
        # Where moves without a destination go: free slots at or after this offset.
        self.spill = img.home_end if spill is None else spill

    async def move_data(self, plan: Sequence[Planned], *, spill: int | None = None) -> list[Move]:
        """Move guest clusters as one batch: claim, stall, copy, flush, rewrite the
        entries, flush, release the sources. A planned move whose cluster changed
        meanwhile, or whose destination was taken, is skipped. Moves without a
        destination go to the first free slot at or after ``spill`` (default: the
        mover's)."""
        spill = self.spill if spill is None else spill
        if not plan:
            return []
        img = self.img
        alloc = img.alloc
        cmap = alloc.cluster_map
        assert cmap is not None
        geo = img.geo
        bits = geo.cluster_bits
        size = geo.cluster_size
        moves: list[Move] = []
        async with img.allocations_paused():
            for p in plan:
                if await self._entry(p.guest) != p.src:
                    continue  # changed meanwhile
                dst = p.dst
                if dst is None:
                    dst = alloc.free_run(spill, 1)
                elif not cmap.is_free(dst >> bits):
                    continue  # taken meanwhile by the allocation policy
                alloc.claim(dst, 1, p.guest)
                moves.append(Move(p.guest, p.src, dst, p.home))
            release = await img.stall_writes([m.guest for m in moves])
        try:
            for m in moves:
                await img.store.copy_range(m.src, m.dst, size)
            await img.store.flush()
            await self._repoint((m.guest, m.dst) for m in moves)
            await img.store.flush()
        except BaseException:
            alloc.forget_map()  # rebuilt by a scan on next use: the safe answer
            raise
        finally:
            release()
        for m in moves:
            alloc.release(m.src)
        return moves

    async def move_table(self, l1_index: int, dst: int | None = None) -> int:
        """Move the L2 table of ``l1_index`` to ``dst`` (default: the first free
        slots at or after ``spill``); returns where it went."""
        img = self.img
        ts = img.geo.table_size
        async with img.allocations_paused():
            if dst is None:
                dst = img.alloc.free_run(self.spill, ts)
            old = await self._relocate(dst, lambda at: img.tables.relocate(l1_index, at))
        img.alloc.release(old, ts)
        return dst

    async def move_l1(self, dst: int | None = None) -> int:
        """Move the L1 table to ``dst`` (default: the first free run of
        ``table_size`` clusters after the header; it must not overlap the current
        table): claimed, written, flushed, the header repointed, flushed
        (``QedImage.relocate_l1``), then the old clusters are released. Allocations
        are paused throughout (an L1 update must not land in the copy being
        abandoned). Returns where it went."""
        img = self.img
        ts = img.geo.table_size
        async with img.allocations_paused():
            if dst is None:
                dst = img.alloc.free_run(img.geo.header_bytes, ts)
            if dst == img.tables.l1_table_offset:
                return dst
            old = await self._relocate(dst, img.relocate_l1)
        img.alloc.release(old, ts)
        return dst

    async def _relocate(self, dst: int, relocate: Callable[[int], Awaitable[int]]) -> int:
        """Claim ``table_size`` clusters at ``dst`` and ``relocate(dst)`` a table there
        (allocations paused by the caller); returns where the table was, for the caller
        to release once allocations go on. On failure the cluster map is dropped."""
        alloc = self.img.alloc
        alloc.claim(dst, self.img.geo.table_size, META)
        try:
            return await relocate(dst)
        except BaseException:
            alloc.forget_map()
            raise

    async def zero_data(self, candidates: Sequence[tuple[int, int]]) -> int:
        """Turn data clusters that hold only zeros into zero clusters (entry 1, as
        ``qemu-img convert`` and copy-on-read make them), freeing their slots.
        ``candidates``: (guest cluster, host offset) pairs a reader found zero; each
        is read again under a write stall before its entry changes, so a guest write
        that landed meanwhile keeps its cluster. Both entries read zeros, so every
        crash state reads the same. Returns how many were turned."""
        if not candidates:
            return 0
        img = self.img
        size = img.geo.cluster_size
        async with img.allocations_paused():
            still = [
                (guest, host) for guest, host in candidates if await self._entry(guest) == host
            ]
            release = await img.stall_writes([g for g, _ in still])
        zero = bytes(size)
        turned: list[tuple[int, int]] = []
        try:
            for guest, host in still:
                if await img.store.read(host, size) == zero:
                    turned.append((guest, host))
            await self._repoint((guest, L2_ZERO_CLUSTER) for guest, _ in turned)
            await img.store.flush()
        except BaseException:
            img.alloc.forget_map()
            raise
        finally:
            release()
        for _, host in turned:
            img.alloc.release(host)
        return len(turned)

    async def _entry(self, guest: int) -> int | None:
        """The L2 entry of guest cluster ``guest`` now; None when it has no L2 table."""
        img = self.img
        l1_index, index = divmod(guest, img.geo.l2_entries)
        table = await img.get_l2(l1_index)
        return None if table is None else table[index]

    async def _repoint(self, entries: Iterable[tuple[int, int]]) -> None:
        """Write ``(guest cluster, entry)`` pairs into their L2 tables (which exist),
        one write per table, with allocations paused."""
        img = self.img
        by_table: dict[int, dict[int, int]] = {}
        for guest, entry in entries:
            l1_index, index = divmod(guest, img.geo.l2_entries)
            by_table.setdefault(l1_index, {})[index] = entry
        async with img.allocations_paused():
            for l1_index, updates in by_table.items():
                table = await img.get_l2(l1_index)
                assert table is not None
                await img.tables.write_entries(l1_index, table, updates)

    async def drop_table(self, l1_index: int) -> None:
        """Unlink an L2 table that maps nothing (every entry 0) and free its clusters."""
        img = self.img
        async with img.allocations_paused():
            table = await img.get_l2(l1_index)
            assert table is not None and not any(table), "only an empty table is dropped"
            old = await img.tables.unlink(l1_index)
        img.alloc.release(old, img.geo.table_size)

    async def compact(self, *, batch: int = 256, max_rounds: int = 1000) -> CompactStats:
        """Remove every free slot inside the used part of the file: the clusters and
        tables past the first ``used`` clusters (``used`` = how many are owned) move
        into the free slots below, lowest first, keeping their host order; then the
        free tail is truncated. Tables go first (each needs ``table_size`` free slots
        in a row: when no such run is free, a window of slots is emptied: its data
        clusters, and any table this call has not placed yet, move past the used
        space). Under a guest that keeps allocating, it gives up after
        ``max_rounds`` rounds and leaves the rest for a later run."""
        img = self.img
        alloc = img.alloc
        cmap = alloc.cluster_map
        assert cmap is not None
        bits = img.geo.cluster_bits
        ts = img.geo.table_size
        stats = CompactStats()
        placed: set[int] = set()  # tables this call lowered: never evicted again
        for _ in range(max_rounds):
            owner = cmap.owner
            used = len(owner) - owner.count(FREE)
            above = [i for i in range(used, len(owner)) if owner[i] != FREE]
            if not above:
                break
            tables = sorted(
                (
                    l1_index
                    for l1_index, off in enumerate(img.l1_table)
                    if off and (off >> bits) + ts > used
                ),
                key=lambda l1_index: -img.l1_table[l1_index],
            )
            l1_at = img.tables.l1_table_offset >> bits
            if l1_at + ts > used:  # the L1 table too (a geometry change built it last)
                await self._lower(l1_at, used, self.move_l1, placed)
                stats.tables_moved += 1
                continue
            if tables:
                await self._lower_table(tables[0], used, placed)
                stats.tables_moved += 1
                continue
            if any(owner[i] < 0 for i in above):
                raise JobError(
                    "metadata that is not an L2 table lies past the used space",
                    filename=img.filename,
                )
            holes = [i for i in range(img.geo.header_size, used) if owner[i] == FREE]
            plan = [
                Planned(owner[src], src << bits, dst << bits)
                for src, dst in zip(above[:batch], holes, strict=False)
            ]
            moves = await self.move_data(plan)
            stats.clusters_moved += len(moves)
        stats.truncated_bytes = await self.truncate()
        return stats

    async def _lower_table(self, l1_index: int, used: int, placed: set[int]) -> None:
        """Move the table of ``l1_index`` (some of it at or past cluster ``used``) to
        ``table_size`` slots below ``used`` (see ``_lower``); once it is there it is
        ``placed`` and never evicted again, so every table settles in a few rounds."""
        img = self.img

        async def move(dst: int) -> int:
            return await self.move_table(l1_index, dst)

        current = img.l1_table[l1_index] >> img.geo.cluster_bits
        if await self._lower(current, used, move, placed):
            placed.add(l1_index)

    async def _lower(
        self,
        current: int,
        used: int,
        move: Callable[[int], Awaitable[int]],
        placed: set[int],
    ) -> bool:
        """Move a table now at cluster ``current`` (some of it at or past cluster
        ``used``) with ``move(dst)`` to ``table_size`` slots below ``used``; True when
        it got there. A free run if there is one, else the window nearest the top
        holding only data and free slots (not the table itself), emptied first (its
        data moves past ``used``).

        On a sparse image (data, table, data, table ...) no such window exists. Then
        the table, once it lies wholly past ``used`` (a table straddling it first
        moves out of the way: a copy never overlaps its source), takes the window
        nearest the top that holds neither the header, the L1 table nor a table in
        ``placed``: its data and its tables move past ``used`` first."""
        img = self.img
        cmap = img.alloc.cluster_map
        assert cmap is not None
        bits = img.geo.cluster_bits
        ts = img.geo.table_size
        owner = cmap.owner
        l1 = img.l1_table
        start = img.geo.header_size
        run = cmap.first_free_run(start, ts)
        if run + ts <= used:
            await move(run << bits)
            return True

        def top_window(fits: Callable[[range], bool]) -> range | None:
            for window in range(used - ts, start - 1, -1):
                slots = range(window, window + ts)
                if fits(slots):
                    return slots
            return None

        slots = top_window(
            lambda slots: (
                all(owner[i] >= 0 or owner[i] == FREE for i in slots)
                and not (slots.start < current + ts and current < slots.stop)
            )
        )
        table_at: dict[int, int] = {}  # cluster -> l1 index of a table not placed yet
        if slots is None:
            if current < used:
                # It straddles ``used``: the windows near the top overlap it.
                await move(self.free_run(max(used, current + ts) << bits, ts))
                return False
            for other, offset in enumerate(l1):
                if offset and other not in placed:
                    for k in range(ts):
                        table_at[(offset >> bits) + k] = other
            slots = top_window(lambda slots: all(owner[i] != META or i in table_at for i in slots))
            if slots is None:
                raise JobError(
                    "no room to move an L2 table below the used space", filename=img.filename
                )
        evict = [Planned(owner[i], i << bits, None) for i in slots if owner[i] >= 0]
        moved = await self.move_data(evict, spill=used << bits)
        if len(moved) != len(evict):
            return False  # something changed under us: the next round looks again
        for other in sorted({table_at[i] for i in slots if i in table_at}):
            await self.move_table(other, self.free_run(used << bits, ts))
        await move(slots.start << bits)
        return True

    def free_run(self, start: int, count: int) -> int:
        """The first ``count`` free clusters at or after ``start`` (not claimed)."""
        return self.img.alloc.free_run(start, count)

    async def truncate(self) -> int:
        """Cut free space past the last used cluster; returns the bytes removed."""
        img = self.img
        async with img.allocations_paused():
            end = img.alloc.last_used_end()
            size = await img.store.size()
            if end >= size:
                return 0
            await img.store.flush()
            await img.store.truncate(end)
            await img.store.flush()
            img.alloc.truncated(end)
        return size - end

    async def punch_free(self) -> int:
        """Release the disk space of free clusters inside the file (slots left by
        moves, holes), one punch per run; returns bytes."""
        img = self.img
        cmap = img.alloc.cluster_map
        assert cmap is not None
        bits = img.geo.cluster_bits
        punched = 0
        async with img.allocations_paused():
            owner = cmap.owner
            index, end = 0, min(len(owner), img.alloc.file_end >> bits)
            while index < end:
                if owner[index] != FREE:
                    index += 1
                    continue
                run_end = index
                while run_end < end and owner[run_end] == FREE:
                    run_end += 1
                await img.store.discard(index << bits, (run_end - index) << bits)
                punched += (run_end - index) << bits
                index = run_end
        return punched
