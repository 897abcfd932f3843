"""Crash tests of the workloads test_harness.py does not cover: resize, a change of
backing file, write-zeroes with unmap, discard, and large random workloads.

Each workload runs through the async engine on a CrashStore; every crash point
(sampled with a fixed seed for the large ones) and every possible disk state there
(sampled for torn writes and large tails) is recovered by a read-write open and
judged by crashkit.verify_state: check_image finds no corruption, durable requests
read back (0 lost), everything else reads old or new (0 corrupt), the header shows a
size and backing file from before or after each started resize / backing change,
and ``qemu-img check`` on the repaired file (a sample of the states: every distinct
image for whole-write states, every few for torn ones) reports no corruption.

Each test records its totals line (printed with -s, and shown in the terminal
summary). QEDKIT_CRASH_SCALE multiplies the sampled points/states and the length of
the random workloads (README.md).
"""

from __future__ import annotations

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
    TABLE_SIZE,
    MiB,
    QemuChecker,
    Scenario,
    Workload,
    assert_totals,
    crash_all,
    final_image,
    pattern,
    round_down,
    round_up,
    run,
    sample_points,
    scaled,
)

from qedkit.engine.base import ExtentKind
from qedkit.engine.chain import open_qed
from qedkit.engine.qed import QedImage
from qedkit.store import MemoryStore
from qedkit.store.crash import CrashStore

Record = Callable[[str], None]
WorkloadFn = Callable[[], Coroutine[Any, Any, Scenario]]
WORKLOADS: dict[str, WorkloadFn] = {}


def workload(fn: WorkloadFn) -> WorkloadFn:
    WORKLOADS[fn.__name__] = fn
    return fn


@functools.cache
def scenario(name: str) -> Scenario:
    """Each workload is built once per session (whole and torn runs share it)."""
    return run(WORKLOADS[name]())


# =====================================================================================
# Resize
# =====================================================================================

OLD_END = 3 * CS + 1024  # an image size that ends inside a cluster


@workload
async def resize_fresh() -> Scenario:
    """No backing file; the old size ends inside an allocated cluster (its tail is
    zeroed), then grows into a second and a third L2 table."""
    w = await Workload.create("resize-fresh.qed", OLD_END)
    await w.write(3 * CS + 100, pattern(1, 200))  # allocates the partial last cluster
    await w.write(0, pattern(2, 5000))
    await w.flush()
    await w.resize(6 * MiB)  # zeroes the tail of cluster 3 in place, then the header
    await w.write(5 * MiB + 300, pattern(3, 3000))  # a new L2 table in the new range
    await w.write(OLD_END - 100, pattern(4, 300))  # across the old end
    await w.zero(4 * CS, 2 * CS)  # new range, unallocated: zero clusters
    await w.flush()
    await w.resize(9 * MiB)  # aligned, no backing: only the header
    await w.write(9 * MiB - 3000, pattern(5, 2000))
    await w.resize(9 * MiB + 512)  # unflushed allocation in flight before it
    return w.scenario()


@workload
async def resize_fresh_unallocated_tail() -> Scenario:
    """No backing file and the partial last cluster unallocated: nothing to zero."""
    w = await Workload.create("resize-hole.qed", OLD_END)
    await w.write(0, pattern(6, 100))
    await w.resize(5 * MiB)  # NEED_CHECK still set from the unflushed allocation
    await w.write(OLD_END + 10, pattern(7, 100))
    await w.flush()
    await w.resize(5 * MiB + 4 * CS)
    return w.scenario()


BACKING_LONG = 4 * MiB + 512 * 1024
OLD_OVER = 3 * MiB + 1536  # shorter than the backing file, ends inside a cluster


async def _qemu_style_tail(img: QedImage, store: MemoryStore) -> None:
    """Allocate the partial last cluster and leave backing bytes past the image end
    in it, as QEMU's copy-on-write does: a resize must zero them."""
    await img.write(OLD_OVER - 500, pattern(8, 400))
    (ext,) = await img.block_status(round_down(OLD_OVER), OLD_OVER % CS)
    assert ext.kind is ExtentKind.DATA and ext.host_offset is not None
    tail = pattern(99, BACKING_LONG)[OLD_OVER : round_up(OLD_OVER)]
    await store.write(ext.host_offset + OLD_OVER % CS, tail)


@workload
async def resize_over_longer_backing() -> Scenario:
    """The backing file is longer than the image: growing must hide it (the new
    range reads zeros: zero clusters in the existing and in a new L2 table, and
    zeros over the stale tail of the allocated last cluster)."""
    w = await Workload.create(
        "resize-over.qed",
        OLD_OVER,
        backing=pattern(99, BACKING_LONG),
        prepare=_qemu_style_tail,
    )
    await w.write(2 * CS + 100, pattern(9, 200))  # copy-on-write
    await w.flush()
    await w.resize(5 * MiB)  # zeroes [OLD_OVER, 4.5 MiB): crosses into L2 table 1
    await w.write(BACKING_LONG - 1000, pattern(10, 3000))  # across the backing's end
    await w.write(4 * MiB + 10, pattern(11, 100))  # into a zero cluster: zero fill
    await w.zero(4 * MiB + 600 * 1024, CS)  # past the backing's end
    await w.flush()
    await w.resize(6 * MiB)  # the backing file is shorter now: the header only
    await w.write(5 * MiB + 100, pattern(12, 100))
    return w.scenario()


@workload
async def resize_over_longer_backing_unallocated_tail() -> Scenario:
    """As above with the partial last cluster unallocated: the resize allocates it,
    copying the backing file's bytes below the old end and zeros after."""
    w = await Workload.create("resize-over-hole.qed", OLD_OVER, backing=pattern(98, BACKING_LONG))
    await w.write(CS, pattern(13, CS))
    await w.resize(4 * MiB + 512)  # ends inside a cluster of L2 table 1
    await w.write(OLD_OVER - 10, pattern(14, 20))  # in place across the old end
    await w.resize(5 * MiB)  # backing still longer: zeroes [4 MiB + 512, 5 MiB)
    return w.scenario()


# =====================================================================================
# Changing the backing file
# =====================================================================================


async def _rebase(
    name: str, old: str | None, new: str | None, *, size: int = MiB, extra: str | None = None
) -> Scenario:
    names = [n for n in (old, new, extra) if n is not None]
    files = {n: pattern(100 + i, size - i * 3 * CS) for i, n in enumerate(names)}
    w = await Workload.create(
        name,
        size,
        backing=files[old] if old is not None else None,
        backing_name=old or "base.raw",
        other_backings={n: d for n, d in files.items() if n != old},
    )
    await w.write(CS + 100, pattern(20, 200))  # copy-on-write from the old backing file
    await w.write(5 * CS, pattern(21, CS))
    await w.flush()
    await w.write(7 * CS + 10, pattern(22, 10))  # unflushed allocation before the change
    await w.set_backing(new)
    await w.write(2 * CS + 3000, pattern(23, 2000))  # copy-on-write from the new one
    await w.write(CS + 500, pattern(24, 10))  # in place
    await w.flush()
    await w.write(10 * CS, pattern(25, 100))
    if extra is not None:
        await w.set_backing(extra)
        await w.write(11 * CS + 7, pattern(26, 100))
    return w.scenario()


@workload
async def backing_longer_name() -> Scenario:
    return await _rebase("rebase-longer.qed", "base.raw", "a-much-longer-backing-name.raw")


@workload
async def backing_shorter_name() -> Scenario:
    return await _rebase("rebase-shorter.qed", "a-much-longer-backing-name.raw", "b.raw")


@workload
async def backing_same_length_name() -> Scenario:
    return await _rebase("rebase-same.qed", "base.raw", "next.raw", extra="last.raw")


@workload
async def backing_removed() -> Scenario:
    """Unallocated clusters read zeros afterwards, and allocations go back to the
    NEED_CHECK protocol."""
    return await _rebase("rebase-none.qed", "base.raw", None)


@workload
async def backing_added() -> Scenario:
    return await _rebase("rebase-add.qed", None, "base.raw")


# =====================================================================================
# Write-zeroes with unmap, discard
# =====================================================================================


@workload
async def zero_unmap_fresh() -> Scenario:
    w = await Workload.create("zero-fresh.qed", 6 * MiB)
    await w.write(0, pattern(30, 4 * CS))
    await w.write(L2_SPAN - CS, pattern(31, 2 * CS))  # across the first L2 boundary
    await w.flush()
    await w.zero(CS, 2 * CS, unmap=True)  # whole allocated clusters: punched
    await w.zero(100, 1000, unmap=True)  # partial, allocated: zeros in place
    await w.zero(8 * CS, 3 * CS, unmap=True)  # unallocated: zero clusters
    await w.write(9 * CS + 5, pattern(32, 10))  # into a zero cluster
    await w.zero(L2_SPAN - 2 * CS + 7, 3 * CS, unmap=True)  # partial + whole, two tables
    await w.zero(5 * MiB, 4 * CS, unmap=True)  # unallocated in the second table
    await w.flush()
    await w.write(CS + 10, pattern(33, 100))  # in place into a punched cluster
    await w.zero(0, 4 * CS, unmap=True)
    return w.scenario()


@workload
async def zero_unmap_over_backing() -> Scenario:
    """Punched clusters over a backing file must read zeros, never backing data."""
    size = 2 * MiB
    w = await Workload.create("zero-overlay.qed", size, backing=pattern(34, size))
    await w.write(0, pattern(35, 2 * CS))  # whole clusters, no copy-on-write
    await w.write(3 * CS + 100, pattern(36, 50))  # copy-on-write
    await w.flush()
    await w.zero(0, 2 * CS, unmap=True)
    await w.zero(3 * CS, CS, unmap=True)
    await w.zero(10 * CS, 2 * CS, unmap=True)  # unallocated over backing: zero clusters
    await w.zero(12 * CS + 10, 100, unmap=True)  # partial over backing: allocating zeros
    await w.zero(MiB + 100, 3 * CS, unmap=True)
    await w.write(10 * CS + 1, pattern(37, 10))  # into a zero cluster: zero fill
    await w.flush()
    await w.zero(CS - 10, 20, unmap=True)
    await w.zero(0, 8 * CS, unmap=True)
    return w.scenario()


@workload
async def discard_fresh() -> Scenario:
    w = await Workload.create("discard-fresh.qed", 6 * MiB)
    await w.write(0, pattern(40, 3 * CS))
    await w.write(L2_SPAN, pattern(41, 2 * CS))  # the second L2 table
    await w.flush()
    await w.discard(0, 2 * CS)  # whole allocated clusters: read zeros
    await w.discard(2 * CS + 10, 100)  # partial: left alone
    await w.discard(10 * CS, 4 * CS)  # unallocated: left alone
    await w.discard(L2_SPAN - CS, 3 * CS)  # across the tables
    await w.write(100, pattern(42, 50))  # in place into a discarded cluster
    await w.flush()
    await w.zero(5 * CS, CS)
    await w.discard(5 * CS, CS)  # a zero cluster: left alone
    await w.discard(0, 8 * CS)  # all of the first table's clusters
    await w.discard(L2_SPAN - CS, 4 * CS)
    return w.scenario()


@workload
async def discard_over_backing() -> Scenario:
    size = MiB
    w = await Workload.create("discard-overlay.qed", size, backing=pattern(43, size))
    await w.write(CS, pattern(44, 2 * CS))
    await w.write(5 * CS + 7, pattern(45, 10))  # copy-on-write
    await w.flush()
    await w.discard(CS, 2 * CS)  # reads zeros, not the backing file
    await w.discard(5 * CS, CS)  # the whole cluster, copied backing bytes included
    await w.discard(8 * CS, 2 * CS)  # unallocated: the backing file shows through
    await w.write(CS + 10, pattern(46, 10))
    await w.flush()
    await w.discard(0, size)
    return w.scenario()


# =====================================================================================
# The NBD server's writes: synchronous allocation, gathered writes (group commit)
# =====================================================================================


@workload
async def alloc_now_fresh() -> Scenario:
    """``write_now`` allocating at once (no backing file, NEED_CHECK set, table
    cached) between writes it leaves to the general path."""
    w = await Workload.create("alloc-now.qed", 6 * MiB)
    await w.write_now(0, pattern(50, 100))  # NEED_CHECK not set yet, new table: general
    await w.write_now(5 * CS + 100, pattern(51, 3000))  # at once: zero head and tail
    await w.write_now(2 * CS, pattern(52, 2 * CS))  # two whole clusters at once
    await w.zero(7 * CS, CS)  # a zero cluster ...
    await w.write_now(7 * CS + 10, pattern(53, 50))  # ... allocated at once
    await w.write_now(L2_SPAN + 10, pattern(54, 200))  # a new table: general
    await w.write_now(L2_SPAN + 3 * CS, pattern(55, CS))  # at once, second table
    await w.write_now(2 * CS + 7, pattern(56, 20))  # in place
    await w.flush()  # clears NEED_CHECK
    await w.write_now(9 * CS, pattern(57, 10))  # sets it again: general
    await w.write_now(10 * CS + 4000, pattern(58, 200))  # at once, across two clusters
    return w.scenario()


@workload
async def write_batch_fresh() -> Scenario:
    """Gathered allocating writes committed together: one data write, one update
    per table, a new table inside the group, a write that overlaps the group's
    clusters (committed after it), in-place writes in between."""
    w = await Workload.create("batch-fresh.qed", 6 * MiB)
    await w.write_batch(
        [
            (0, pattern(60, 100)),
            (3 * CS + 5, pattern(61, 5000)),  # two clusters, partial at both ends
            (CS, pattern(62, CS)),
            (L2_SPAN + 7, pattern(63, 300)),  # a new table in the group
            (CS + 100, pattern(64, 50)),  # overlaps a cluster the group allocates
            (6 * CS, pattern(65, 10)),
        ]
    )
    await w.flush()
    await w.write_batch(
        [
            (8 * CS, pattern(66, CS)),
            (50, pattern(67, 10)),  # in place: ends the group
            (9 * CS + 1, pattern(68, 10)),
            (L2_SPAN + CS, pattern(69, 2 * CS)),
            (4 * MiB + 3 * CS, pattern(70, 100)),  # a third table, unflushed
        ]
    )
    return w.scenario()


@workload
async def write_batch_now_fresh() -> Scenario:
    """A batch of writes the NBD server hands over at once (``write_batch_now``):
    group commits of synchronous allocations (one data write per host-contiguous
    run, table sectors near each other in one write, far ones apart, two tables),
    cut by an in-place write and by a write over a cluster the group allocates;
    then a batch that starts with what only the general path can do (a new table)."""
    w = await Workload.create("batch-now.qed", 6 * MiB)
    await w.write(0, pattern(80, 10))  # the first table, NEED_CHECK set
    await w.write_batch(
        [
            (3 * CS + 5, pattern(81, 5000)),  # two clusters, partial at both ends
            (CS, pattern(82, CS)),
            (L2_SPAN - CS, pattern(83, 100)),  # far from the others in the table
            (CS + 100, pattern(84, 50)),  # over a cluster the group allocates: ends it
            (7 * CS, pattern(85, 10)),  # a second group
            (10, pattern(86, 20)),  # in place: ends it
            (8 * CS, pattern(87, CS)),  # a third group
        ],
        now=True,
    )
    await w.write_batch(
        [
            (L2_SPAN + 7, pattern(88, 300)),  # a new table: the general path ...
            (12 * CS, pattern(89, 10)),  # ... and the rest after it
        ],
        now=True,
    )
    await w.write_batch([(L2_SPAN + 3 * CS, pattern(90, 10)), (13 * CS, pattern(91, 10))], now=True)
    return w.scenario()


@workload
async def write_batch_over_backing() -> Scenario:
    """Gathered writes over a backing file: copy-on-write for each, one flush for
    the group before the entries."""
    size = 2 * MiB
    w = await Workload.create("batch-overlay.qed", size, backing=pattern(71, size))
    await w.write_batch(
        [
            (CS + 100, pattern(72, 50)),
            (4 * CS, pattern(73, CS)),  # whole: no copy
            (6 * CS - 10, pattern(74, 30)),  # two clusters, copy at both ends
            (MiB + 7, pattern(75, 10)),
        ]
    )
    await w.zero(10 * CS, CS)
    await w.flush()
    await w.write_batch([(10 * CS + 5, pattern(76, 10)), (11 * CS, pattern(77, 10))])
    return w.scenario()


SMALL = list(WORKLOADS)


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
@pytest.mark.parametrize("name", SMALL)
def test_every_crash_state_recovers(
    name: str, torn: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    """Every crash point; every state (whole writes) or up to 64 per point (torn
    sectors, scaled); qemu-img check on every distinct repaired image (whole) or on
    every 4th (torn)."""
    sc = scenario(name)
    checker = QemuChecker(qemu, tmp_path, sc, every=1 if not torn else 4)
    totals = crash_all(sc, torn=torn, max_states=scaled(64) if torn else None, checker=checker)
    summary = totals.line(f"{sc.name} {'torn' if torn else 'whole'}")
    crash_summary(summary)
    assert totals.qemu_checks > 0
    assert_totals(totals, summary)


# ---- the workloads do what they claim ------------------------------------------------


def test_resize_hides_a_longer_backing_file_with_zero_clusters() -> None:
    sc = scenario("resize_over_longer_backing")
    img = final_image(sc)
    kinds = {ext.kind for ext in run(img.block_status(round_up(OLD_OVER), MiB + 256 * 1024))}
    assert kinds == {ExtentKind.ZERO, ExtentKind.DATA}  # zero clusters (and a write)
    assert img.l1_table[1] != 0  # the zeroing made a new L2 table
    assert run(img.read(OLD_OVER, round_up(OLD_OVER) - OLD_OVER)) == bytes(
        round_up(OLD_OVER) - OLD_OVER
    )
    # The initial image really had backing bytes past its end (QEMU's copy-on-write).
    first = MemoryStore(sc.initial, writable=False)
    header, area = run(QedImage.read_header(first))
    before = run(open_qed(first, header, area, backing=None, readonly=True))
    (ext,) = run(before.block_status(round_down(OLD_OVER), OLD_OVER % CS))
    assert ext.host_offset is not None
    tail = run(first.read(ext.host_offset + OLD_OVER % CS, 16))
    assert tail == pattern(99, BACKING_LONG)[OLD_OVER : OLD_OVER + 16]
    resize = next(op for op in sc.ops if op.kind == "resize")
    log = sc.crash.ops[resize.start : resize.end]
    assert [op.kind for op in log[-3:]] == ["flush", "write", "flush"]  # zeros, header
    assert log[-2].offset == 0  # the header


def test_the_server_write_workloads_take_the_paths_they_claim() -> None:
    # alloc_now_fresh: five allocations at once (synchronous writes at the end of the
    # file in the log: one pwritev with the copy-on-write zeros, or one pwrite of
    # whole clusters).
    sc = scenario("alloc_now_fresh")
    now = [op for op in sc.crash.ops if op.source in ("pwritev_now", "pwrite_now") and op.extends]
    assert len(now) == 5, sc.crash.describe_ops()
    # write_batch_fresh: the first group's new clusters (guest clusters 0, 3, 4, 1
    # and the new table's first) are one write at the end of the file; the write
    # that overlaps them ends the group.
    sc = scenario("write_batch_fresh")
    first = next(op for op in sc.ops if op.detail == "batch")
    log = sc.crash.ops[first.start : first.end]
    data = [op for op in log if op.source == "writev"]
    assert len(data[0].data) == 5 * CS, sc.crash.describe_ops(first.start, first.end)
    # write_batch_now_fresh: the first batch is done at once in three groups; the
    # first group's new clusters are one write at the end of the file, and its
    # entries two table writes (the near ones together, the far one apart).
    sc = scenario("write_batch_now_fresh")
    batches = [op for op in sc.ops if op.detail.startswith("batch-")]
    assert [op.detail for op in batches] == ["batch-now"] * 7 + ["batch-general"] * 2 + [
        "batch-now"
    ] * 2, [op.describe() for op in batches]
    log = sc.crash.ops[batches[0].start : batches[0].end]
    data = [op for op in log if op.source in ("pwritev_now", "pwrite_now") and op.extends]
    assert [len(op.data) for op in data] == [4 * CS, CS, CS], sc.crash.describe_ops()
    table = final_image(sc).l1_table[0]
    first_group = log[log.index(data[0]) : log.index(data[1])]
    writes = [op for op in first_group if table <= op.offset < table + TABLE_SIZE * CS]
    assert len(writes) == 2, sc.crash.describe_ops(batches[0].start, batches[0].end)
    # write_batch_over_backing: one flush orders the group's data before its
    # entries (and the new table has its own), instead of one per write.
    sc = scenario("write_batch_over_backing")
    first = next(op for op in sc.ops if op.detail == "batch")
    flushes = [op for op in sc.crash.ops[first.start : first.end] if op.kind == "flush"]
    assert len(flushes) == 2, sc.crash.describe_ops(first.start, first.end)


def test_backing_change_workloads_change_the_header() -> None:
    for name, want in [
        ("backing_longer_name", "a-much-longer-backing-name.raw"),
        ("backing_shorter_name", "b.raw"),
        ("backing_same_length_name", "last.raw"),
        ("backing_removed", None),
        ("backing_added", "base.raw"),
    ]:
        img = final_image(scenario(name))
        assert img.backing_filename == want, name


# =====================================================================================
# Large random workloads
# =====================================================================================

LARGE_OLD = 20 * MiB - 1536  # ends inside a cluster
LARGE_NEW = 24 * MiB  # six L2 tables
LARGE_BACKING = 22 * MiB  # longer than the old size: the resize must hide it


async def random_workload(name: str, seed: int, n_ops: int, *, backing: bool) -> Scenario:
    """``n_ops`` requests from a fixed-seed RNG over hot zones around every L2 table
    boundary and the image end (so writes allocate, go in place, copy on write, zero
    and discard over each other), with flushes now and then and a resize half way."""
    rng = random.Random(seed)
    w = await Workload.create(
        name,
        LARGE_OLD,
        backing=pattern(seed, LARGE_BACKING) if backing else None,
        verify=False,
    )
    zones = [(max(0, t * L2_SPAN - 96 * 1024), 192 * 1024) for t in range(6)]
    zones += [(LARGE_OLD - 64 * 1024, 128 * 1024), (LARGE_NEW - 64 * 1024, 64 * 1024)]
    zones += [(rng.randrange(0, LARGE_NEW - MiB), 256 * 1024) for _ in range(2)]
    for i in range(n_ops):
        if i == n_ops // 2:
            await w.resize(LARGE_NEW)
            continue
        size = w.img.size
        r = rng.random()
        if r < 0.08:
            await w.flush()
            continue
        start, length = rng.choice([z for z in zones if z[0] < size - CS])
        offset = rng.randrange(start, min(size, start + length) - 1)
        shape = rng.random()
        if shape < 0.4:
            n = rng.randrange(1, 1024)
        elif shape < 0.7:
            offset = round_down(offset)
            n = CS * rng.randrange(1, 4)
        else:
            n = rng.randrange(1, 3 * CS)
        n = min(n, size - offset)
        if r < 0.70:
            await w.write(offset, pattern(seed * 100_000 + i, n))
        elif r < 0.85:
            await w.zero(offset, n, unmap=rng.random() < 0.5)
        else:
            await w.discard(offset, n)
    # A final check of the model, all at once (verify=False skipped it per request).
    got = await w.img.read(0, w.img.size)
    assert got == bytes(w.model), f"{name}: without any crash the guest reads other bytes"
    return w.scenario()


@pytest.mark.parametrize("backing", [False, True], ids=["fresh", "overlay"])
def test_large_random_workload(
    backing: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    """Hundreds of requests; a fixed number of crash points sampled with a fixed seed
    (torn sectors, up to 4 states each), qemu-img check on every 3rd distinct image."""
    seed = 20240 + backing
    name = f"random-{'overlay' if backing else 'fresh'}.qed"
    sc = run(random_workload(name, seed, scaled(300), backing=backing))
    img = final_image(sc)
    assert sum(1 for entry in img.l1_table if entry) == 6  # every L2 table in use
    assert len(sc.ops) == scaled(300)
    points = sample_points(sc.crash, scaled(60), seed=seed)
    checker = QemuChecker(qemu, tmp_path, sc, every=3)
    totals = crash_all(sc, torn=True, max_states=scaled(4), points=points, checker=checker)
    summary = totals.line(
        f"{name} ({len(sc.ops)} requests, {sc.crash.crash_points()} store ops, "
        f"{len(points)} crash points sampled)"
    )
    crash_summary(summary)
    assert totals.qemu_checks > 0
    assert_totals(totals, summary)


# =====================================================================================
# The checks themselves: they must see the failures they count
# =====================================================================================


class _ForgetsDataWrites(CrashStore):
    """A disk that acknowledges data-cluster writes (pwritev) and flushes but never
    makes the data durable: reads see it, no crash state holds it."""

    async def writev(self, offset: int, buffers: Any) -> None:
        data = b"".join(buffers)
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data


def test_the_checks_count_lost_writes() -> None:
    async def build() -> Scenario:
        w = await Workload.create("forgetful.qed", MiB, store_class=_ForgetsDataWrites)
        await w.write(0, pattern(60, 3 * CS))
        await w.flush()
        await w.write(5 * CS, pattern(61, 100))
        return w.scenario()

    sc = run(build())
    totals = crash_all(sc, torn=False)
    print("\n" + totals.line("forgetful disk (must fail)"))
    assert totals.lost > 0 and not totals.ok
    assert any("lost durable request: write 12288 bytes at 0x0" in f for f in totals.failures)


def test_the_checks_catch_a_resize_that_writes_the_size_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the new size reached the disk before the zeroing, a crash in between shows
    the longer backing file's data in the new range: the checks must say so."""

    async def size_first(self: QedImage, new_size: int) -> None:
        old = self.size
        await self._write_header(dataclasses.replace(self.header, image_size=new_size), flush=True)
        below = self.backing.size if self.backing is not None else old
        await self._zero_range(old, min(new_size, below), False)
        await self.store.flush()

    monkeypatch.setattr(QedImage, "resize", size_first)

    async def build() -> Scenario:
        w = await Workload.create("size-first.qed", MiB, backing=pattern(62, 2 * MiB))
        await w.write(CS, pattern(63, 100))
        await w.flush()
        await w.resize(3 * MiB)
        return w.scenario()

    sc = run(build())
    totals = crash_all(sc, torn=False)
    print("\n" + totals.line("resize writing the size first (must fail)"))
    assert totals.corrupt > 0 and totals.lost == 0
    assert any("reads" in f and "resize" in f for f in totals.failures)
