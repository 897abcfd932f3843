"""Defragmentation: move clusters to where a target layout wants them, online or offline.

Theory of operation
-------------------
QED allocates at the end of the file in the order the guest first writes, so after
random first writes the clusters are scattered and a sequential guest read becomes
scattered host I/O. A *target layout* (engine.qed.alloc.TargetLayout) says where
every L2 table and data cluster belongs:

* **packed** (the default): the tables right after the L1 table, then the allocated
  clusters in guest order, nothing between them. A sequential read is one host read
  per run, the file is as small as a converted copy, and it checks clean.
* **identity** (images with the home allocation policy): guest cluster ``g`` at
  ``data_start + g * cluster_size``, tables after that home area; raw-like for any
  later write, at the cost of a file spanning the disk whose holes checkers call
  leaks.

The plan is made once, by a scan of every table (``create``); tables that map
nothing are dropped first. Then:

* **tables** go to their targets first (each move clears the target slots: data in
  them is evicted, another table moved aside);
* **homecoming**: a data cluster whose home slot is free goes there;
* **eviction**: a cluster whose home holds another planned cluster that is not at
  its own home either moves that occupant first (to the occupant's own home if free,
  else past the planned area), which frees the slot.

Every homecoming is final (a cluster at home is never evicted), so the process ends.
Clusters the guest allocates while an online job runs are not in the plan: they land
past the planned area and the last step (``finish``) compacts them down into the
free slots there (packed) before the free tail of the file is truncated.

Moves themselves are engine.qed.move's: crash-safe ordering, writes to exactly the
clusters being moved stall, everything else goes on. Rounds cost O(batch): the
misplaced clusters found by the scan stay in a queue and the ones whose home slot is
free sit in a ready list fed by every move (the slot a move frees is the home of at
most one planned cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.qed import (
    FREE,
    META,
    ClusterMap,
    LayoutKind,
    Move,
    Mover,
    Planned,
    QedImage,
    TargetLayout,
)
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
# A packed plan is made again when it is carried out and the guest allocated clusters
# meanwhile, at most this many times per run (a guest that keeps allocating would
# otherwise hold the job forever: what it allocates after the last plan is compacted
# past the planned area instead).
MAX_REPLANS = 3

Checkpoint = Callable[[int, int], Awaitable[None]]


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
    tables_dropped: int = 0
    zero_clusters_made: int = 0
    rounds: int = 0
    seconds: float = 0.0
    truncated_bytes: int = 0
    layout: str = LayoutKind.PACKED.value
    done: bool = False

    def as_dict(self) -> dict[str, object]:
        mbps = self.bytes_moved / self.seconds / 1e6 if self.seconds else 0.0
        return {
            "layout": self.layout,
            "clusters-moved": self.clusters_moved,
            "bytes-moved": self.bytes_moved,
            "tables-moved": self.tables_moved,
            "tables-dropped": self.tables_dropped,
            "zero-clusters-made": self.zero_clusters_made,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "mb-per-second": round(mbps, 1),
            "truncated-bytes": self.truncated_bytes,
            "done": self.done,
        }


@dataclass(frozen=True, slots=True)
class _Blocked:
    """Planned cluster ``guest`` (at ``src``) whose home holds planned ``occupant``."""

    guest: int
    src: int
    occupant: int


@dataclass
class Defragmenter:
    """Defragments one open QED image towards ``target``; see the module docstring."""

    img: QedImage
    target: TargetLayout
    # The cluster map the plan was made with (a failed move drops the image's map:
    # a new plan is then needed).
    cmap: ClusterMap
    batch_bytes: int = DEFAULT_BATCH_BYTES
    stats: DefragStats = field(default_factory=DefragStats)
    # Misplaced planned clusters (guest cluster -> host offset), kept current as
    # moves happen, so that a round costs O(batch); rescanned when it runs dry.
    _queue: dict[int, int] = field(default_factory=dict)
    # Guests of the queue whose home slot was free when last seen: the homecomings
    # of the next rounds, found without walking the queue.
    _ready: list[int] = field(default_factory=list)
    replans: int = 0
    _evict_share: int = 0  # evictions per round while homecomings stay few

    @classmethod
    async def create(
        cls,
        img: QedImage,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        layout: LayoutKind | None = None,
        *,
        zero_detect: bool = True,
    ) -> Defragmenter:
        """Plan the defragmentation of ``img``. ``layout`` None keeps the image's
        policy (identity with the home allocation bit, else packed); choosing one
        sets the policy to match, so that later allocations keep the layout.
        ``zero_detect`` reads every data cluster once and turns the ones that hold
        only zeros into zero clusters (as ``qemu-img convert`` drops them)."""
        if img.readonly:
            raise JobError("defragmentation needs the image open read-write", filename=img.filename)
        if img.header.needs_check:
            # A dirty image may hold leaks and unflushed tables; make it whole first.
            await img.flush()
        if layout is None:
            layout = LayoutKind.IDENTITY if img.home_allocation else LayoutKind.PACKED
        if img.home_allocation != (layout is LayoutKind.IDENTITY):
            await img.set_home_allocation(layout is LayoutKind.IDENTITY)
        async with img.allocations_paused():
            cmap = await img.ensure_cluster_map()
        planned = await _plan(img, layout, zero_detect)
        target = planned.target
        defrag = cls(img, target, cmap, batch_bytes)
        defrag.stats.layout = layout.value
        defrag.stats.tables_dropped = planned.tables_dropped
        defrag.stats.zero_clusters_made = planned.zeroed
        return defrag

    # ---- geometry ----------------------------------------------------------------

    @property
    def _bits(self) -> int:
        return self.img.geo.cluster_bits

    @property
    def mover(self) -> Mover:
        return Mover(self.img, spill=self.target.end)

    def home(self, guest: int) -> int | None:
        return self.target.home(guest)

    def _free(self, offset: int) -> bool:
        cmap = self.img.cluster_map
        assert cmap is not None
        return cmap.get(offset >> self._bits) == FREE

    # ---- finding work --------------------------------------------------------------

    async def load_queue(self, cached_only: bool) -> int:
        """Scan for misplaced planned clusters (the queue the rounds work through),
        in the L2 tables of the cache only when ``cached_only``; returns how many."""
        img = self.img
        entries = img.geo.l2_entries
        queue: dict[int, int] = {}
        for l1_index, l2_offset in enumerate(img.l1_table):
            if not l2_offset:
                continue
            table = img.cache.get(l2_offset) if cached_only else await img.get_l2(l1_index)
            if table is None:
                continue
            base = l1_index * entries
            for index, entry in enumerate(table):
                if entry > 1:
                    home = self.target.home(base + index)
                    if home is not None and entry != home:
                        queue[base + index] = entry
            await asyncio.sleep(0)  # a scan is long next to a guest request
        self._set_queue(queue)
        return len(queue)

    def _set_queue(self, queue: dict[int, int]) -> None:
        self._queue = queue
        ready = []
        for guest in queue:
            home = self.target.home(guest)
            if home is not None and self._free(home):
                ready.append(guest)
        ready.reverse()  # popped from the end: guest order
        self._ready = ready

    def _freed(self, slot: int) -> None:
        """``slot`` became free: its planned cluster, if misplaced, can come home."""
        guest = self.target.guest_at(slot)
        if guest is not None and guest in self._queue:
            self._ready.append(guest)

    def _tables_off_target(self) -> list[int]:
        l1 = self.img.l1_table
        return [i for i, dst in self.target.tables.items() if l1[i] and l1[i] != dst]

    # ---- late clusters ---------------------------------------------------------

    def _late(self) -> int:
        """How many data clusters are not in the plan (allocated after it was made)."""
        if self.target.kind is LayoutKind.IDENTITY:
            return 0  # every guest cluster has its home in an identity layout
        owner = self.cmap.owner
        data = len(owner) - owner.count(FREE) - owner.count(META)
        return data - len(self.target.guests)

    async def _replan(self) -> bool:
        """Once the plan is carried out, clusters allocated meanwhile sit past it:
        plan again (at most MAX_REPLANS times, so that a guest that keeps allocating
        cannot hold the job forever; the rest is compacted by ``finish``). Each new
        plan moves the clusters after the first late one in guest order."""
        if self.replans >= MAX_REPLANS or self._late() <= 0:
            return False
        self.replans += 1
        self.target = (await _plan(self.img, self.target.kind, zero_detect=False)).target
        self._queue = {}
        self._ready = []
        return True

    # ---- one round -----------------------------------------------------------------

    async def round(self, *, cached_only: bool, limit: int) -> StepResult:
        """Make up to ``limit`` moves: a table to its target if any is off it; else
        a batch of evictions if few homecomings are ready, then the homecomings.
        ``cached_only``: look for work only in L2 tables already in the cache (an
        online step must not read tables to find work)."""
        pending = self._tables_off_target()
        if pending:
            await self._place_table(pending[0])
            return StepResult((), 1, done=False)
        if not self._queue:
            await self.load_queue(cached_only)
        chosen: set[int] = set()
        homecomings = self._homecomings(limit, chosen)
        few = max(1, int(limit * EVICT_WHEN_BELOW))
        blocked: list[_Blocked] = []
        if len(homecomings) < few:
            blocked = self._walk_queue(limit, chosen, homecomings)
        if not homecomings and not blocked:
            if self._queue:  # stale entries only (changed since the scan): look again
                self._queue = {}
                return StepResult((), 0, done=False)
            if await self._replan():
                return StepResult((), 0, done=False)
            return StepResult((), 0, done=True)
        moves: list[Move] = []
        if len(homecomings) < few and blocked:
            # Evict only a slice: each eviction starts a chain of homecomings (a slot
            # freed by one cluster is the home of another), so a few evictions per
            # round keep the data copied close to once per cluster. When the chains
            # stay short round after round (a packed plan shifted by clusters that
            # were inserted: every home holds its neighbour), the slice doubles, up
            # to a whole batch: two copies per cluster, but a flush pair per batch
            # instead of per cluster.
            self._evict_share = min(limit, max(limit // EVICT_SHARE, 2 * self._evict_share))
            room = max(1, min(limit - len(homecomings), self._evict_share))
            moves += await self._move(self._evictions(blocked[:room], chosen))
            for b in blocked[:room]:
                home = self.home(b.guest)
                assert home is not None
                homecomings.append(Planned(b.guest, b.src, home, True))
        else:
            self._evict_share = 0
        moves += await self._move(homecomings[:limit])
        if not moves:
            # Every candidate changed under us: start again from a fresh scan; if that
            # finds nothing either, the next round says done.
            self._queue = {}
        return StepResult(tuple(moves), 0, done=False)

    def _homecomings(self, limit: int, chosen: set[int]) -> list[Planned]:
        """Ready clusters whose home is still free, up to ``limit``."""
        out: list[Planned] = []
        ready, queue = self._ready, self._queue
        while ready and len(out) < limit:
            guest = ready.pop()
            src = queue.get(guest)
            home = self.home(guest)
            if src is not None and home is not None and guest not in chosen and self._free(home):
                out.append(Planned(guest, src, home, True))
                chosen.add(guest)
        return out

    def _walk_queue(
        self, limit: int, chosen: set[int], homecomings: list[Planned]
    ) -> list[_Blocked]:
        """Walk the queue for homes the ready list missed (appended to
        ``homecomings``) and for clusters blocked by a planned occupant, until a batch
        of those is found."""
        cmap = self.img.cluster_map
        assert cmap is not None
        bits = self._bits
        blocked: list[_Blocked] = []
        for guest, src in self._queue.items():
            home = self.home(guest)
            assert home is not None
            owner = cmap.get(home >> bits)
            if owner == FREE:
                if len(homecomings) < limit and guest not in chosen:
                    homecomings.append(Planned(guest, src, home, True))
                    chosen.add(guest)
            elif owner >= 0 and self.home(owner) is not None:
                blocked.append(_Blocked(guest, src, owner))
                if len(blocked) >= limit:
                    break
        return blocked

    def _evictions(self, blocked: list[_Blocked], chosen: set[int]) -> list[Planned]:
        """Moves that clear the homes of ``blocked``: each occupant to its own home if
        that is free, else past the planned area."""
        out: list[Planned] = []
        taken: set[int] = set()
        for b in blocked:
            if b.occupant in chosen:
                continue  # already coming home this round
            where = self.home(b.guest)
            occupant_home = self.home(b.occupant)
            assert where is not None and occupant_home is not None
            if occupant_home not in taken and self._free(occupant_home):
                taken.add(occupant_home)
                out.append(Planned(b.occupant, where, occupant_home, True))
            else:
                out.append(Planned(b.occupant, where, None))
        return out

    async def _move(self, plan: list[Planned]) -> list[Move]:
        """Make ``plan``'s moves as one batch (engine.qed.move), then update the
        queue and the ready list."""
        moves = await self.mover.move_data(plan)
        self._moved(moves)
        return moves

    def _moved(self, moves: list[Move]) -> None:
        for m in moves:
            if m.dst == self.home(m.guest):
                self._queue.pop(m.guest, None)
            elif self.home(m.guest) is not None:
                self._queue[m.guest] = m.dst
        for m in moves:
            self._freed(m.src)
        self.stats.clusters_moved += len(moves)
        self.stats.bytes_moved += len(moves) << self._bits

    async def _place_table(self, l1_index: int) -> None:
        """Move one table to its target: out of the way first if it overlaps its own
        target, then the target slots are cleared (data evicted, another table moved
        aside), then the table moves in."""
        img = self.img
        cmap = img.cluster_map
        assert cmap is not None
        bits = self._bits
        ts = img.geo.table_size
        dst = self.target.tables[l1_index]
        first = dst >> bits
        current = img.l1_table[l1_index] >> bits
        mover = self.mover
        if current < first + ts and first < current + ts:
            await mover.move_table(l1_index)  # past the planned area
            self.stats.tables_moved += 1
            return
        evict: list[Planned] = []
        for index in range(first, first + ts):
            owner = cmap.get(index)
            if owner >= 0:
                home = self.home(owner)
                home_ok = home is not None and not first <= home >> bits < first + ts
                if home_ok and home is not None and self._free(home):
                    evict.append(Planned(owner, index << bits, home, True))
                else:
                    evict.append(Planned(owner, index << bits, None))
            elif owner == META:
                other = next(
                    i
                    for i, off in enumerate(img.l1_table)
                    if off and off >> bits <= index < (off >> bits) + ts
                )
                await mover.move_table(other)
                self.stats.tables_moved += 1
                return
        if evict:
            moves = await mover.move_data(evict)
            self._moved(moves)
            if len(moves) != len(evict):
                return  # changed under us: the next round looks again
        await mover.move_table(l1_index, dst)
        self.stats.tables_moved += 1

    # ---- whole runs -----------------------------------------------------------------

    async def run(
        self,
        *,
        cached_only: bool = False,
        checkpoint: Checkpoint | None = None,
        until_done: bool = True,
    ) -> DefragStats:
        """Rounds until no cluster is left to move, then ``finish``."""
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
        await self.finish(complete=result.done)
        self.stats.seconds += time.monotonic() - started
        return self.stats

    async def finish(self, *, complete: bool) -> dict[str, int]:
        """The last step: with the plan ``complete`` and a packed layout, compact the
        clusters allocated meanwhile into the free slots past the planned area; then
        truncate the free tail and punch the free slots left inside (holes of an
        identity layout, or what an interrupted run leaves). Ends the job's hold on
        the allocator."""
        mover = self.mover
        compacted = 0
        self.img.alloc.reserved_end = 0
        if complete and self.target.kind is LayoutKind.PACKED:
            stats = await mover.compact()
            compacted = stats.clusters_moved + stats.tables_moved
            self.stats.truncated_bytes += stats.truncated_bytes
            self.stats.clusters_moved += stats.clusters_moved
            self.stats.bytes_moved += stats.clusters_moved << self._bits
            self.stats.tables_moved += stats.tables_moved
        truncated = await mover.truncate()
        self.stats.truncated_bytes += truncated
        punched = await mover.punch_free()
        return {"compacted": compacted, "truncated-bytes": truncated, "punched-bytes": punched}

    async def punch_free(self) -> int:
        return await self.mover.punch_free()

    async def truncate(self) -> int:
        removed = await self.mover.truncate()
        self.stats.truncated_bytes += removed
        return removed


def parse_layout(value: object, what: str) -> LayoutKind | None:
    """A layout name (``packed``, ``identity``) or None; InvalidRequestError else."""
    if value is None or value == "":
        return None
    try:
        return LayoutKind(str(value))
    except ValueError:
        raise InvalidRequestError(
            f"{what}: unknown layout {value!r} (packed or identity)"
        ) from None


@dataclass
class _Planned:
    target: TargetLayout
    tables_dropped: int
    zeroed: int


async def _plan(img: QedImage, kind: LayoutKind, zero_detect: bool) -> _Planned:
    """The target layout of ``img``. First, with allocations going on, tables that
    map nothing (every entry 0) are dropped and, with ``zero_detect``, data clusters
    that hold only zeros become zero clusters (engine.qed.move.zero_data), so that
    the result is as compact as a converted copy. Then one scan of the tables with
    allocations paused makes the plan and reserves its area (``reserved_end``): a
    cluster allocated after that lands past it, never inside the planned area.
    Caller has built the cluster map."""
    mover = Mover(img)
    dropped = zeroed = 0
    for l1_index, l2_offset in enumerate(img.l1_table):
        if not l2_offset:
            continue
        table = await img.get_l2(l1_index)
        assert table is not None
        if zero_detect:
            zeroed += await mover.zero_data(await _zero_clusters(img, l1_index, table))
            table = await img.get_l2(l1_index)
            assert table is not None
        if not any(table):
            await mover.drop_table(l1_index)
            dropped += 1
    entries = img.geo.l2_entries
    kept: list[int] = []
    guests = array("q")
    async with img.allocations_paused():
        for l1_index, l2_offset in enumerate(img.l1_table):
            if not l2_offset:
                continue
            table = await img.get_l2(l1_index)
            assert table is not None
            kept.append(l1_index)
            base = l1_index * entries
            guests.extend(base + index for index, entry in enumerate(table) if entry > 1)
        if kind is LayoutKind.IDENTITY:
            target = TargetLayout.identity(img.geo, img.data_start, img.size, kept)
        else:
            target = TargetLayout.packed(img.geo, img.data_start, kept, guests)
        img.alloc.reserved_end = target.end
    return _Planned(target, dropped, zeroed)


# Zero detection probes the first bytes of every data cluster; only a cluster whose
# probe reads zeros is read whole. Data rarely begins with 4 KiB of zeros, so this reads
# about 1/16 of the data of 64 KiB clusters (a full read of a 2 GiB image made the
# offline defrag 40% slower, measured).
ZERO_PROBE_BYTES = 4096
# The table walk yields to the event loop after this many probes (online jobs).
ZERO_PROBES_PER_YIELD = 256


async def _zero_clusters(img: QedImage, l1_index: int, table: array[int]) -> list[tuple[int, int]]:
    """(guest cluster, host offset) of the data clusters of one L2 table that read
    as zeros: a probe of each cluster's first bytes, then the whole cluster for the
    ones whose probe is zero."""
    cs = img.geo.cluster_size
    probe = min(cs, ZERO_PROBE_BYTES)
    zero_probe, zero = bytes(probe), bytes(cs)
    base = l1_index * img.geo.l2_entries
    out: list[tuple[int, int]] = []
    probes = 0
    pread = getattr(img.store, "pread_now", None)  # a local file: no coroutine per probe
    for index, entry in enumerate(table):
        if entry <= 1:
            continue
        probes += 1
        if probes % ZERO_PROBES_PER_YIELD == 0:
            await asyncio.sleep(0)
        head = pread(entry, probe) if pread is not None else await img.store.read(entry, probe)
        if head != zero_probe:
            continue
        if probe == cs or await img.store.read(entry, cs) == zero:
            out.append((base + index, entry))
    return out


# ---- the online job ---------------------------------------------------------------


class DefragJob(Job):
    """``job-start type=defrag``: defragment a served image while it is in use.

    Arguments: ``argument_spec`` (rate, idle, batch, layout). Each step searches the
    L2 tables in the cache; when they hold no more work, one full pass reads the
    others.
    """

    type = "defrag"
    _seen_activity = -1
    _quiet_since = 0.0
    summary = "lay the image out for sequential reads while it is served"
    argument_spec = (
        Argument("rate", "size", "bytes moved per second at most (default 0: no limit)"),
        Argument(
            "idle",
            "number",
            "ms without guest requests before each step (default 0)",
        ),
        Argument("batch", "integer", f"clusters per step (default {DEFAULT_JOB_BATCH})"),
        Argument(
            "layout",
            "packed|identity",
            "packed: tables, then the clusters in guest order, no holes; identity: each "
            "cluster at data start + guest offset (the file spans the disk, checkers call "
            "its holes leaks); default: the image's allocation policy",
        ),
        Argument(
            "zero-detect",
            "on|off",
            "clusters holding only zeros become zero clusters (default on)",
        ),
    )

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``rate`` (bytes per second, size suffixes allowed: "50M"), ``idle``
        (milliseconds), ``batch`` (clusters) and ``layout`` at job-start."""
        out: dict[str, Any] = {}
        names = cls.argument_names()
        for key in arguments:
            if key not in names:
                raise InvalidRequestError(f"defrag: unknown argument {key!r} ({', '.join(names)})")
        out["layout"] = parse_layout(arguments.get("layout"), "defrag")
        detect = str(arguments.get("zero-detect", "on")).lower()
        if detect not in ("on", "off", "true", "false", "1", "0"):
            raise InvalidRequestError(f"defrag: zero-detect must be on or off, not {detect!r}")
        out["zero-detect"] = detect in ("on", "true", "1")
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
        defrag = await Defragmenter.create(
            image,
            batch_bytes=batch << image.geo.cluster_bits,
            layout=options["layout"],
            zero_detect=options["zero-detect"],
        )
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
        finally:
            # Also when cancelled: cut the free tail and punch the slots moves left,
            # so a partial run costs no disk space (they stay counted as leaks until
            # a later run finishes).
            with contextlib.suppress(QedError):
                await defrag.finish(complete=defrag.stats.done)
            image.alloc.reserved_end = 0
        defrag.stats.seconds = time.monotonic() - started
        await self.checkpoint(total, total)
        return defrag.stats.as_dict()

    async def _wait_idle(self, idle: float) -> None:
        """Wait until the guest made no request for ``idle`` seconds (the job yields
        to busy guests), checking at most every 10 ms; pausing and cancelling work
        while waiting. The quiet time counts from the guest's last request, also
        across steps: a guest that stays quiet is not waited for again."""
        activity = self.activity
        if activity is None:
            return
        now = activity()
        if now != self._seen_activity:
            self._seen_activity = now
            self._quiet_since = time.monotonic()
        while time.monotonic() - self._quiet_since < idle:
            await asyncio.sleep(min(idle, 0.01))
            now = activity()
            if now != self._seen_activity:
                self._seen_activity = now
                self._quiet_since = time.monotonic()
            await self.checkpoint(self.current, self.total)
