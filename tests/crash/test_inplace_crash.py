"""Crash tests of the in-place qcow2 -> QED conversion (qedkit/jobs/inplace.py).

Small qcow2 images made by qemu-img and qemu-io, each exercising a kind of cluster
the conversion treats differently (reused data, compressed clusters written by
``qemu-io write -c``, zero clusters, copy-on-write from a raw backing file, partial
extended-L2 subclusters, 512-byte clusters gathered into 4 KiB QED clusters), are
converted on a CrashStore: padding, the appended copies and tables, the flush, the
header sector, and every step of the reclaim (the L1 table's move to cluster 1 and
its evictions, the compaction's table and data moves, the truncation) are logged.

Every crash point is tried, with every state of the unflushed writes (whole, and
torn at 512-byte sectors, sampled), and each state must be one of two things:

* **the original qcow2 image**: its first ``len(original)`` bytes unchanged (the
  conversion writes nothing inside the old file before the switch), and it reads,
  through qedkit's qcow2 reader, exactly what ``qemu-img convert -O raw`` read from
  the original; for a sample, ``qemu-img check`` exits 0 (the appended clusters have
  refcount 0: not leaks) and ``qemu-img compare`` says identical;
* **the QED image**: NEED_CHECK clear, ``check_image`` finds no corruption after a
  read-write open, it reads the same bytes; for a sample, ``qemu-img check`` finds
  no corruption (leaks are allowed until the reclaim is done) and ``qemu-img
  compare`` says identical. For a sample, running the reclaim again (the resume an
  interrupted ``qed convert --in-place`` does) ends with a clean ``qemu-img check``.

The last state of every scenario (everything durable) checks clean with no leak.
Totals lines as in the other crash tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crashkit import scaled

from qedkit.engine.chain import open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qcow2 import Qcow2Image
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.errors import QedError
from qedkit.jobs import inplace
from qedkit.jobs.inplace import InPlaceConverter, reclaim
from qedkit.store import CrashStore, MemoryStore

KiB = 1 << 10
MiB = 1 << 20
QCOW2 = b"QFI\xfb"
QED = b"QED\0"

pytestmark = pytest.mark.qemu


# ==========================================================================================
# The images
# ==========================================================================================


def _base(d: Path, size: int) -> bytes:
    data = random.Random(5).randbytes(size)
    (d / "base.raw").write_bytes(data)
    return data


def _mixed_4k(qemu: Any, d: Path) -> Path:
    _base(d, 512 * KiB)
    p = d / "mixed-4k.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
             "-F", "raw", p, "1M")  # fmt: skip
    qemu.io("-c", "write -P 0x11 0 64k",  # reused data
            "-c", "write -c -P 0x22 128k 64k",  # compressed clusters
            "-c", "write -z 200k 16k",  # zero clusters over backing data
            "-c", "write -P 0x33 300k 1000",  # copy-on-write from the backing file
            "-c", "write -c -P 0x44 600k 8k",  # compressed past the backing file's end
            "-c", "write -P 0x55 1020k 4k", p)  # fmt: skip
    return p


def _extl2(qemu: Any, d: Path) -> Path:
    _base(d, 256 * KiB)
    p = d / "extl2.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on",
             "-b", "base.raw", "-F", "raw", p, "512k")  # fmt: skip
    qemu.io("-c", "write -P 0x61 1k 2k",  # partial subclusters over backing data
            "-c", "write -P 0x62 64k 32k",  # whole clusters: reused
            "-c", "write -z 66k 1k",  # a zero subcluster inside a reused cluster
            "-c", "write -z 128k 4k", p)  # fmt: skip
    return p


def _c512(qemu: Any, d: Path) -> Path:
    p = d / "c512.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "256k")
    # 5 KiB first: the next run's data then starts at host 8 KiB (header, refcount
    # table and block, L1, L2, 10 clusters, L2), 4 KiB-aligned like its guest offset.
    qemu.io("-c", "write -P 0x71 0 5k",  # data in the QED header cluster: copied
            "-c", "write -P 0x72 64k 16k",  # an aligned run: reused
            "-c", "write -z 100k 4k", "-c", "write -P 0x73 200k 1500", p)  # fmt: skip
    return p


MAKERS: dict[str, Callable[[Any, Path], Path]] = {
    "mixed-4k": _mixed_4k,
    "extl2": _extl2,
    "c512": _c512,
}


# ==========================================================================================
# The scenario: one conversion on a CrashStore
# ==========================================================================================


@dataclass
class Scenario:
    name: str
    directory: Path
    initial: bytes
    expected: bytes  # qemu-img convert -O raw of the original
    backing: bytes | None
    crash: CrashStore
    switch_at: int = 0  # log position of the header sector write
    report: Any = None

    def backing_image(self) -> RawImage | None:
        if self.backing is None:
            return None
        data = self.backing
        return RawImage(MemoryStore(data, name="base.raw", writable=False), len(data))


def build(qemu: Any, name: str, tmp: Path) -> Scenario:
    """Convert image ``name`` on a CrashStore, appending in writes of 8 KiB (many
    unflushed writes before the one flush that precedes the header switch)."""
    d = tmp / name
    d.mkdir(parents=True)
    path = MAKERS[name](qemu, d)
    qemu.img("convert", "-O", "raw", path, d / "expected.raw")
    base = d / "base.raw"
    sc = Scenario(
        name,
        d,
        path.read_bytes(),
        (d / "expected.raw").read_bytes(),
        base.read_bytes() if base.exists() else None,
        CrashStore(path.read_bytes(), name=path.name),
    )

    async def go() -> None:
        meta = await Qcow2Image.read_metadata(sc.crash)
        src = await Qcow2Image.open(sc.crash, meta, backing=sc.backing_image())
        conv = InPlaceConverter(src)
        await conv.plan()
        assert sc.crash.position == 0, "planning wrote"
        await conv.write_tables()
        sc.switch_at = sc.crash.position
        img = await conv.switch()
        stats = await reclaim(img)
        sc.report = (conv.planned, stats)
        assert await img.read(0, img.size) == sc.expected
        assert (await check_image(img)).leaks == 0

    saved = inplace.WRITE_BATCH
    inplace.WRITE_BATCH = 8 * KiB
    try:
        asyncio.run(go())
    finally:
        inplace.WRITE_BATCH = saved
    return sc


# ==========================================================================================
# Judging one state
# ==========================================================================================


@dataclass
class Totals:
    points: int = 0
    states: int = 0
    qcow2_states: int = 0
    qed_states: int = 0
    bad: int = 0
    qemu_checks: int = 0
    qemu_bad: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        return (
            f"in-place {name}: {self.states} states at {self.points} crash points "
            f"({self.qcow2_states} qcow2, {self.qed_states} QED), {self.bad} bad; "
            f"{self.qemu_checks} qemu-img checks ({self.qemu_bad} bad), {self.resumed} "
            "reclaims resumed"
        )


async def judge(sc: Scenario, data: bytes) -> tuple[str, list[str]]:
    """('qcow2' | 'qed' | '?', problems)."""
    try:
        return await _judge(sc, data)
    except QedError as exc:
        kind = {QCOW2: "qcow2", QED: "qed"}.get(data[:4], "?")
        return kind, [f"opening the {kind} state failed: {exc}"]


async def _judge(sc: Scenario, data: bytes) -> tuple[str, list[str]]:
    if data[:4] == QCOW2:
        problems = []
        if data[: len(sc.initial)] != sc.initial:
            bad = next(i for i in range(len(sc.initial)) if data[i] != sc.initial[i])
            problems.append(f"a qcow2 state differs from the original at byte {bad:#x}")
        store = MemoryStore(data, name=sc.name, writable=False)
        meta = await Qcow2Image.read_metadata(store)
        img = await Qcow2Image.open(store, meta, backing=sc.backing_image())
        if await img.read(0, img.size) != sc.expected:
            problems.append("the qcow2 state reads other data")
        return "qcow2", problems
    if data[:4] == QED:
        problems = []
        store = MemoryStore(data, name=sc.name)
        header, area = await QedImage.read_header(store)
        if header.needs_check:
            problems.append("NEED_CHECK is set")
        img = await open_qed(store, header, area, backing=sc.backing_image(), readonly=False)
        report = await check_image(img)
        if report.corruptions or report.check_errors:
            problems.append(f"check: {report.corruptions} corruptions")
        elif await img.read(0, img.size) != sc.expected:
            problems.append("the QED state reads other data")
        return "qed", problems
    return "?", [f"neither qcow2 nor QED: magic {data[:4]!r}"]


class Qemu:
    """qemu-img check and compare of a sample of the states."""

    def __init__(self, qemu: Any, sc: Scenario, every: int, *, compare: bool = True) -> None:
        self.qemu = qemu
        self.sc = sc
        self.every = every
        self.compare = compare  # with expected.raw (not when guest writes changed it)
        self.seen: set[bytes] = set()
        self.path = sc.directory / "state"

    def offer(self, data: bytes, kind: str, totals: Totals) -> list[str]:
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self.seen:
            return []
        self.seen.add(digest)
        if (len(self.seen) - 1) % self.every:
            return []
        return self.run(data, kind, totals, clean=False)

    def run(self, data: bytes, kind: str, totals: Totals, *, clean: bool) -> list[str]:
        self.path.write_bytes(data)
        totals.qemu_checks += 1
        fmt = "qcow2" if kind == "qcow2" else "qed"
        check = self.qemu.img("check", "-f", fmt, self.path, check=False, cwd=self.sc.directory)
        allowed = (0,) if kind == "qcow2" or clean else (0, 3)
        problems = []
        if check.returncode not in allowed:
            problems.append(f"qemu-img check ({fmt}) exited {check.returncode}: {check.stdout}")
        compare = subprocess.run(
            [self.qemu.img_path, "compare", "-f", fmt, "-F", "raw", self.path.name,
             "expected.raw"], cwd=self.sc.directory, capture_output=True, text=True,
        ) if self.compare else None  # fmt: skip
        if compare is not None and compare.returncode != 0:
            problems.append(f"qemu-img compare ({fmt}): {compare.stdout} {compare.stderr}")
        if problems:
            totals.qemu_bad += 1
            keep = self.sc.directory / f"failed-{totals.qemu_bad}.{fmt}"
            keep.write_bytes(data)
            problems.append(f"(state kept as {keep})")
        return problems


async def resume(sc: Scenario, data: bytes) -> tuple[bytes, list[str]]:
    """Finish an interrupted conversion from a QED state, as ``qed convert
    --in-place`` does: the reclaim again; it must end with no leak."""
    store = MemoryStore(data, name=sc.name)
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=sc.backing_image(), readonly=False)
    await reclaim(img)
    problems = []
    report = await check_image(img)
    if report.leaks or report.corruptions:
        problems.append(f"resumed reclaim: {report.leaks} leaks, {report.corruptions} corrupt")
    if await img.read(0, img.size) != sc.expected:
        problems.append("resumed reclaim changed the data")
    await img.close()
    return bytes(store.data), problems


def sweep(sc: Scenario, qemu: Any, *, torn: bool, max_states: int, every: int) -> Totals:
    totals = Totals()
    checker = Qemu(qemu, sc, every)
    crash = sc.crash
    rng = random.Random(sc.name)

    async def go() -> None:
        for k in range(crash.crash_points() + 1):
            totals.points += 1
            for state in crash.scenarios(k, torn=torn, max_states=max_states):
                totals.states += 1
                kind, problems = await judge(sc, state.data)
                if kind == "qcow2":
                    totals.qcow2_states += 1
                    if k > sc.switch_at + 1:
                        problems.append("still qcow2 after the header switch was flushed")
                elif kind == "qed":
                    totals.qed_states += 1
                if not problems:
                    problems = checker.offer(state.data, kind, totals)
                if not problems and kind == "qed" and rng.random() < 0.15:
                    totals.resumed += 1
                    done, problems = await resume(sc, state.data)
                    if not problems and rng.random() < 0.3:
                        problems = checker.run(done, "qed", totals, clean=True)
                if problems:
                    totals.bad += 1
                    if len(totals.failures) < 5:
                        totals.failures.append(f"[{sc.name}] {state.describe()}: {problems}")
        final = crash.durable_state(crash.crash_points())
        if final[:4] != QED:
            totals.failures.append(f"[{sc.name}] the finished file is not QED")
            totals.bad += 1
        else:
            problems = checker.run(final, "qed", totals, clean=True)
            if problems:
                totals.bad += 1
                totals.failures.append(f"[{sc.name}] the finished image: {problems}")

    asyncio.run(go())
    return totals


# ==========================================================================================
# Tests
# ==========================================================================================


def test_the_scenarios_reuse_copy_and_reclaim(qemu: Any, tmp_path: Path) -> None:
    """The images do exercise what the sweeps are for."""
    seen: dict[str, Any] = {}
    for name in MAKERS:
        sc = build(qemu, name, tmp_path)
        plan, stats = sc.report
        seen[name] = plan.stats
        assert plan.stats.reused > 0, name
        assert plan.stats.copied > 0, name
        assert stats.tables_moved >= 1, name  # the L1 table at least
        assert sc.crash.crash_points() > 10
    assert seen["mixed-4k"].copy_reasons.get("compressed", 0) >= 4
    assert seen["mixed-4k"].zero >= 4
    assert seen["extl2"].copy_reasons.get("subclusters", 0) >= 1
    assert seen["c512"].copy_reasons.get("layout", 0) >= 1


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_every_crash_state_of_an_in_place_conversion_is_the_qcow2_or_the_qed_image(
    name: str, torn: bool, qemu: Any, tmp_path: Path, crash_summary: Callable[[str], None]
) -> None:
    sc = build(qemu, name, tmp_path)
    totals = sweep(
        sc,
        qemu,
        torn=torn,
        max_states=scaled(16) if torn else scaled(32),
        every=12,
    )
    crash_summary(totals.line(f"{name} ({'torn' if torn else 'whole writes'})"))
    assert not totals.failures, "\n".join(totals.failures)
    assert totals.qcow2_states and totals.qed_states
    assert totals.qemu_checks >= 3


def test_the_checks_catch_a_header_switch_before_the_tables_are_durable(
    qemu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converter that skips the flush between the appended tables and the header
    sector: some crash state is then a QED header over missing tables, and the sweep
    must say so (the checks are not vacuous)."""
    original = CrashStore.flush
    calls = {"n": 0}

    async def first_flush_lost(self: CrashStore) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # write_tables' flush
            return
        await original(self)

    monkeypatch.setattr(CrashStore, "flush", first_flush_lost)
    sc = build(qemu, "mixed-4k", tmp_path)
    monkeypatch.setattr(CrashStore, "flush", original)
    totals = sweep(sc, qemu, torn=False, max_states=32, every=1000)
    assert totals.bad > 0


# ==========================================================================================
# The live conversion: guest writes before, during and after the switch
# ==========================================================================================


@dataclass
class Write:
    offset: int
    data: bytes
    end: int = 0  # log position when it was acknowledged


def test_every_crash_state_of_a_live_conversion_keeps_acknowledged_flushed_writes(
    qemu: Any, tmp_path: Path, crash_summary: Callable[[str], None]
) -> None:
    """LiveConversion on a CrashStore: an in-place write and a flush before the job;
    during the append an in-place write, a flush, and a write into an unallocated
    cluster (held until the switch); after the switch a write and a flush. At every
    crash point each state (qcow2 or QED) reads, for every write, its new bytes if a
    flush completed after it was acknowledged, else old or new (per sector when
    torn), and the original bytes everywhere else."""
    from qedkit.jobs.inplace_live import LiveConversion

    sc = build(qemu, "mixed-4k", tmp_path)  # for its files; converted again below
    crash = CrashStore(sc.initial, name="live.qcow2")
    sc.crash = crash
    writes: list[Write] = []

    async def go() -> None:
        meta = await Qcow2Image.read_metadata(crash)
        src = await Qcow2Image.open(crash, meta, backing=sc.backing_image())
        live = await LiveConversion.prepare(src)

        async def write(offset: int, data: bytes) -> None:
            await live.write(offset, data)
            writes.append(Write(offset, data, crash.position))

        await write(4 * KiB + 100, b"\x91" * 3000)  # reused: in place
        await live.flush()
        held: list[asyncio.Task[None]] = []

        async def checkpoint(done: int, total: int) -> None:
            if not held:
                await write(20 * KiB, b"\x92" * 5000)  # in place, during the append
                await live.flush()
                held.append(asyncio.ensure_future(write(700 * KiB + 10, b"\x93" * 700)))
                await asyncio.sleep(0)

        await live.convert(checkpoint)
        await asyncio.gather(*held)
        await write(8 * KiB, b"\x94" * 4096)  # QED now
        await live.flush()
        await write(900 * KiB, b"\x95" * 100)  # never flushed
        assert (live.in_place_writes, live.held_requests) == (2, 1)

    asyncio.run(go())
    assert len(writes) == 5
    base = bytearray(sc.expected)
    for w in writes:
        base[w.offset : w.offset + len(w.data)] = w.data
    final = bytes(base)

    async def read_state(data: bytes) -> tuple[str, bytes]:
        if data[:4] == QCOW2:
            store = MemoryStore(data, writable=False)
            meta = await Qcow2Image.read_metadata(store)
            img: Any = await Qcow2Image.open(store, meta, backing=sc.backing_image())
            return "qcow2", await img.read(0, img.size)
        store = MemoryStore(data)
        header, area = await QedImage.read_header(store)
        img = await open_qed(store, header, area, backing=sc.backing_image(), readonly=False)
        if (await check_image(img)).corruptions:
            raise AssertionError("corrupt QED state")
        return "qed", await img.read(0, img.size)

    totals = Totals()
    checker = Qemu(qemu, sc, 10, compare=False)

    async def sweep_live(torn: bool) -> None:
        for k in range(crash.crash_points() + 1):
            totals.points += 1
            for state in crash.scenarios(k, torn=torn, max_states=16):
                totals.states += 1
                try:
                    kind, got = await read_state(state.data)
                except QedError as exc:
                    kind, got = "?", b""
                    problems = [f"does not open: {exc}"]
                else:
                    problems = _judge_writes(got, sc.expected, final, writes, crash, k)
                totals.qcow2_states += kind == "qcow2"
                totals.qed_states += kind == "qed"
                if not problems and kind != "?":
                    problems = checker.offer(state.data, kind, totals)
                if problems:
                    totals.bad += 1
                    if len(totals.failures) < 5:
                        totals.failures.append(f"{state.describe()}: {problems}")

    asyncio.run(sweep_live(False))
    asyncio.run(sweep_live(True))
    crash_summary(totals.line("live (whole and torn)"))
    assert not totals.failures, "\n".join(totals.failures)
    assert totals.qcow2_states and totals.qed_states


def _judge_writes(
    got: bytes, original: bytes, final: bytes, writes: list[Write], crash: CrashStore, k: int
) -> list[str]:
    problems = []
    covered = bytearray(len(original))
    for w in writes:
        lo, hi = w.offset, w.offset + len(w.data)
        covered[lo:hi] = b"\1" * (hi - lo)
        piece = got[lo:hi]
        if crash.durable_at(w.end, k):
            if piece != w.data:
                problems.append(f"a flushed write at {lo:#x} is lost")
            continue
        for s in range(lo, hi, 512):  # old or new, sector by sector
            e = min(hi, s - s % 512 + 512)
            if got[s:e] not in (original[s:e], final[s:e]):
                problems.append(f"bytes at {s:#x} are neither old nor new")
                break
    for i in range(0, len(original), 4096):
        if not any(covered[i : i + 4096]) and got[i : i + 4096] != original[i : i + 4096]:
            problems.append(f"untouched bytes at {i:#x} changed")
            break
    return problems
