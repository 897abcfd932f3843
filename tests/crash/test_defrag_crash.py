"""Crash tests of defragmentation (qedkit/jobs/defrag.py): every step of a move batch
(claim, copy, flush, L2 entries, flush, release), of an eviction, of a stage-2 L2
table move (copy, flush, L1 entry, flush), of the table compaction, the truncation
and the hole punching.

A fragmented image (4 KiB clusters, table_size 2: the L2 tables land among the data,
on homes of allocated clusters) is built on a plain MemoryStore through the engine
(clusters written in a shuffled order, whole and partial, zero clusters, a run of
two, over no backing file or a raw one), closed cleanly, and opened on a CrashStore.
``Defragmenter.create(img, batch_bytes=4 clusters)`` then ``run()`` defragments it
there in many small rounds, logging every store op. Each crash point (all of them,
but a sample for ``two_tables``, whose file grows to 4 MiB; every whole-write state,
or up to 16 torn-sector states, per point) is recovered by
a read-write open and judged by crashkit.verify_state: check_image finds no
corruption, every guest byte reads exactly its pre-defragmentation content (no guest
request is in flight, so the model allows nothing else: defragmentation must never
change guest data), unallocated ranges stay unallocated, the image takes a new
write, and ``qemu-img check`` on a sample of the repaired files finds no corruption.

Three more workloads add guest requests, judged by the usual model: requests
acknowledged before a flush must read back (0 lost), the others old or new (0
corrupt). ``interleaved``: writes in place into clusters about to move, allocating
writes, zeroing and flushes between the rounds. ``home_allocation``: the same with
the home allocation policy on, so that new clusters take home slots that moves left
with stale bytes inside the file. ``concurrent``: guest writes run *during* the
rounds, while a round waits for its flushes (as with ``qed serve``, whose FileStore
flushes in a thread), one of them to a cluster being moved (it waits on the stall).

The last test shows the checks see a defragmenter that breaks the ordering (no flush
between the copies and the L2 entries).

Totals lines as in test_workloads.py (printed with -s and in the terminal summary).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    CS,
    L2_SPAN,
    KiB,
    QemuChecker,
    Scenario,
    Workload,
    assert_totals,
    crash_all,
    merge_ranges,
    pattern,
    round_down,
    round_up,
    run,
    sample_points,
    scaled,
)

from qedkit.engine.chain import open_qed
from qedkit.engine.qed import Planned, QedImage
from qedkit.jobs.defrag import Defragmenter, DefragStats, Move
from qedkit.store import CrashStore, MemoryStore

Record = Callable[[str], None]
BATCH = 4 * CS  # four clusters per move batch: many rounds on a small image


@dataclasses.dataclass
class Built:
    sc: Scenario
    stats: DefragStats
    misplaced: int  # data clusters away from home before the defragmentation
    tables_in_the_way: int  # L2 tables on homes of allocated clusters before it
    moves: list[Move]


class Recording(Defragmenter):
    """A Defragmenter that keeps every move it made (in ``made``)."""

    async def _move(self, plan: list[Planned]) -> list[Move]:
        moves = await super()._move(plan)
        if not hasattr(self, "made"):
            self.made: list[Move] = []
        self.made.extend(moves)
        return moves


# =====================================================================================
# Fragmented images
# =====================================================================================


def _plan(seed: int, clusters: list[int]) -> list[tuple[str, int, int]]:
    """(kind, guest offset, length) requests writing ``clusters`` in a shuffled order
    (the first one first, so that the first L2 table lands right after it, on the
    homes of the clusters after it)."""
    rng = random.Random(seed)
    first, rest = clusters[0], clusters[1:]
    rng.shuffle(rest)
    plan = [("write", first * CS, CS)]
    skip: set[int] = set()
    for i, c in enumerate(rest):
        if c in skip:
            continue
        r = rng.random()
        if r < 0.12:
            plan.append(("zero", c * CS, CS))
        elif r < 0.35:
            off = rng.randrange(CS - 1)
            plan.append(("write", c * CS + off, rng.randrange(1, CS - off)))
        elif r < 0.42 and c + 1 in rest[i + 1 :]:
            plan.append(("write", c * CS + 100, 2 * CS - 200))  # two clusters at once
            skip.add(c + 1)
        else:
            plan.append(("write", c * CS, CS))
    return plan


def _prepare(seed: int, plan: list[tuple[str, int, int]], home: bool = False) -> Any:
    async def prepare(img: QedImage, store: MemoryStore) -> None:
        for i, (kind, offset, length) in enumerate(plan):
            if kind == "zero":
                await img.write_zeroes(offset, length)
            elif kind == "zero-data":
                await img.write(offset, bytes(length))  # real zeros, allocated
            else:
                await img.write(offset, pattern(seed * 1000 + i, length))
        if home:
            await img.set_home_allocation(True)  # from now on (the header bit)

    return prepare


def _touched(plan: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    return [(round_down(o), round_up(o + n)) for _, o, n in plan]


async def _entries(img: QedImage) -> dict[int, int]:
    """Guest cluster -> L2 entry, for the data entries."""
    out: dict[int, int] = {}
    for l1_index, l2 in enumerate(img.l1_table):
        if not l2:
            continue
        table = await img.get_l2(l1_index)
        assert table is not None
        for index, entry in enumerate(table):
            if entry > 1:
                out[l1_index * img.geo.l2_entries + index] = entry
    return out


def _homes(img: QedImage, entries: dict[int, int]) -> dict[int, int]:
    """Where defragmentation puts each data cluster, from the definitions: identity
    (home allocation policy) data start + guest offset; packed, past every L2 table,
    the allocated clusters one after the other in guest order."""
    cs = img.geo.cluster_size
    if img.home_allocation:
        return {g: img.data_start + g * cs for g in entries}
    base = img.data_start + sum(1 for e in img.l1_table if e) * img.geo.table_bytes
    return {g: base + i * cs for i, g in enumerate(sorted(entries))}


async def _layout(img: QedImage) -> tuple[int, int]:
    """(data clusters away from home, L2 tables on homes of allocated clusters)."""
    bits = img.geo.cluster_bits
    entries = await _entries(img)
    home = _homes(img, entries)
    homes = {h >> bits for h in home.values()}
    misplaced = sum(1 for g, e in entries.items() if e != home[g])
    tables = sum(
        1
        for l2 in img.l1_table
        if l2 and homes & set(range(l2 >> bits, (l2 >> bits) + img.geo.table_size))
    )
    return misplaced, tables


async def _build(
    name: str,
    size: int,
    clusters: list[int],
    seed: int,
    *,
    backing: bytes | None = None,
    interleave: bool = False,
    concurrent: bool = False,
    home: bool = False,
    zeros: list[int] | None = None,
) -> Built:
    plan = _plan(seed, clusters)
    if zeros:
        plan += [("zero-data", c * CS, CS) for c in zeros]
    w = await Workload.create(
        name,
        size,
        backing=backing,
        prepare=_prepare(seed, plan, home),
        store_class=_FlushesInAThread if concurrent else CrashStore,
    )
    img = w.img
    assert img.home_allocation == home
    misplaced, tables = await _layout(img)
    defrag = await Recording.create(img, batch_bytes=BATCH)
    assert isinstance(defrag, Recording)
    if interleave:
        await _interleaved(w, defrag, seed, clusters)
    if concurrent:
        await _concurrent(w, defrag, seed, clusters)
    stats = await defrag.run()
    if interleave or concurrent:
        # Clusters the guest allocated during the rounds were appended after the
        # planned ones; a second, quiet run puts them in order too.
        again = await Recording.create(img, batch_bytes=BATCH)
        assert isinstance(again, Recording)
        await again.run()
        defrag.made = [*getattr(defrag, "made", []), *getattr(again, "made", [])]
    # Without a crash: the guest reads what it read before, every cluster is home.
    assert await img.read(0, size) == bytes(w.model), f"{name}: defrag changed guest data"
    after, _ = await _layout(img)
    assert after == 0, f"{name}: {after} clusters still away from home"
    sc = w.scenario()
    sc = dataclasses.replace(sc, touched=merge_ranges([*sc.touched, *_touched(plan)]))
    return Built(sc, stats, misplaced, tables, getattr(defrag, "made", []))


async def _interleaved(w: Workload, defrag: Defragmenter, seed: int, clusters: list[int]) -> None:
    """Rounds of defragmentation with guest requests in between."""
    rng = random.Random(seed + 1)
    limit = BATCH // CS
    free = [c for c in range(max(clusters) + 8) if c not in clusters]
    for i in range(6):
        await defrag.round(cached_only=False, limit=limit)
        victim = rng.choice(clusters)
        await w.write(victim * CS + rng.randrange(CS - 600), pattern(seed + 50 + i, 500))
        new = free.pop(rng.randrange(len(free)))
        await w.write(new * CS, pattern(seed + 60 + i, CS))  # allocates at the end
        if i == 2:
            await w.zero(rng.choice(clusters) * CS, CS)  # zeroes an allocated cluster
        if i % 2:
            await w.flush()
        defrag.stats.rounds += 1
    await w.write(rng.choice(clusters) * CS + 7, pattern(seed + 70, 3000))  # unflushed


class _FlushesInAThread(CrashStore):
    """FileStore in ``qed serve`` flushes in a thread: other requests run meanwhile.
    The flush is logged when it starts (writes issued while it runs are not made
    durable by it), then the caller waits a few turns of the event loop."""

    async def flush(self) -> None:
        await super().flush()
        for _ in range(3):
            await asyncio.sleep(0)


async def _concurrent(w: Workload, defrag: Defragmenter, seed: int, clusters: list[int]) -> None:
    """Rounds of defragmentation with guest requests running during them: a write
    to a cluster the round is about to move (it waits for the move: a stall) and an
    allocating write, both while the round waits for its flushes."""
    rng = random.Random(seed + 2)
    limit = BATCH // CS
    free = [c for c in range(max(clusters) + 8) if c not in clusters]
    stalled = 0
    for i in range(8):
        new = free.pop(rng.randrange(len(free)))

        async def guest(new: int = new, i: int = i) -> None:
            nonlocal stalled
            await asyncio.sleep(0)  # the round is in its first flush now
            moving = w.img.stalled_clusters
            stalled += bool(moving)
            victim = rng.choice(moving or clusters)
            await w.write(victim * CS + rng.randrange(CS - 600), pattern(seed + 80 + i, 500))
            await w.write(new * CS + 10, pattern(seed + 90 + i, CS))

        await asyncio.gather(defrag.round(cached_only=False, limit=limit), guest())
        defrag.stats.rounds += 1
        if i % 3 == 2:
            await w.flush()
    assert stalled >= 2, f"only {stalled} guest writes met a stall"


# =====================================================================================
# The scenarios
# =====================================================================================

Builder = Callable[[], Coroutine[Any, Any, Built]]
SCENARIOS: dict[str, Builder] = {}


def scenario_builder(fn: Builder) -> Builder:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario_builder
async def fresh() -> Built:
    """No backing file; one L2 table, on the homes of guest clusters 1 and 2."""
    clusters = [0, 1, *random.Random(1).sample(range(2, 40), 32)]
    return await _build("defrag-fresh.qed", 512 * KiB, clusters, seed=1)


@scenario_builder
async def overlay() -> Built:
    """A raw backing file: partial clusters were copied on write from it, unallocated
    clusters show it, zero clusters hide it."""
    size = 512 * KiB
    clusters = [0, 1, *random.Random(2).sample(range(2, 36), 31)]
    return await _build(
        "defrag-overlay.qed", size, clusters, seed=2, backing=pattern(99, size - 3 * CS)
    )


@scenario_builder
async def two_tables() -> Built:
    """Two L2 tables; the second one's homes are 4 MiB away (a sparse file)."""
    rng = random.Random(3)
    span = L2_SPAN // CS
    clusters = [0, 1, *rng.sample(range(2, 24), 18), *rng.sample(range(span, span + 12), 10)]
    return await _build("defrag-two-tables.qed", L2_SPAN + 256 * KiB, clusters, seed=3)


@scenario_builder
async def interleaved() -> Built:
    """Guest requests between the rounds."""
    clusters = [0, 1, *random.Random(4).sample(range(2, 32), 26)]
    return await _build("defrag-interleaved.qed", 512 * KiB, clusters, seed=4, interleave=True)


@scenario_builder
async def home_allocation() -> Built:
    """As ``interleaved`` with the home allocation policy on: the guest's new clusters
    go to their homes, free slots inside the file that moves left with stale bytes
    of other clusters (the data must be durable before the L2 entry)."""
    clusters = [0, 1, *random.Random(6).sample(range(2, 32), 24)]
    return await _build("defrag-home.qed", 512 * KiB, clusters, seed=6, interleave=True, home=True)


@scenario_builder
async def zero_data() -> Built:
    """Some clusters hold only zeros (written as data): the plan turns them into
    zero clusters (read again under a stall, entry 1, flush) before any move."""
    clusters = [0, 1, *random.Random(7).sample(range(2, 40), 30)]
    return await _build("defrag-zeros.qed", 512 * KiB, clusters, seed=7, zeros=clusters[3::4])


@scenario_builder
async def concurrent() -> Built:
    """Guest requests during the rounds, over a raw backing file."""
    clusters = [0, 1, *random.Random(5).sample(range(2, 32), 26)]
    size = 512 * KiB
    return await _build(
        "defrag-concurrent.qed",
        size,
        clusters,
        seed=5,
        backing=pattern(98, size),
        concurrent=True,
    )


@functools.cache
def built(name: str) -> Built:
    """Each scenario is built once per session (whole and torn runs share it)."""
    return run(SCENARIOS[name]())


# =====================================================================================
# The tests
# =====================================================================================


def test_the_scenarios_exercise_every_kind_of_step() -> None:
    """Several rounds, evictions (moves that do not go home), and L2 table moves;
    the log holds copies, truncation and hole punching."""
    for name in SCENARIOS:
        b = built(name)
        stats = b.stats
        assert stats.done, name
        assert stats.rounds >= 4, (name, stats)
        assert b.misplaced >= 10, (name, b.misplaced)
        assert b.tables_in_the_way >= 1, f"{name}: no L2 table on a home"
        assert stats.tables_moved >= b.tables_in_the_way, (name, stats)
        sources = {op.source for op in b.sc.crash.ops}
        # The identity layout punches the homes of unallocated clusters; the packed
        # one leaves no free slot to punch.
        expected = (
            {"write", "flush", "discard"} if name == "home_allocation" else {"write", "flush"}
        )
        assert expected <= sources, (name, sources)
        flushes = sum(1 for op in b.sc.crash.ops if op.kind == "flush")
        assert flushes >= 2 * (stats.rounds - 1), (name, flushes, stats)  # the last finds nothing
    assert built("zero_data").stats.zero_clusters_made >= 5, built("zero_data").stats
    evicting = [name for name in SCENARIOS if any(not m.home for m in built(name).moves)]
    assert len(evicting) >= 2, f"evictions (moves that do not go home) only in {evicting}"
    assert any(op.kind == "truncate" for b in map(built, SCENARIOS) for op in b.sc.crash.ops), (
        "no scenario truncates the file"
    )
    # The home allocation policy reused a slot inside the file (a move left it):
    # data, flush, then the L2 entry.
    sc = built("home_allocation").sc
    reused = [
        op
        for op in sc.ops
        if op.kind == "write"
        and [(o.kind, o.offset != 0) for o in sc.crash.ops[op.start : op.end]]
        == [("write", True), ("flush", False), ("write", True)]
    ]
    assert reused, "no guest allocation reused a home slot inside the file"


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
@pytest.mark.parametrize(
    "name", ["fresh", "overlay", "interleaved", "home_allocation", "zero_data", "concurrent"]
)
def test_every_crash_state_of_a_defragmentation_recovers(
    name: str, torn: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    """Every crash point; every state (whole writes) or up to 16 per point (torn
    sectors, scaled); qemu-img check on every 6th distinct repaired image (whole)
    or every 12th (torn)."""
    b = built(name)
    sc = b.sc
    checker = QemuChecker(qemu, tmp_path, sc, every=6 if not torn else 12)
    totals = crash_all(sc, torn=torn, max_states=scaled(16) if torn else None, checker=checker)
    summary = totals.line(
        f"{sc.name} {'torn' if torn else 'whole'} ({sc.crash.crash_points()} store ops, "
        f"{b.stats.clusters_moved} moves, {b.stats.tables_moved} table moves, "
        f"{b.stats.rounds} rounds)"
    )
    crash_summary(summary)
    assert totals.qemu_checks > 0
    assert_totals(totals, summary, clean_after=True)


def test_crash_states_of_a_two_table_defragmentation_recover(
    qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    """The file grows to 4 MiB (the second table's homes), which makes every state
    slow to judge: crash points are sampled (the last one included), with up to 32
    states each (whole writes) or 8 (torn sectors)."""
    b = built("two_tables")
    sc = b.sc
    n = sc.crash.crash_points()
    checker = QemuChecker(qemu, tmp_path, sc, every=8)
    points = sample_points(sc.crash, scaled(40), seed=5)
    whole = crash_all(sc, torn=False, max_states=scaled(32), points=points, checker=checker)
    points = sample_points(sc.crash, scaled(20), seed=6)
    torn = crash_all(sc, torn=True, max_states=scaled(8), points=points, checker=checker)
    for totals, kind in ((whole, "whole"), (torn, "torn")):
        summary = totals.line(
            f"{sc.name} {kind} ({n} store ops, {totals.crash_points} crash points sampled, "
            f"{b.stats.clusters_moved} moves, {b.stats.tables_moved} table moves, "
            f"{b.stats.rounds} rounds)"
        )
        crash_summary(summary)
        assert_totals(totals, summary, clean_after=True)
    assert whole.qemu_checks > 0


def test_defragmentation_never_changes_the_guest_view_at_any_crash_point() -> None:
    """The model's claim made directly: the durable state at every crash point of
    the guest-request-free scenarios reads exactly the pre-defragmentation disk,
    without any repair (no NEED_CHECK is ever set by a move)."""

    async def go() -> None:
        for name in ("fresh", "overlay", "two_tables"):
            sc = built(name).sc
            for k in range(sc.crash.crash_points() + 1):
                data = sc.crash.durable_state(k)
                store = MemoryStore(data, writable=False)
                header, area = await QedImage.read_header(store)
                assert not header.needs_check, f"{name}: NEED_CHECK at crash point {k}"
                img = await open_qed(
                    store,
                    header,
                    area,
                    backing=sc.backing_image(header.backing_filename(area)),
                    readonly=True,
                )
                got = await img.read(0, sc.size)
                assert got == sc.baseline[: sc.size], f"{name}: crash point {k} reads other data"

    run(go())


def test_a_defragmented_image_is_judged_by_qemu(qemu: Any, tmp_path: Path) -> None:
    """The final state of each scenario (every write persisted): qemu-img check finds
    no corruption (and, in the packed layout, no leak) and qemu-img map shows every
    data cluster at home."""
    import json

    for name in SCENARIOS:
        sc = built(name).sc
        directory = tmp_path / name
        directory.mkdir()
        for backing, data in sc.backings.items():
            (directory / backing).write_bytes(data)
        path = directory / sc.name
        path.write_bytes(bytes(sc.crash.data))
        result = qemu.img("check", "-f", "qed", path, check=False)
        home, identity = run(_final_homes(bytes(sc.crash.data)))
        allowed = (0, 3) if identity else (0,)
        assert result.returncode in allowed, f"{name}: {result.stdout}{result.stderr}"
        extents = json.loads(qemu.img("map", "-f", "qed", "--output=json", path).stdout)
        cs = CS
        for e in extents:
            if e["depth"] == 0 and e["data"]:
                assert e["offset"] == home[e["start"] // cs], (name, e)


async def _final_homes(data: bytes) -> tuple[dict[int, int], bool]:
    store = MemoryStore(data, writable=False)
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=None, readonly=True)
    return _homes(img, await _entries(img)), img.home_allocation


# =====================================================================================
# The checks themselves: they must see a defragmentation that breaks the ordering
# =====================================================================================


class _DropsTheFlushAfterCopies(CrashStore):
    """A defragmenter that forgot the flush between its copies and the L2 entries
    (the store ignores the first flush after copy_range)."""

    copied = False

    async def copy_range(self, src: int, dst: int, length: int) -> None:
        self.copied = True
        await super().copy_range(src, dst, length)

    async def flush(self) -> None:
        if self.copied:
            self.copied = False
            return
        await super().flush()


def test_the_checks_catch_entries_written_before_the_copies_are_durable() -> None:
    async def build() -> Scenario:
        clusters = [0, 1, *random.Random(9).sample(range(2, 24), 16)]
        plan = _plan(9, clusters)
        w = await Workload.create(
            "no-flush.qed",
            256 * KiB,
            prepare=_prepare(9, plan),
            store_class=_DropsTheFlushAfterCopies,
        )
        defrag = await Defragmenter.create(w.img, batch_bytes=BATCH)
        await defrag.run()
        sc = w.scenario()
        return dataclasses.replace(sc, touched=merge_ranges(_touched(plan)))

    sc = run(build())
    totals = crash_all(sc, torn=False)
    print("\n" + totals.line("defrag without the flush after the copies (must fail)"))
    assert totals.corrupt > 0 and not totals.ok
