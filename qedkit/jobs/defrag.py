"""Defragmentation: move data clusters to their home positions, online or offline.

Theory of operation
-------------------
Guest cluster ``g`` is *at home* at host offset ``data_start + g * cluster_size``
(engine.layout). QED allocates at the end of the file in the order the guest first
writes, so after random first writes the clusters are scattered and a sequential
guest read becomes scattered host I/O. Defragmentation brings clusters home:

* **homecoming**: ``g``'s home slot is free (unused, a hole, past the end of the
  file): copy ``g`` there.
* **eviction**: ``g``'s home holds another guest's data, ``h``, which is not at its own
  home either: copy ``h`` past the home area first (to its own home if that is
  free), which frees the slot for ``g``.
* **stage 2** moves the L2 tables out of the home area, to the first free slots past
  its end, so that the home area holds data only and the homes of unallocated
  clusters stay free for them.

Every move is made crash-safe by ordering (``_move``): the destination is claimed in
the cluster map, the data is copied and flushed, then the L2 entries are rewritten and
flushed, and only then is the source released for reuse. At every instant each L2
entry points at a complete copy of its cluster, and a slot is never overwritten while
a durable entry still points to it. At the end, free slots inside the file are
punched (no disk space) and free space at its end is cut off.

Guest writes to exactly the clusters being moved wait (``QedImage.stall_writes``)
from before the copy until the new entries are written; all other I/O goes on.
Stalls are set while allocating writes are paused, so none is half done on a
stalled cluster.

Moves are made in batches (one flush pair per batch, many clusters per batch when
offline). Each round moves home every misplaced cluster whose home is free; when
few can go home, it evicts occupants first. Every homecoming is final (a cluster at
home is never evicted), so the process ends. At the end, free space past the last
used cluster is truncated.

Home slots of unallocated guest clusters stay free (holes, no disk space): they are
where the home allocation policy puts those clusters when they are first written.
QED has no free list, so every QED checker, ``qemu-img check`` included, counts them
as leaked clusters (exit code 3, "no harm to data"). See docs/DESIGN.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.layout import FREE, META, ClusterMap
from ..engine.qed import QedImage
from ..errors import InvalidRequestError, JobError, QedError
from ..format.sizes import parse_size
from .base import Argument, Job

# Offline batches: this many bytes are copied between two flush pairs.
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024
# When fewer homecomings than this fraction of a batch are possible, evict first,
# at most a batch / EVICT_SHARE clusters per round.
EVICT_WHEN_BELOW = 0.25
EVICT_SHARE = 8
# Online job: clusters per step. Big enough that a step's fixed cost (two flushes) is
# spread over 16 MiB, small enough that guest writes to moving clusters stall briefly.
DEFAULT_JOB_BATCH = 256

Checkpoint = Callable[[int, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Move:
    """Guest cluster ``guest`` moved from host offset ``src`` to ``dst``."""

    guest: int
    src: int
    dst: int
    home: bool  # dst is the cluster's home


@dataclass(frozen=True, slots=True)
class StepResult:
    moves: tuple[Move, ...]
    tables_moved: int
    done: bool  # no candidate was left in the tables searched

    @property
    def clusters_moved(self) -> int:
        return len(self.moves)


@dataclass
class DefragStats:
    clusters_moved: int = 0
    bytes_moved: int = 0
    tables_moved: int = 0
    rounds: int = 0
    seconds: float = 0.0
    truncated_bytes: int = 0
    done: bool = False

    def as_dict(self) -> dict[str, object]:
        mbps = self.bytes_moved / self.seconds / 1e6 if self.seconds else 0.0
        return {
            "clusters-moved": self.clusters_moved,
            "bytes-moved": self.bytes_moved,
            "tables-moved": self.tables_moved,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "mb-per-second": round(mbps, 1),
            "truncated-bytes": self.truncated_bytes,
            "done": self.done,
        }


@dataclass
class Defragmenter:
    """Defragments one open QED image; see the module docstring."""

    img: QedImage
    cmap: ClusterMap
    batch_bytes: int = DEFAULT_BATCH_BYTES
    stats: DefragStats = field(default_factory=DefragStats)
    # Misplaced clusters found by the last scan (guest cluster -> host offset), kept
    # current as moves happen, so that a round costs O(batch), not a scan of every
    # table; rescanned when it runs dry.
    _queue: dict[int, int] = field(default_factory=dict)
    # Guests of the queue whose home slot was free when last seen: the homecomings
    # of the next rounds, found without walking the queue (a slot a move frees is
    # the home of at most one guest).
    _ready: list[int] = field(default_factory=list)

    @classmethod
    async def create(cls, img: QedImage, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Defragmenter:
        if img.readonly:
            raise JobError("defragmentation needs the image open read-write", filename=img.filename)
        if img.header.needs_check:
            # A dirty image may hold leaks and unflushed tables; make it whole first.
            await img.flush()
        async with img.allocations_paused():
            cmap = await img.ensure_cluster_map()
        return cls(img, cmap, batch_bytes)

    # ---- geometry ----------------------------------------------------------------

    @property
    def _bits(self) -> int:
        return self.img.geo.cluster_bits

    def home(self, guest: int) -> int:
        return self.img.data_start + (guest << self._bits)

    # ---- finding work --------------------------------------------------------------

    async def _tables(self, cached_only: bool) -> list[tuple[int, array[int]]]:
        img = self.img
        out = []
        for l1_index, l2_offset in enumerate(img.l1_table):
            if not l2_offset:
                continue
            table = img.cache.get(l2_offset) if cached_only else await img.get_l2(l1_index)
            if table is not None:
                out.append((l1_index, table))
        return out

    async def _misplaced(self, tables: list[tuple[int, array[int]]]) -> list[tuple[int, int]]:
        """(guest cluster, host offset) of every data cluster not at home; yields to
        the event loop between tables (a scan is long next to a guest request)."""
        out = []
        entries = self.img.geo.l2_entries
        start = self.img.data_start
        bits = self._bits
        for l1_index, table in tables:
            base = l1_index * entries
            home = start + (base << bits)
            step = 1 << bits
            for index, entry in enumerate(table):
                if entry > 1 and entry != home:
                    out.append((base + index, entry))
                home += step
            await asyncio.sleep(0)
        return out

    async def load_queue(self, cached_only: bool) -> int:
        """Scan for misplaced clusters (the queue the rounds work through); returns
        how many there are."""
        self._set_queue(dict(await self._misplaced(await self._tables(cached_only))))
        return len(self._queue)

    def _set_queue(self, queue: dict[int, int]) -> None:
        self._queue = queue
        cmap = self.cmap
        bits = self._bits
        self._ready = [g for g in queue if cmap.get(self.home(g) >> bits) == FREE]
        self._ready.reverse()  # popped from the end: guest order

    def _freed(self, slot: int) -> None:
        """``slot`` became free: its guest, if misplaced, can come home."""
        guest = (slot - self.img.data_start) >> self._bits
        if guest >= 0 and guest in self._queue:
            self._ready.append(guest)

    # ---- one round -----------------------------------------------------------------

    async def round(self, *, cached_only: bool, limit: int) -> StepResult:
        """Plan and make up to ``limit`` moves (a batch of evictions, then a batch of
        homecomings). ``cached_only``: look only at L2 tables already in the cache
        (an online step must not read tables to find work)."""
        if not self._queue:
            await self.load_queue(cached_only)
        queue = self._queue
        cmap = self.cmap
        bits = self._bits
        homecomings: list[tuple[int, int, int]] = []
        chosen: set[int] = set()
        ready = self._ready
        while ready and len(homecomings) < limit:
            guest = ready.pop()
            src = queue.get(guest)
            home = self.home(guest)
            if src is not None and guest not in chosen and cmap.get(home >> bits) == FREE:
                homecomings.append((guest, src, home))
                chosen.add(guest)
        blocked: list[tuple[int, int, int]] = []  # (guest, src, occupant guest)
        meta_blocked = 0
        if len(homecomings) < max(1, int(limit * EVICT_WHEN_BELOW)):
            # Few homecomings ready: walk the queue for evictions (and free homes
            # the ready list missed), only until a batch of them is found.
            for guest, src in queue.items():
                home = self.home(guest)
                owner = cmap.get(home >> bits)
                if owner == FREE:
                    if len(homecomings) < limit and guest not in chosen:
                        homecomings.append((guest, src, home))
                        chosen.add(guest)
                elif owner == META:
                    meta_blocked += 1
                elif owner >= 0:
                    blocked.append((guest, src, owner))
                    if len(blocked) >= limit:
                        break
        if meta_blocked and not homecomings:
            tables = await self.move_tables()
            if tables:
                self._set_queue(queue)  # the tables left home slots free
                return StepResult((), tables, done=False)
        if not homecomings and not blocked:
            tables = await self.move_tables()
            if tables:
                self._set_queue(queue)  # the tables left home slots free
                return StepResult((), tables, done=False)
            if queue:  # stale entries only (changed since the scan): look again
                self._queue = {}
                return StepResult((), 0, done=False)
            return StepResult((), 0, done=True)
        moves: list[Move] = []
        if len(homecomings) < max(1, int(limit * EVICT_WHEN_BELOW)) and blocked:
            # Evict only a slice: each eviction starts a chain of homecomings (a slot
            # freed by one cluster is the home of another), so a few evictions per
            # round keep the data copied close to once per cluster.
            room = max(1, min(limit - len(homecomings), limit // EVICT_SHARE))
            evictions = []
            freed = set()
            for guest, _src, occupant in blocked[:room]:
                occupant_home = self.home(occupant)
                where = self.home(guest)
                if occupant_home >> bits not in freed and cmap.get(occupant_home >> bits) == FREE:
                    dst = occupant_home  # the occupant can go home itself
                    freed.add(dst >> bits)
                else:
                    dst = -1  # past the home area, chosen when moving
                evictions.append((occupant, where, dst))
            moves += await self._move(evictions)
            for guest, src, _occupant in blocked[:room]:
                homecomings.append((guest, src, self.home(guest)))
        moves += await self._move(homecomings[:limit])
        if not moves:
            # Every candidate changed under us: start again from a fresh scan; if that
            # finds nothing either, the next round says done.
            self._queue = {}
        return StepResult(tuple(moves), 0, done=False)

    async def _move(self, plan: list[tuple[int, int, int]]) -> list[Move]:
        """Move guest clusters (guest, src, dst; dst -1 = past the home area) as one batch:
        claim, stall, copy, flush, rewrite the entries, flush, release the sources."""
        if not plan:
            return []
        img = self.img
        cmap = self.cmap
        bits = self._bits
        size = img.geo.cluster_size
        moves: list[Move] = []
        async with img.allocations_paused():
            for guest, src, dst in plan:
                table = await img.get_l2(guest // img.geo.l2_entries)
                if table is None or table[guest % img.geo.l2_entries] != src:
                    continue  # changed meanwhile (cannot happen today: only we move)
                if dst < 0 or not cmap.is_free(dst >> bits):
                    if dst >= 0:
                        continue  # taken meanwhile by the home allocation policy
                    dst = img.place_outside_home(1)  # never onto another home
                cmap.claim_data(dst >> bits, 1, guest)
                img.set_file_end(max(img.file_end, dst + size))
                moves.append(Move(guest, src, dst, dst == self.home(guest)))
            release = await img.stall_writes([m.guest for m in moves])
        try:
            for m in moves:
                await img.store.copy_range(m.src, m.dst, size)
            await img.store.flush()
            by_table: dict[int, dict[int, int]] = {}
            for m in moves:
                l1_index, index = divmod(m.guest, img.geo.l2_entries)
                by_table.setdefault(l1_index, {})[index] = m.dst
            async with img.allocations_paused():
                for l1_index, updates in by_table.items():
                    table = await img.get_l2(l1_index)
                    assert table is not None
                    await img.write_l2_entries(l1_index, table, updates)
            await img.store.flush()
        except BaseException:
            img.cluster_map = None  # rebuilt by a scan on next use: the safe answer
            raise
        finally:
            release()
        for m in moves:
            cmap.release(m.src >> bits)
            if m.home:
                self._queue.pop(m.guest, None)
            else:
                self._queue[m.guest] = m.dst
        for m in moves:
            self._freed(m.src)
        self.stats.clusters_moved += len(moves)
        self.stats.bytes_moved += len(moves) * size
        return moves

    async def move_tables(self) -> int:
        """Stage 2: move every L2 table inside the home area to the first free slots
        past it, so that the home area holds data only (and the homes of unallocated
        clusters stay free for them)."""
        img = self.img
        data_start, home_end = img.data_start, img.home_end
        moved = 0
        for l1_index, l2_offset in enumerate(img.l1_table):
            if l2_offset and data_start <= l2_offset < home_end:
                await self._move_table(l1_index)
                moved += 1
        self.stats.tables_moved += moved
        return moved

    async def _move_table(self, l1_index: int, target: int | None = None) -> None:
        img = self.img
        cmap = self.cmap
        geo = img.geo
        bits = self._bits
        async with img.allocations_paused():
            table = await img.get_l2(l1_index)
            assert table is not None
            old = img.l1_table[l1_index]
            dst = target if target is not None else self._table_slot(img.home_end)
            cmap.claim_range(dst >> bits, geo.table_size, META)
            img.set_file_end(max(img.file_end, dst + geo.table_bytes))
            try:
                await img.store.copy_range(old, dst, geo.table_bytes)
                await img.store.flush()
                await img.set_l1_entry(l1_index, dst)
                await img.store.flush()
            except BaseException:
                img.cluster_map = None
                raise
            img.cache.forget(old)
            img.cache.store(dst, table)
        cmap.release(old >> bits, geo.table_size)

    def _table_slot(self, start: int) -> int:
        """The first ``table_size`` free clusters at or after ``start``."""
        bits = self._bits
        count = self.img.geo.table_size
        index = start >> bits
        while not self.cmap.is_free(index, count):
            index += 1
        return index << bits

    async def compact_tables(self) -> int:
        """Move L2 tables that sit past the allocated home area down to the first free
        slots after it, so that the free space left behind by moves ends up at the end
        of the file, where ``truncate`` removes it."""
        img = self.img
        bits = self._bits
        moved = 0
        start = img.home_end
        for l1_index, l2_offset in sorted(enumerate(img.l1_table), key=lambda item: item[1]):
            if not l2_offset or l2_offset < start:
                continue
            target = self._table_slot(start)
            if target < l2_offset:
                await self._move_table(l1_index, target)
                moved += 1
            start = img.l1_table[l1_index] + (img.geo.table_size << bits)
        self.stats.tables_moved += moved
        return moved

    # ---- whole runs -----------------------------------------------------------------

    async def run(
        self,
        *,
        cached_only: bool = False,
        checkpoint: Checkpoint | None = None,
        until_done: bool = True,
    ) -> DefragStats:
        """Rounds until no cluster is left to move, then truncate the free tail."""
        limit = max(1, self.batch_bytes >> self._bits)
        started = time.monotonic()
        total = max(1, await self.load_queue(cached_only))
        while True:
            result = await self.round(cached_only=cached_only, limit=limit)
            self.stats.rounds += 1
            if checkpoint is not None:
                await checkpoint(min(self.stats.clusters_moved, total), total)
            if result.done or not until_done:
                break
        self.stats.done = result.done
        if result.done:
            await self.compact_tables()
        await self.truncate()
        await self.punch_free()
        self.stats.seconds += time.monotonic() - started
        return self.stats

    async def punch_free(self) -> int:
        """Release the disk space of free clusters inside the file (slots left by
        moves, holes of unallocated homes), one punch per run; returns bytes."""
        img = self.img
        bits = self._bits
        owner = self.cmap.owner
        punched = 0
        async with img.allocations_paused():
            index, end = 0, min(len(owner), img.file_end >> bits)
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

    async def truncate(self) -> int:
        """Cut free space past the last used cluster; returns the bytes removed."""
        img = self.img
        async with img.allocations_paused():
            end = (self.cmap.last_used() + 1) << self._bits
            size = await img.store.size()
            if end >= size:
                return 0
            await img.store.flush()
            await img.store.truncate(end)
            await img.store.flush()
            img.set_file_end(end)
            del self.cmap.owner[end >> self._bits :]
        self.stats.truncated_bytes += size - end
        return size - end


# ---- the online job ---------------------------------------------------------------


class DefragJob(Job):
    """``job-start type=defrag``: defragment a served image while it is in use.

    Arguments: ``argument_spec`` (rate, idle, batch). Each step searches the L2
    tables in the cache; when they hold no more work, one full pass reads the others.
    """

    type = "defrag"
    summary = "move data clusters home while the image is served"
    argument_spec = (
        Argument("rate", "size", "bytes moved per second at most (default 0: no limit)"),
        Argument(
            "idle",
            "number",
            "ms without guest requests before each step (default 0)",
        ),
        Argument("batch", "integer", f"clusters per step (default {DEFAULT_JOB_BATCH})"),
    )

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``rate`` (bytes per second, size suffixes allowed: "50M"), ``idle``
        (milliseconds) and ``batch`` (clusters) at job-start."""
        out: dict[str, Any] = {}
        names = cls.argument_names()
        for key in arguments:
            if key not in names:
                raise InvalidRequestError(f"defrag: unknown argument {key!r} ({', '.join(names)})")
        try:
            out["rate"] = parse_size(str(arguments.get("rate", 0) or 0))
            out["idle"] = float(arguments.get("idle", 0) or 0)
            out["batch"] = int(arguments.get("batch", DEFAULT_JOB_BATCH))
        except ValueError as exc:
            raise InvalidRequestError(f"defrag: {exc}") from None
        if out["idle"] < 0 or out["batch"] < 1:
            raise InvalidRequestError("defrag: idle must be >= 0 and batch >= 1")
        return out

    async def work(self) -> dict[str, Any]:
        image = self.image
        if not isinstance(image, QedImage):
            raise JobError(f"{image.filename}: only QED images can be defragmented")
        options = self.options
        rate, idle, batch = options["rate"], options["idle"] / 1000.0, options["batch"]
        if rate:
            # Steps of at most a quarter second's worth keep the rate smooth.
            batch = max(1, min(batch, (rate // 4) >> image.geo.cluster_bits))
        defrag = await Defragmenter.create(image, batch_bytes=batch << image.geo.cluster_bits)
        total = max(1, await defrag.load_queue(False))
        started = time.monotonic()
        cached_only = True
        try:
            while True:
                await self.checkpoint(min(defrag.stats.clusters_moved, total), total)
                if idle > 0:
                    await self._wait_idle(idle)
                result = await defrag.round(cached_only=cached_only, limit=batch)
                defrag.stats.rounds += 1
                if result.done:
                    if not cached_only:
                        break
                    cached_only = False  # the cache is done: one pass over every table
                elif not cached_only:
                    cached_only = True
                while rate > 0:
                    ahead = defrag.stats.bytes_moved / rate - (time.monotonic() - started)
                    if ahead <= 0:
                        break
                    await asyncio.sleep(min(ahead, 0.05))
                    # pausing while ahead of the rate: the time paused does not count
                    paused_at = time.monotonic()
                    await self.checkpoint(min(defrag.stats.clusters_moved, total), total)
                    started += time.monotonic() - paused_at
            defrag.stats.done = True
            await defrag.compact_tables()
        finally:
            # Also when cancelled: cut the free tail and punch the slots moves left,
            # so a partial run costs no disk space (they stay counted as leaks).
            with contextlib.suppress(QedError):
                await defrag.truncate()
                await defrag.punch_free()
        defrag.stats.seconds = time.monotonic() - started
        await self.checkpoint(total, total)
        return defrag.stats.as_dict()

    async def _wait_idle(self, idle: float) -> None:
        """Wait until the guest made no request for ``idle`` seconds (the job yields
        to busy guests), checking at most every 10 ms; pausing and cancelling work
        while waiting."""
        activity = self.activity
        if activity is None:
            return
        seen = activity()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            await asyncio.sleep(min(idle, 0.01))
            now = activity()
            if now != seen:
                seen = now
                quiet_since = time.monotonic()
            await self.checkpoint(self.current, self.total)
