"""Crash sweeps of the image verbs: ``resize --shrink`` (QedImage.shrink), commit,
rebase and amend. Each procedure runs on CrashStores (verbkit.OrderedCrashStore, one
per image it writes) and every crash point is recovered by a read-write open and
judged: no corruption (check_image, and ``qemu-img check`` on a sample), and the
guest view the procedure promises to keep is kept in every state:

* commit: the overlay's view (over whatever state of the base) is the view before
  the commit, in every combination of the two files' states;
* rebase (safe, and flattening): the overlay's view over the backing file its
  recovered header names (the old or the new one) is the view before;
* amend (cluster size up and down, table size): the recovered image has the old
  geometry or the new one and reads the view before either way;
* shrink: the disk that stays ``[0, new size)`` reads as before; the header shows
  the old or the new size; with the old size each cut cluster reads its old content
  or as unallocated; with the new size, growing back reads zeros past it (no stale
  entry survives the cut).

Totals lines as in the other crash tests (``crash_summary``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crashkit import CS, TABLE_SIZE, MiB, Workload, pattern, run
from verbkit import (
    OrderedCrashStore,
    QemuSample,
    SweepTotals,
    first_difference,
    raw_backing,
    recover,
    sweep,
)

from qedkit.engine.chain import open_qed
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.jobs.amend import amend
from qedkit.jobs.commit import Committer
from qedkit.jobs.rebase import rebase
from qedkit.jobs.resize import resize_image
from qedkit.store import MemoryStore

Record = Callable[[str], None]


def _report(name: str, totals: SweepTotals, record: Record) -> None:
    record(totals.line(name))
    assert totals.ok, "\n".join(totals.failures)
    assert totals.states > 0


# =====================================================================================
# shrink
# =====================================================================================

SHRINK_SIZE = 16 * MiB  # four L2 tables of 4 MiB (crashkit's CS and TABLE_SIZE)


async def _prepare_shrink(img: QedImage, store: MemoryStore) -> None:
    for i, (offset, length) in enumerate(
        [
            (0, 64 * 1024),
            (5 * MiB - 3000, 9000),
            (6 * MiB, 3 * CS),
            (9 * MiB, CS),
            (13 * MiB, 2 * CS),
        ]
    ):
        await img.write(offset, pattern(300 + i, length))
    await img.write_zeroes(7 * MiB, 4 * CS)
    await img.write(200 * 1024, pattern(400, 5000))  # allocated after the tail's tables


def _shrink_case(backing: bytes | None, new: int) -> tuple[OrderedCrashStore, bytes, bytes | None]:
    async def build() -> tuple[OrderedCrashStore, bytes]:
        w = await Workload.create(
            "shrink.qed",
            SHRINK_SIZE,
            backing=backing,
            prepare=_prepare_shrink,
            store_class=OrderedCrashStore,
        )
        result = await resize_image(w.img, new, shrink=True, force=True)
        stats = result.stats
        assert stats.clusters_moved + stats.tables_moved > 0 and stats.truncated_bytes > 0
        assert w.img.size == new
        assert await w.img.read(0, new) == w.baseline[:new]
        assert isinstance(w.crash, OrderedCrashStore)
        return w.crash, w.baseline

    crash, baseline = run(build())
    return crash, baseline, backing


def _shrink_sweep(with_backing: bool, qemu: Any, tmp_path: Path) -> SweepTotals:
    old, new = SHRINK_SIZE, 5 * MiB + 512
    backing = pattern(77, 20 * MiB) if with_backing else None
    crash, baseline, _ = _shrink_case(backing, new)
    backings = {"base.raw": lambda: raw_backing("base.raw", backing or b"")}
    sample = QemuSample(qemu, tmp_path / "q", every=3, extra={"base.raw": backing or b""})
    totals_ref: list[SweepTotals] = []

    async def judge(states: list[bytes]) -> tuple[list[str], list[str]]:
        img, report = await recover(states[0], "shrink.qed", backings)
        corrupt = [f"check: {p.message}" for p in report.problems if p.kind != "leak"]
        lost: list[str] = []
        if img.size not in (old, new):
            corrupt.append(f"recovered size {img.size}")
            return lost, corrupt
        why = first_difference(await img.read(0, new), baseline[:new])
        if why:
            lost.append(f"kept disk: {why}")
        if img.size == old:
            view = (backing or b"")[:old].ljust(old, b"\0")
            for c in range(new - new % CS, old, CS):
                got = await img.read(c, min(CS, old - c))
                if got not in (baseline[c : c + len(got)], view[c : c + len(got)]):
                    lost.append(f"cut cluster at {c:#x} reads neither old nor unallocated")
                    break
        else:
            await img.resize(old)
            why = first_difference(await img.read(new, old - new), bytes(old - new), new)
            if why:
                lost.append(f"grown again: {why}")
        if totals_ref:
            why = sample.offer("shrink.qed", states[0], totals_ref[0])
            if why:
                corrupt.append(why)
        return lost, corrupt

    probe = SweepTotals()
    totals_ref.append(probe)
    totals = sweep([crash], judge, torn=True, max_states=8)
    totals.qemu_checks = probe.qemu_checks
    return totals


@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "over-raw"])
def test_every_crash_state_of_a_shrink_keeps_the_disk_that_stays(
    with_backing: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    totals = _shrink_sweep(with_backing, qemu, tmp_path)
    _report(f"shrink {'over raw' if with_backing else 'alone'}", totals, crash_summary)
    assert totals.qemu_checks > 0


def test_the_shrink_sweep_catches_the_header_written_before_the_entries(
    qemu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: a crash between the two leaves the new size with stale
    entries past it, which a later grow shows again."""
    original = QedImage.shrink

    async def header_first(self: QedImage, new_size: int) -> None:
        before = self.header
        await self._write_header(dataclasses.replace(before, image_size=new_size), flush=True)
        self.header = before
        await original(self, new_size)

    monkeypatch.setattr(QedImage, "shrink", header_first)
    totals = _shrink_sweep(False, qemu, tmp_path)
    assert totals.lost > 0 and any("grown again" in f for f in totals.failures)


# =====================================================================================
# commit
# =====================================================================================

COMMIT_SIZE = 6 * MiB  # two L2 tables


async def _formatted(size: int, backing: str | None = None, raw: bool = False) -> MemoryStore:
    store = MemoryStore(name="x")
    await QedImage.format_store(
        store, size, cluster_size=CS, table_size=TABLE_SIZE, backing_name=backing, backing_raw=raw
    )
    return store


async def _open(store: Any, backing: Any = None) -> QedImage:
    header, area = await QedImage.read_header(store)
    return await open_qed(store, header, area, backing=backing, readonly=False)


def _commit_case(base_fmt: str) -> tuple[list[OrderedCrashStore], bytes]:
    """A base (QED or raw) with data, an overlay over it with partial writes, zero
    clusters over base data and data in its second table; the commit runs on
    OrderedCrashStores of both. Returns the stores and the overlay's view before."""
    base_name = f"base.{base_fmt}"

    async def build() -> tuple[list[OrderedCrashStore], bytes]:
        if base_fmt == "qed":
            bstore = await _formatted(COMMIT_SIZE)
            b = await _open(bstore)
            await b.write(0, pattern(1, 2 * MiB))
            await b.write(5 * MiB, pattern(2, 40 * CS))
            await b.close()
            base_bytes = bytes(bstore.data)
        else:
            base_bytes = pattern(1, 2 * MiB) + bytes(3 * MiB) + pattern(2, MiB)
        tstore = await _formatted(COMMIT_SIZE, base_name, raw=base_fmt == "raw")
        top = await _open(tstore, raw_backing(base_name, base_bytes))
        if base_fmt == "qed":
            await top.backing.close()  # type: ignore[union-attr]
            top.backing = await _open(MemoryStore(base_bytes, name=base_name))
        await top.write(CS + 100, pattern(3, 3 * CS))
        await top.write_zeroes(8 * CS, 6 * CS)
        await top.write(3 * MiB, pattern(4, 5 * CS))
        await top.write(5 * MiB + 7 * CS, pattern(5, 2 * CS + 10))
        await top.write_zeroes(5 * MiB + 20 * CS + 100, 300)
        view = await top.read(0, COMMIT_SIZE)
        await top.close()
        order: list[int] = []
        bcrash = OrderedCrashStore(base_bytes, name=base_name, order=order, index=0)
        tcrash = OrderedCrashStore(bytes(tstore.data), name="top.qed", order=order, index=1)
        base: Any = (
            await _open(bcrash)
            if base_fmt == "qed"
            else RawImage(bcrash, len(base_bytes), filename=base_name)
        )
        top = await _open(tcrash, base)
        stats = await Committer(top, base).run()
        assert stats.emptied and stats.tables_dropped == 2 and stats.bytes_zeroed > 0
        assert await top.read(0, COMMIT_SIZE) == view
        assert await base.read(0, COMMIT_SIZE) == view
        # The overlay's log begins after the base's last flush.
        first_top = order.index(1)
        assert bcrash.ops[-1].kind == "flush" and order[:first_top].count(0) == len(bcrash.ops)
        return [bcrash, tcrash], view

    return run(build())


@pytest.mark.parametrize("base_fmt", ["qed", "raw"])
def test_every_crash_state_of_a_commit_keeps_the_overlay_s_view(
    base_fmt: str, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    stores, view = _commit_case(base_fmt)
    base_name = f"base.{base_fmt}"
    sample = QemuSample(qemu, tmp_path / "q", every=3)
    totals = SweepTotals()

    async def judge(states: list[bytes]) -> tuple[list[str], list[str]]:
        corrupt: list[str] = []
        if base_fmt == "qed":
            base, report = await recover(states[0], base_name)
            corrupt += [f"base: {p.message}" for p in report.problems if p.kind != "leak"]
            why = sample.offer(base_name, bytes(base.store.data), totals)  # type: ignore[attr-defined]
            if why:
                corrupt.append(why)
        else:
            base = raw_backing(base_name, states[0])
        top, report = await recover(states[1], "top.qed", {base_name: lambda: base})
        corrupt += [f"overlay: {p.message}" for p in report.problems if p.kind != "leak"]
        why = first_difference(await top.read(0, COMMIT_SIZE), view)
        (sample.directory / base_name).write_bytes(states[0])  # qemu-img opens it too
        why2 = sample.offer("top.qed", states[1], totals)
        if why2:
            corrupt.append(why2)
        return ([f"overlay view: {why}"] if why else []), corrupt

    result = sweep(stores, judge, torn=True, max_states=8)
    result.qemu_checks = totals.qemu_checks
    _report(f"commit into {base_fmt}", result, crash_summary)


# =====================================================================================
# rebase
# =====================================================================================

REBASE_SIZE = 6 * MiB


def _rebase_case(to: str | None) -> tuple[OrderedCrashStore, bytes, dict[str, bytes]]:
    old = pattern(10, 2 * MiB) + bytes(2 * MiB) + pattern(11, MiB)
    new = old[:MiB] + pattern(12, MiB) + pattern(13, MiB)  # same, differs, data over zeros
    files = {"old.raw": old, "new.raw": new}

    async def build() -> tuple[OrderedCrashStore, bytes]:
        store = await _formatted(REBASE_SIZE, "old.raw", raw=True)
        top = await _open(store, raw_backing("old.raw", old))
        await top.write(CS + 100, pattern(14, 2 * CS))
        await top.write_zeroes(MiB + 4 * CS, 3 * CS)
        await top.write(3 * MiB + 5, pattern(15, CS))
        view = await top.read(0, REBASE_SIZE)
        await top.close()
        crash = OrderedCrashStore(bytes(store.data), name="top.qed")
        top = await _open(crash, raw_backing("old.raw", old))
        target = raw_backing(to, files[to]) if to else None
        stats = await rebase(top, target, to, raw=True)
        assert stats.bytes_copied > 0 and (stats.bytes_zeroed > 0) == (to is not None)
        assert await top.read(0, REBASE_SIZE) == view
        return crash, view

    crash, view = run(build())
    return crash, view, files


@pytest.mark.parametrize("to", ["new.raw", None], ids=["safe", "flatten"])
def test_every_crash_state_of_a_rebase_keeps_the_view(
    to: str | None, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    crash, view, files = _rebase_case(to)
    backings = {name: (lambda n=name: raw_backing(n, files[n])) for name in files}
    sample = QemuSample(qemu, tmp_path / "q", every=10, extra=files)
    totals = SweepTotals()

    async def judge(states: list[bytes]) -> tuple[list[str], list[str]]:
        top, report = await recover(states[0], "top.qed", backings)
        corrupt = [f"check: {p.message}" for p in report.problems if p.kind != "leak"]
        if top.backing_filename not in ("old.raw", to):
            corrupt.append(f"header names {top.backing_filename!r}")
        why = first_difference(await top.read(0, REBASE_SIZE), view)
        why2 = sample.offer("top.qed", states[0], totals)
        if why2:
            corrupt.append(why2)
        return ([f"view over {top.backing_filename}: {why}"] if why else []), corrupt

    result = sweep([crash], judge, torn=True, max_states=8)
    result.qemu_checks = totals.qemu_checks
    _report(f"rebase {'to new.raw' if to else 'flatten'}", result, crash_summary)


# =====================================================================================
# amend
# =====================================================================================

AMEND_SIZE = 6 * MiB
AMEND_CASES = {
    # name: (old cluster size, old table size, new cluster size, new table size, backing)
    "merge": (4096, 2, 8192, 2, False),
    "merge-over-raw": (4096, 2, 16384, 2, True),
    "split": (16384, 2, 4096, 4, False),
    "tables": (4096, 2, 4096, 4, False),
    "big-tables": (4096, 2, 8192, 8, False),  # new tables larger than the old file's gaps
}


def _amend_case(name: str) -> tuple[OrderedCrashStore, bytes, bytes | None]:
    cs1, ts1, cs2, ts2, with_backing = AMEND_CASES[name]
    backing = pattern(50, AMEND_SIZE) if with_backing else None

    async def build() -> tuple[OrderedCrashStore, bytes]:
        store = MemoryStore(name="img.qed")
        await QedImage.format_store(
            store,
            AMEND_SIZE,
            cluster_size=cs1,
            table_size=ts1,
            backing_name="base.raw" if backing else None,
            backing_raw=True,
        )
        below = raw_backing("base.raw", backing) if backing else None
        img = await _open(store, below)
        await img.write(100, pattern(51, 3 * cs1))
        await img.write(5 * cs1, pattern(52, cs1))  # a lone cluster: merged, copied
        await img.write_zeroes(16 * cs1, 4 * cs1)
        await img.write(4 * MiB + 7, pattern(53, 2 * cs1))
        await img.write(2 * MiB, pattern(54, 8 * cs1))  # contiguous: kept in a merge
        view = await img.read(0, AMEND_SIZE)
        await img.close()
        crash = OrderedCrashStore(bytes(store.data), name="img.qed")
        below = raw_backing("base.raw", backing) if backing else None
        img = await _open(crash, below)
        new, stats = await amend(img, cluster_size=cs2, table_size=ts2)
        assert (new.geo.cluster_size, new.geo.table_size) == (cs2, ts2)
        assert await new.read(0, AMEND_SIZE) == view
        assert stats.truncated_bytes > 0
        return crash, view

    crash, view = run(build())
    return crash, view, backing


@pytest.mark.parametrize("name", list(AMEND_CASES))
def test_every_crash_state_of_an_amend_is_the_old_image_or_the_new(
    name: str, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    cs1, ts1, cs2, ts2, _ = AMEND_CASES[name]
    crash, view, backing = _amend_case(name)
    files = {"base.raw": backing} if backing else {}
    backings = {"base.raw": lambda: raw_backing("base.raw", backing or b"")}
    sample = QemuSample(qemu, tmp_path / "q", every=4, extra=files)
    totals = SweepTotals()

    async def judge(states: list[bytes]) -> tuple[list[str], list[str]]:
        img, report = await recover(states[0], "img.qed", backings)
        corrupt = [f"check: {p.message}" for p in report.problems if p.kind != "leak"]
        geometry = (img.geo.cluster_size, img.geo.table_size)
        if geometry not in ((cs1, ts1), (cs2, ts2)):
            corrupt.append(f"recovered geometry {geometry}")
        why = first_difference(await img.read(0, AMEND_SIZE), view)
        why2 = sample.offer("img.qed", states[0], totals)
        if why2:
            corrupt.append(why2)
        return ([f"view with geometry {geometry}: {why}"] if why else []), corrupt

    result = sweep([crash], judge, torn=True, max_states=8, points=150)
    result.qemu_checks = totals.qemu_checks
    _report(f"amend {name}", result, crash_summary)
