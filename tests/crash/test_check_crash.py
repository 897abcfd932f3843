"""Crash tests of ``check -r all`` when it compacts (engine.check, engine.qed.move):
every crash point of the corruption repair, the lost+found save, the data moves
(claim, copy, flush, L2 entries, flush, release), the table moves (copy, flush, L1
entry, flush; evictions of data and of other tables out of a window) and the final
truncation.

Each image is built through the engine on a plain MemoryStore (4 KiB clusters,
table_size 2), closed, then damaged by hand: entries cleared (plain leaks), junk
clusters appended, and for the damaged workloads an unaligned entry, an entry past
the end of the file and a duplicate reference, with NEED_CHECK set (so that a crash
before the repair is done is repaired again by the next open). Its guest view after
an uninterrupted repair is the model: ``check_image(img, RepairMode.ALL,
lost_found=...)`` then runs on a CrashStore, and every crash point (every
whole-write state up to a cap, or a sample of torn-sector states) is recovered by a
read-write open and judged by crashkit.verify_state: no corruption, every guest
byte reads exactly the model (no guest request is in flight: a repair must never
change what the guest reads beyond the damage itself), untouched ranges stay
unallocated, the image takes a new write, and ``qemu-img check`` on a sample of the
repaired files finds no corruption.

What a damage orphaned must never be lost: at every crash point up to the
lost+found save, the orphaned clusters are intact in every state, and the archive
holds their bytes.

Faults: EIO on the n-th read, write, flush, truncate and discard of the repair, for
every n it makes; the repair raises or stops with a note, the image recovers to the
model, no orphan is lost (in the image or in the archive), and a second ``check -r
all`` ends clean.

Totals lines as in test_workloads.py (printed with -s and in the terminal summary).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
import tarfile
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    CS,
    L2_SPAN,
    QemuChecker,
    Scenario,
    Workload,
    assert_totals,
    crash_all,
    merge_ranges,
    new_qed,
    pattern,
    raw_backing,
    run,
    scaled,
)

import qedkit.engine.check as check_module
from qedkit.engine.base import BlockImage
from qedkit.engine.chain import open_qed
from qedkit.engine.check import RepairMode, check_image
from qedkit.engine.lostfound import LostFoundTar, Orphan, Reader, SavedRun
from qedkit.engine.qed import QedImage
from qedkit.format.header import Feature
from qedkit.store import CrashStore, MemoryStore

Record = Callable[[str], None]
TABLE_SIZE = 2
NEED_CHECK = int(Feature.NEED_CHECK)
# The scenarios are built once per session (functools.cache): their lost+found
# archives live here, removed when the interpreter exits.
_ARCHIVES = tempfile.TemporaryDirectory(prefix="qedkit-lf-")


@dataclasses.dataclass
class Built:
    sc: Scenario
    orphans: dict[int, bytes]  # host offset -> bytes the damage orphaned
    saved_at: int  # crash log position when the lost+found save returned (-1: none)
    saved: SavedRun | None
    l1_before: list[int]
    l1_after: list[int]
    leaks: int
    size_before: int
    size_after: int


class _Recording(LostFoundTar):
    """A lost+found archive that remembers where in the crash log it was written."""

    def __init__(self, filename: str, crash: CrashStore) -> None:
        super().__init__(filename)
        self.crash = crash
        self.saved_at = -1

    async def save(
        self,
        image: str,
        cluster_size: int,
        found: Sequence[str],
        orphans: Sequence[Orphan],
        read: Reader,
    ) -> SavedRun:
        saved = await super().save(image, cluster_size, found, orphans, read)
        self.saved_at = self.crash.position
        return saved


def _u64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def _poke(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<Q", data, offset, value)


def _entry_at(data: bytes | bytearray, guest_cluster: int) -> int:
    """File offset of the L2 entry of ``guest_cluster`` (its table must exist)."""
    entries = TABLE_SIZE * CS // 8
    l1_index, index = divmod(guest_cluster, entries)
    l2 = _u64(data, CS + 8 * l1_index)  # the L1 table is at CS
    assert l2, f"no L2 table for guest cluster {guest_cluster}"
    return l2 + 8 * index


async def _build(
    name: str,
    size: int,
    clusters: list[int],
    seed: int,
    *,
    leak: list[int],
    junk: int,
    damage: bool,
    backing: bytes | None = None,
) -> Built:
    """Write ``clusters`` (in this order) through the engine, then clear the entries
    of ``leak``, append ``junk`` clusters and, with ``damage``, make the entries of
    the next three clusters unaligned, past the end and a duplicate of the first."""
    backing_name = "base.raw"

    def backing_image() -> BlockImage | None:
        return raw_backing(backing, backing_name)

    fmt = await new_qed(name, size, backing_name if backing is not None else None)
    header, area = await QedImage.read_header(fmt)
    img = await open_qed(fmt, header, area, backing=backing_image(), readonly=False)
    for i, c in enumerate(clusters):
        if i % 3 == 2:  # a partial write: copy-on-write from the backing file or zeros
            await img.write(c * CS + 100, pattern(seed * 1000 + i, CS - 300))
        else:
            await img.write(c * CS, pattern(seed * 1000 + i, CS))
    await img.close()
    data = bytearray(fmt.data)
    orphans: dict[int, bytes] = {}
    for c in leak:
        host = _u64(data, _entry_at(data, c))
        if damage:  # next to a corruption, a plain leak may be lost data too
            orphans[host] = bytes(data[host : host + CS])
        _poke(data, _entry_at(data, c), 0)
    if damage:
        victims = [c for c in clusters[1:] if c not in leak][:3]
        for c in victims:
            host = _u64(data, _entry_at(data, c))
            orphans[host] = bytes(data[host : host + CS])
        first = _u64(data, _entry_at(data, clusters[0]))
        _poke(data, _entry_at(data, victims[0]), _u64(data, _entry_at(data, victims[0])) + 512)
        _poke(data, _entry_at(data, victims[1]), (len(data) // CS + 8) * CS)
        _poke(data, _entry_at(data, victims[2]), first)
        _poke(data, 16, _u64(data, 16) | NEED_CHECK)
    for k in range(junk):
        host = len(data)
        data += pattern(seed * 77 + k, CS)
        if damage:
            orphans[host] = pattern(seed * 77 + k, CS)
    initial = bytes(data)

    # The model: the guest view after an uninterrupted repair (and the same repair
    # done by the open-time repair, which a crash before its end falls back on).
    ref = MemoryStore(initial, name=name)
    header, area = await QedImage.read_header(ref)
    rimg = await open_qed(ref, header, area, backing=backing_image(), readonly=False, repair=False)
    with tempfile.TemporaryDirectory() as d:
        report = await check_image(
            rimg, RepairMode.ALL, lost_found=LostFoundTar(str(Path(d) / "lf.tar"))
        )
    assert report.notes == (), report.notes
    expected = await rimg.read(0, size)

    crash = CrashStore(initial, name=name)
    header, area = await QedImage.read_header(crash)
    img = await open_qed(crash, header, area, backing=backing_image(), readonly=False, repair=False)
    l1_before = list(img.l1_table)
    w = Workload(
        name,
        img,
        crash,
        initial,
        expected,
        backing_name if backing is not None else None,
        {backing_name: backing} if backing is not None else {},
        verify=True,
    )
    archive = Path(_ARCHIVES.name) / f"{name}.lost+found.tar"
    lost_found = _Recording(str(archive), crash)
    old_batch = check_module.COMPACT_BATCH_BYTES
    check_module.COMPACT_BATCH_BYTES = 4 * CS  # many small rounds: many flush pairs
    try:
        report = await check_image(img, RepairMode.ALL, lost_found=lost_found)
    finally:
        check_module.COMPACT_BATCH_BYTES = old_batch
    assert report.notes == (), report.notes
    assert report.leaks_fixed == report.leaks > 0, report
    after = await check_image(img)
    assert (after.corruptions, after.leaks) == (0, 0), after
    assert await img.read(0, size) == expected, f"{name}: the repair changed guest data"
    sc = w.scenario()
    touched = merge_ranges((c * CS, (c + 1) * CS) for c in clusters)
    sc = dataclasses.replace(sc, touched=touched)
    return Built(
        sc,
        orphans,
        lost_found.saved_at,
        report.lost_found,
        l1_before,
        list(img.l1_table),
        report.leaks,
        len(initial),
        len(crash.data),
    )


# =====================================================================================
# The scenarios
# =====================================================================================

Builder = Callable[[], Coroutine[Any, Any, Built]]
SCENARIOS: dict[str, Builder] = {}


def scenario_builder(fn: Builder) -> Builder:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario_builder
async def leaks() -> Built:
    """No corruption: entries cleared in the first table, junk at the end, and the
    second L2 table allocated last (at the end of the file: it must move down)."""
    rng = random.Random(11)
    span = L2_SPAN // CS
    first = rng.sample(range(0, 60), 40)
    clusters = [*first, span + 3, span + 7]
    return await _build(
        "check-leaks.qed",
        L2_SPAN + 64 * CS,
        clusters,
        seed=11,
        leak=rng.sample(first[1:], 14),
        junk=2,
        damage=False,
    )


@scenario_builder
async def damaged() -> Built:
    """Corruptions (unaligned, past the end, a duplicate) next to plain leaks: the
    orphans and the junk go to lost+found, then the leaks are compacted away."""
    rng = random.Random(12)
    clusters = rng.sample(range(0, 48), 36)
    return await _build(
        "check-damaged.qed",
        64 * CS,
        clusters,
        seed=12,
        leak=rng.sample(clusters[4:], 8),
        junk=1,
        damage=True,
    )


@scenario_builder
async def sparse() -> Built:
    """One data cluster per L2 table (data, table, data, table ...): no window below
    the used space holds data alone, so lowering the last table evicts another."""
    span = L2_SPAN // CS
    clusters = [k * span + 5 for k in range(5)]
    return await _build(
        "check-sparse.qed",
        5 * L2_SPAN,
        clusters,
        seed=13,
        leak=[2 * span + 5],
        junk=0,
        damage=False,
    )


@scenario_builder
async def overlay() -> Built:
    """Over a raw backing file: partial clusters were copied on write from it, and a
    cleared entry shows it again."""
    rng = random.Random(14)
    size = 48 * CS
    clusters = rng.sample(range(0, 40), 24)
    return await _build(
        "check-overlay.qed",
        size,
        clusters,
        seed=14,
        leak=rng.sample(clusters[4:], 3),
        junk=1,
        damage=True,
        backing=pattern(99, size - 5 * CS),
    )


@functools.cache
def built(name: str) -> Built:
    return run(SCENARIOS[name]())


# =====================================================================================
# The tests
# =====================================================================================


def test_the_scenarios_move_data_and_tables_and_save_orphans() -> None:
    for name in SCENARIOS:
        b = built(name)
        ops = b.sc.crash.ops
        kinds = {op.kind for op in ops}
        assert {"write", "flush", "truncate"} <= kinds, (name, kinds)
        flushes = sum(1 for op in ops if op.kind == "flush")
        assert flushes >= 6, (name, flushes)  # several rounds of moves
        assert b.size_after < b.size_before, name
        if name in ("leaks", "sparse"):
            assert b.l1_after != b.l1_before, f"{name}: no L2 table moved"
        if name in ("damaged", "overlay"):
            assert b.saved is not None and b.saved.clusters == len(b.orphans), name
            assert b.saved_at > 0, name
            with tarfile.open(b.saved.filename) as tar:
                got = {}
                for m in tar.getmembers():
                    if m.name.endswith(".bin"):
                        f = tar.extractfile(m)
                        assert f is not None
                        got[int(m.name.rsplit("-", 1)[1].removesuffix(".bin"), 16)] = f.read()
            assert got == b.orphans, name
        else:
            assert b.saved is None and b.saved_at == -1, name


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_crash_state_of_a_compacting_repair_recovers(
    name: str, torn: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    """Every crash point; up to 64 whole-write states (scaled) or 16 torn-sector
    states per point; qemu-img check on every 6th distinct repaired image (every
    12th for torn states)."""
    b = built(name)
    sc = b.sc
    checker = QemuChecker(qemu, tmp_path, sc, every=6 if not torn else 12)
    totals = crash_all(sc, torn=torn, max_states=scaled(16 if torn else 64), checker=checker)
    summary = totals.line(
        f"{sc.name} check -r all {'torn' if torn else 'whole'} "
        f"({sc.crash.crash_points()} store ops, {b.leaks} leaks removed, "
        f"{len(b.orphans)} clusters to lost+found)"
    )
    crash_summary(summary)
    assert totals.qemu_checks > 0
    assert_totals(totals, summary, clean_after=True)


@pytest.mark.parametrize("name", ["damaged", "overlay"])
def test_orphans_are_intact_at_every_crash_point_before_they_are_saved(name: str) -> None:
    """Until the lost+found save returned, no state of the disk (any subset of the
    unflushed writes, torn at sectors) has lost a byte of an orphaned cluster."""
    b = built(name)
    crash = b.sc.crash
    checked = 0
    for k in range(b.saved_at + 1):
        for state in crash.scenarios(k, torn=True, max_states=scaled(16)):
            for offset, data in b.orphans.items():
                assert state.data[offset : offset + CS] == data, (
                    f"{name}: orphan at {offset:#x} changed at crash point {k} ({state.describe()})"
                )
            checked += 1
    assert checked > b.saved_at
    # And the first write after the save is what may reuse them.
    assert all(op.kind != "truncate" for op in crash.ops[: b.saved_at])


# =====================================================================================
# Faults: every store call of the repair failed in turn
# =====================================================================================


async def _recover_and_judge(b: Built, data: bytes, archive: Path) -> list[str]:
    """Open ``data`` as a user would after a failed ``check -r all`` (the open-time
    repair runs if NEED_CHECK is still set), then run ``check -r all`` again."""
    sc = b.sc
    problems: list[str] = []
    store = MemoryStore(data, name=sc.name)
    header, area = await QedImage.read_header(store)
    name = header.backing_filename(area)
    img = await open_qed(store, header, area, backing=sc.backing_image(name), readonly=False)
    report = await check_image(img)
    if report.corruptions or report.check_errors:
        problems.append(f"{report.corruptions} corruptions after recovery")
    if await img.read(0, sc.size) != sc.baseline[: sc.size]:
        problems.append("the guest reads other data after recovery")
    for offset, orphan in b.orphans.items():
        in_image = bytes(store.data[offset : offset + CS]) == orphan
        saved = archive.exists() and _archived(archive).get(offset) == orphan
        if not (in_image or saved):
            problems.append(f"the orphan at {offset:#x} is lost")
    again = await check_image(img, RepairMode.ALL, lost_found=LostFoundTar(str(archive) + ".2"))
    after = await check_image(img)
    if (after.corruptions, after.leaks, after.check_errors) != (0, 0, 0) or again.notes:
        problems.append(f"a second check -r all left {after} ({again.notes})")
    if await img.read(0, sc.size) != sc.baseline[: sc.size]:
        problems.append("the second repair changed the guest's data")
    return problems


def _archived(archive: Path) -> dict[int, bytes]:
    out = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".bin"):
                f = tar.extractfile(m)
                assert f is not None
                out[int(m.name.rsplit("-", 1)[1].removesuffix(".bin"), 16)] = f.read()
    return out


@pytest.mark.parametrize("name", ["damaged", "overlay", "sparse"])
def test_a_repair_failing_at_any_store_call_loses_nothing_and_a_second_one_finishes(
    name: str, tmp_path: Path, crash_summary: Record
) -> None:
    """EIO on the n-th call of each kind (reads, writes, flushes, truncates), for
    every n the uninterrupted repair makes: the repair may fail (an error) or stop
    early (a note), but the image recovers to the model, no orphan is lost (it is
    in the image or in the archive), and a second ``check -r all`` ends clean."""
    from qedkit.errors import QedError
    from qedkit.store.faults import FaultStore

    b = built(name)
    sc = b.sc
    initial = sc.initial

    async def repair(store: FaultStore, archive: Path) -> str:
        try:
            header, area = await QedImage.read_header(store)
            backing = sc.backing_image(header.backing_filename(area))
            img = await open_qed(store, header, area, backing=backing, readonly=False, repair=False)
            report = await check_image(img, RepairMode.ALL, lost_found=LostFoundTar(str(archive)))
        except QedError as exc:
            return f"raised {type(exc).__name__}"
        return "noted" if report.notes else "finished"

    dry = FaultStore(MemoryStore(initial, name=sc.name))
    assert run(repair(dry, tmp_path / "dry.tar")) == "finished"
    cases = 0
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    for op in ("read", "writev", "flush", "truncate", "discard"):
        for nth in range(1, dry.calls[op] + 1):
            store = FaultStore(MemoryStore(initial, name=sc.name))
            store.fail(op, nth=nth)
            archive = tmp_path / f"{op}-{nth}.tar"
            outcome = run(repair(store, archive))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            inner = store.inner
            assert isinstance(inner, MemoryStore)
            problems = run(_recover_and_judge(b, bytes(inner.data), archive))
            cases += 1
            if problems:
                failures.append(f"{op} #{nth} ({outcome}): " + "; ".join(problems))
    summary = (
        f"{sc.name} check -r all with a failing store: {cases} faults "
        f"({', '.join(f'{v} {k}' for k, v in sorted(outcomes.items()))}), "
        f"{len(failures)} failures"
    )
    crash_summary(summary)
    assert cases > 20, summary
    assert not failures, summary + "\n" + "\n".join(failures[:5])
