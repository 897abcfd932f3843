"""Fault injection: store calls that fail with EIO or ENOSPC, in the engine and in the CLI.

Part 1 wraps the image's store (and a backing file's) in a FaultStore over a
CrashStore and, for each request kind under test, fails in turn **every** store call
the request makes (each write, writev, write_zeroes, discard, read, flush, truncate:
their number comes from a dry run), with EIO, with ENOSPC, and for writes with
ENOSPC after a short write (the first half persisted). For each injected fault:

* the request raises StoreError (a QedError) naming the store and the operation,
  with ``.errno`` set;
* with the fault cleared, check_image finds no corruption (leaks allowed), every
  acknowledged request reads back, the failed request's range reads old or new
  content byte by byte, a new allocating write works, and a close leaves a clean
  image that reopens with the same content;
* a power loss right after the failure (the CrashStore's durable state, and the
  state with every write persisted) recovers to the same guarantees, with only
  flushed requests guaranteed.

The open-time repair of a dirty image gets the same treatment: the open fails with
StoreError, and a later open repairs to the content an uninterrupted repair gives.

Part 2 makes the ``qed`` command hit real errors: EFBIG from RLIMIT_FSIZE (CPython
ignores SIGXFSZ, so writes past the limit fail), and ENOSPC on a small tmpfs (only
as root: the one acceptable skip). The command exits non-zero with ``qed: FILE:
message`` and no traceback, and the image passes ``qemu-img check`` afterwards with
the data written before.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    CS,
    TABLE_SIZE,
    MiB,
    fresh_image_workload,
    new_qed,
    pattern,
    round_down,
    round_up,
    run,
)

import qedkit
from qedkit.engine.base import BlockImage, ExtentKind
from qedkit.engine.chain import open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.errors import QedError, StoreError
from qedkit.format.header import Feature, Header
from qedkit.store import CrashStore, FaultStore, MemoryStore

Record = Callable[[str], None]
IMG = "img.qed"
BASE = "base.raw"
WRITE_OPS = ("write", "writev", "write_zeroes")
OPS = (*WRITE_OPS, "discard", "read", "flush", "truncate")


# =====================================================================================
# Part 1: the engine under injected faults
# =====================================================================================


@dataclass(frozen=True)
class Req:
    """A guest request: write, zero, discard, resize or flush."""

    kind: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    unmap: bool = False

    def describe(self) -> str:
        if self.kind == "flush":
            return "flush"
        if self.kind == "resize":
            return f"resize to {self.offset:#x}"
        extra = " unmap" if self.unmap else ""
        return f"{self.kind}{extra} {self.length} bytes at {self.offset:#x}"


def W(offset: int, data: bytes) -> Req:
    return Req("write", offset, len(data), data)


def Z(offset: int, length: int, *, unmap: bool = False) -> Req:
    return Req("zero", offset, length, unmap=unmap)


def D(offset: int, length: int) -> Req:
    return Req("discard", offset, length)


def R(new_size: int) -> Req:
    return Req("resize", new_size)


F = Req("flush")


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    backing: bytes | None
    prefix: tuple[Req, ...]  # acknowledged before the request under test
    action: Req


@dataclass(frozen=True)
class Fault:
    target: str  # IMG or BASE: whose store fails
    op: str
    nth: int
    errno: int
    partial: bool = False

    def describe(self) -> str:
        how = " after a short write" if self.partial else ""
        return (
            f"{errno.errorcode[self.errno]}{how} on {self.target}'s {self.op} "
            f"#{self.nth} of the request"
        )


async def _expected(img: QedImage, model: bytearray, req: Req) -> bytearray:
    """The guest content after ``req`` (discard depends on what is allocated)."""
    new = bytearray(model)
    if req.kind == "write":
        new[req.offset : req.offset + req.length] = req.data
    elif req.kind == "zero":
        new[req.offset : req.offset + req.length] = bytes(req.length)
    elif req.kind == "discard":
        a, b = round_up(req.offset), round_down(req.offset + req.length)
        if a < b:
            for ext in await img.block_status(a, b - a):
                if ext.kind is ExtentKind.DATA:
                    new[ext.start : ext.end] = bytes(ext.length)
    elif req.kind == "resize":
        new.extend(bytes(req.offset - len(model)))
    return new


async def _apply(img: QedImage, req: Req) -> None:
    if req.kind == "write":
        await img.write(req.offset, req.data)
    elif req.kind == "zero":
        await img.write_zeroes(req.offset, req.length, unmap=req.unmap)
    elif req.kind == "discard":
        await img.discard(req.offset, req.length)
    elif req.kind == "resize":
        await img.resize(req.offset)
    else:
        await img.flush()


def first_bad_byte(got: bytes, options: list[bytes], lo: int) -> str | None:
    """None if every byte of ``got`` equals that byte of one of ``options``."""
    if got in options:
        return None
    for s in range(0, len(got), 512):
        piece = got[s : s + 512]
        if any(piece == opt[s : s + 512] for opt in options):
            continue
        for i in range(s, min(len(got), s + 512)):
            if all(got[i] != opt[i] for opt in options):
                shown = " or ".join(f"{opt[i]:#04x}" for opt in options)
                return f"guest byte {lo + i:#x} reads {got[i]:#04x}, expected {shown}"
    return None


async def _judge_guest(
    img: BlockImage,
    flushed: bytes,
    acked: bytes,
    new: bytes,
    lo: int,
    hi: int,
    what: str,
) -> list[str]:
    """The guest of ``img`` must read ``acked`` (or ``flushed``, after a crash) outside
    ``[lo, hi)`` and one of those or ``new`` inside, byte by byte; the size must be
    the old or the new one."""
    size = img.size
    if size not in (len(acked), len(new)):
        return [f"{what}: guest size {size:#x}, expected {len(acked):#x} or {len(new):#x}"]
    got = await img.read(0, size)
    problems = []
    options = [acked] if flushed == acked else [flushed, acked]
    for a, b, opts in [
        (0, lo, options),
        (lo, min(hi, size), [*options, new]),
        (hi, size, options),
    ]:
        if a >= b:
            continue
        why = first_bad_byte(got[a:b], [o[a:b] for o in opts], a)
        if why:
            inside = "inside" if a == lo else "outside"
            problems.append(f"{what}: {why} ({inside} the failed request's range)")
    return problems


def _backing_image(data: bytes | None, wrap: bool) -> tuple[BlockImage | None, FaultStore | None]:
    if data is None:
        return None, None
    inner = MemoryStore(data, name=BASE, writable=False)
    store = FaultStore(inner) if wrap else None
    return RawImage(store or inner, len(data)), store


def _format(case: Case) -> bytes:
    async def go() -> bytes:
        fmt = await new_qed(IMG, case.size, BASE if case.backing is not None else None)
        return bytes(fmt.data)

    return run(go())


async def _open(data: bytes, backing: bytes | None, *, readonly: bool = False) -> QedImage:
    store = MemoryStore(data, name=IMG, writable=not readonly)
    header, area = await QedImage.read_header(store)
    img = await open_qed(
        store, header, area, backing=_backing_image(backing, False)[0], readonly=readonly
    )
    return img


@dataclass
class FaultTotals:
    runs: int = 0
    clean_errors: int = 0
    crash_states: int = 0
    lost: int = 0
    corrupt: int = 0
    failing: int = 0
    diverged: int = 0  # the reopened image shows parts of the failed request the session did not
    by_op: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add_failure(self, what: str, problems: list[str]) -> None:
        self.failing += 1
        if len(self.failures) < 6:
            self.failures.append(what + "\n  " + "\n  ".join(problems))

    def line(self, name: str) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.by_op.items()))
        return (
            f"faults {name}: {self.runs} faults injected ({ops}), {self.clean_errors} clean "
            f"errors, {self.crash_states} crash states after them, {self.lost} lost, "
            f"{self.corrupt} corrupt, {self.failing} failing ({self.diverged} reopened images "
            f"show more of the failed request than the session did)"
        )


def _check_error(exc: BaseException | None, fault: Fault) -> list[str]:
    if exc is None:
        return [f"the request succeeded although {fault.describe()} failed"]
    if not isinstance(exc, StoreError):
        return [f"the request raised {type(exc).__name__}: {exc} (expected StoreError)"]
    problems = []
    if exc.errno != fault.errno:
        problems.append(f"StoreError.errno is {exc.errno}, expected {fault.errno}")
    if exc.filename != fault.target or not str(exc).startswith(f"{fault.target}: "):
        problems.append(f"the message does not name {fault.target}: {exc}")
    if fault.op not in str(exc) or os.strerror(fault.errno) not in str(exc):
        problems.append(f"the message does not name the {fault.op} and its error: {exc}")
    return problems


async def _run_case(case: Case, initial: bytes, fault: Fault | None, totals: FaultTotals) -> Any:
    """One run: the prefix, then the request with ``fault`` armed. A dry run
    (``fault`` None) returns the store calls the request makes per (store, op)."""
    inner = CrashStore(initial, name=IMG)
    store = FaultStore(inner)
    backing, bstore = _backing_image(case.backing, True)
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=backing, readonly=False)
    acked = bytearray(await img.read(0, case.size))
    flushed = bytes(acked)
    for req in case.prefix:
        acked = await _expected(img, acked, req)
        await _apply(img, req)
        if req.kind == "flush":
            flushed = bytes(acked)
    new = await _expected(img, acked, case.action)
    img.cache.clear()  # the request loads its L2 tables: reads to fail
    before = {IMG: Counter(store.calls), BASE: Counter(bstore.calls if bstore else {})}
    if fault is not None:
        target = store if fault.target == IMG else bstore
        assert target is not None
        target.fail(fault.op, nth=fault.nth, errno=fault.errno, partial=fault.partial)
    exc: BaseException | None = None
    try:
        await _apply(img, case.action)
    except Exception as caught:  # judged below
        exc = caught
    if fault is None:
        assert exc is None, f"{case.name}: the dry run failed: {exc}"
        return {
            name: Counter({op: n - before[name][op] for op, n in calls.items()})
            for name, calls in ((IMG, store.calls), (BASE, bstore.calls if bstore else {}))
        }
    # ---- judge -------------------------------------------------------------------
    what = f"[{case.name}] {case.action.describe()} with {fault.describe()}"
    totals.runs += 1
    totals.by_op[fault.op] += 1
    problems = _check_error(exc, fault)
    if not problems:
        totals.clean_errors += 1
    durable = inner.durable_state(inner.position)
    everything = bytes(inner.data)
    store.clear()
    if bstore is not None:
        bstore.clear()
    lo, hi = case.action.offset, case.action.offset + case.action.length
    if case.action.kind == "resize":
        lo, hi = case.size, len(new)
    acked_b, new_b = bytes(acked), bytes(new)
    # In the same session, with the fault gone.
    report = await check_image(img)
    if report.corruptions or report.check_errors:
        totals.corrupt += 1
        problems.append(
            f"check after the failure: {report.corruptions} corruptions, "
            f"{report.check_errors} check errors: "
            + "; ".join(p.message for p in report.problems if p.kind != "leak")
        )
    guest = await _judge_guest(img, acked_b, acked_b, new_b, lo, hi, "same session")
    problems += guest
    # Later requests work: a new allocation at the end, then a clean close.
    size = img.size
    try:
        await img.write(size - CS, b"L" * 1000)
        await img.flush()
        if await img.read(size - CS, 1000) != b"L" * 1000:
            problems.append("a write after the failure does not read back")
        if (await check_image(img)).corruptions:
            problems.append("a write after the failure made the image corrupt")
        content = await img.read(0, size)
        await img.close()
    except QedError as later:
        problems.append(f"a request after the failure raised {type(later).__name__}: {later}")
    else:
        closed = bytes(inner.data)
        if Header.parse(closed[:4096], len(closed)).needs_check:
            problems.append("NEED_CHECK is still set after a clean close")
        again = await _open(closed, case.backing)
        if (await check_image(again)).corruptions:
            problems.append("reopened after close, the image is corrupt")
        else:
            # Not necessarily ``content``: after a short write of a table sector the
            # disk may hold entries the session never saw (old-or-new still holds).
            reopened = await again.read(0, size)
            if reopened[size - CS : size - CS + 1000] != b"L" * 1000:
                problems.append("reopened after close, the write after the failure is gone")
            for a, b in ((0, size - CS), (size - CS + 1000, size)):
                opts = [content[a:b], new_b[a:b] + bytes(max(0, b - a - len(new_b[a:b])))]
                why = first_bad_byte(reopened[a:b], opts, a)
                if why:
                    problems.append(f"reopened after close: {why}")
            if reopened != content:
                totals.diverged += 1
    # A power loss right after the failure.
    for label, state in (("durable state", durable), ("every write persisted", everything)):
        totals.crash_states += 1
        try:
            recovered = await _open(state, case.backing)
            report = await check_image(recovered)
            if report.corruptions or report.check_errors:
                totals.corrupt += 1
                problems.append(f"crash after the failure ({label}): check finds corruption")
                continue
            found = await _judge_guest(
                recovered, flushed, acked_b, new_b, lo, hi, f"crash after the failure ({label})"
            )
        except QedError as bad:
            totals.corrupt += 1
            problems.append(f"crash after the failure ({label}): open raised {bad}")
            continue
        problems += found
        if any("outside" in p for p in found):
            totals.lost += 1
    if any("outside" in p for p in guest):
        totals.lost += 1
    if problems:
        totals.add_failure(what, problems)
    return None


def faults_for(calls: dict[str, Counter[str]]) -> Iterator[Fault]:
    """Every call of the request, failed in turn: EIO, ENOSPC, and for writes ENOSPC
    after a short write."""
    for target, counter in calls.items():
        for op in OPS:
            for nth in range(1, counter[op] + 1):
                yield Fault(target, op, nth, errno.EIO)
                yield Fault(target, op, nth, errno.ENOSPC)
                if op in WRITE_OPS:
                    yield Fault(target, op, nth, errno.ENOSPC, partial=True)


OLD_END = 3 * CS + 1024  # ends inside a cluster
BACKING = pattern(77, 2 * MiB)

CASES = [
    Case(
        "allocating write into a new L2 table",
        8 * MiB,
        None,
        (W(0, pattern(1, 6000)), F),
        W(4 * MiB + 512, pattern(2, 3000)),
    ),
    Case(
        "allocating write into an existing L2 table",
        8 * MiB,
        None,
        (W(0, pattern(1, 6000)), F),
        W(3 * CS + 100, pattern(3, 2 * CS)),
    ),
    Case(
        "allocating write across two L2 tables",
        8 * MiB,
        None,
        (W(4 * MiB - 2 * CS, pattern(4, CS)), F),
        W(4 * MiB - CS - 100, pattern(5, 2 * CS)),
    ),
    Case(
        "in-place write",
        8 * MiB,
        None,
        (W(0, pattern(6, 3 * CS)), F),
        W(100, pattern(7, 2 * CS)),
    ),
    Case(
        "copy-on-write over a backing file",
        MiB,
        BACKING,
        (W(CS, pattern(8, 100)), F),
        W(2 * CS + 1000, pattern(9, CS + 500)),
    ),
    Case(
        "write-zeroes",
        8 * MiB,
        None,
        (W(0, pattern(10, 4 * CS)), W(8 * CS, pattern(11, CS)), F),
        Z(CS + 100, 9 * CS),
    ),
    Case(
        "write-zeroes with unmap over a backing file",
        MiB,
        BACKING,
        (W(0, pattern(12, 2 * CS)), F),
        Z(CS, 4 * CS + 100, unmap=True),
    ),
    Case(
        "discard",
        8 * MiB,
        None,
        (W(0, pattern(13, 3 * CS)), F),
        D(0, 2 * CS),
    ),
    Case(
        "resize over a longer backing file",
        MiB + 1536,
        BACKING,
        (W(MiB + 1000, pattern(14, 400)), F),
        R(3 * MiB),
    ),
    Case(
        "resize into a new L2 table",
        OLD_END,
        None,
        (W(3 * CS + 10, pattern(15, 100)), F),
        R(6 * MiB),
    ),
    Case(
        "flush that clears NEED_CHECK",
        8 * MiB,
        None,
        (W(0, pattern(16, 100)), F, W(5 * CS, pattern(17, 100))),
        F,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_every_store_call_of_a_request_may_fail(case: Case, crash_summary: Record) -> None:
    initial = _format(case)
    calls = run(_run_case(case, initial, None, FaultTotals()))
    totals = FaultTotals()

    async def go() -> None:
        for fault in faults_for(calls):
            await _run_case(case, initial, fault, totals)

    run(go())
    summary = totals.line(case.name)
    crash_summary(summary)
    assert totals.runs >= 2, f"{case.name}: the request makes too few store calls: {calls}"
    assert not totals.failures, summary + "\n\n" + "\n\n".join(totals.failures)
    assert totals.lost == 0 and totals.corrupt == 0 and totals.clean_errors == totals.runs


def test_the_fault_cases_exercise_what_they_name() -> None:
    """Dry runs: which store calls each request makes (so the faults land there)."""
    seen = {}
    for case in CASES:
        calls = run(_run_case(case, _format(case), None, FaultTotals()))
        seen[case.name] = calls
    assert seen["in-place write"][IMG]["write"] >= 1
    assert seen["in-place write"][IMG]["writev"] == 0
    assert seen["allocating write into a new L2 table"][IMG]["flush"] >= 2  # flag, table
    assert seen["copy-on-write over a backing file"][BASE]["read"] >= 1
    assert seen["write-zeroes"][IMG]["write_zeroes"] >= 1
    assert seen["write-zeroes with unmap over a backing file"][IMG]["write_zeroes"] >= 1
    assert seen["discard"][IMG]["discard"] >= 1
    assert seen["resize over a longer backing file"][IMG]["write_zeroes"] >= 1
    for name in ("allocating write into an existing L2 table", "in-place write", "discard"):
        assert seen[name][IMG]["read"] >= 1, name  # L2 tables loaded (the cache was cleared)


@pytest.mark.parametrize("partial", [False, True], ids=["not-written", "short-write"])
def test_a_failed_write_reads_old_or_new_in_its_range(partial: bool) -> None:
    """An in-place write across two L2 tables is two store writes; the second one
    fails. The first table's part reads new, the second's old (or, after a short
    write, its first half new): a mix of whole old and new pieces, nothing else."""

    async def go() -> None:
        fmt = MemoryStore(name=IMG)
        await QedImage.format_store(fmt, 8 * MiB, cluster_size=CS, table_size=TABLE_SIZE)
        store = FaultStore(MemoryStore(fmt.data, name=IMG))
        header, area = await QedImage.read_header(store)
        img = await open_qed(store, header, area, backing=None, readonly=False)
        lo, n = 4 * MiB - 2 * CS, 4 * CS
        old, new = pattern(70, n), pattern(71, n)
        await img.write(lo, old)
        await img.flush()
        store.fail("write", nth=2, errno=errno.ENOSPC, partial=partial)
        with pytest.raises(StoreError) as info:
            await img.write(lo, new)
        assert info.value.errno == errno.ENOSPC
        assert str(info.value).startswith(f"{IMG}: write of {2 * CS} bytes at offset ")
        assert "No space left on device" in str(info.value)
        store.clear()
        got = await img.read(lo, n)
        half = 2 * CS + (CS if partial else 0)
        assert got[:half] == new[:half]  # the first table's part (and the short write)
        assert got[half:] == old[half:]
        assert (await check_image(img)).corruptions == 0
        await img.write(lo, new)  # and the same request works now
        assert await img.read(lo, n) == new

    run(go())


# ---- the open-time repair of a dirty image -------------------------------------------


async def _repair_calls(data: bytes) -> Counter[str]:
    store = FaultStore(MemoryStore(data, name=IMG))
    header, area = await QedImage.read_header(store)
    await open_qed(store, header, area, backing=None, readonly=False)
    return Counter(store.calls)


async def _handmade_dirty_image(*, shared_table: bool) -> bytes:
    """A flagged image with a duplicate data reference and an entry past the end of
    the file (and, with ``shared_table``, one L2 table linked from two L1 entries)."""
    fmt = MemoryStore(name=IMG)
    await QedImage.format_store(fmt, 8 * MiB, cluster_size=CS, table_size=TABLE_SIZE)
    header, area = await QedImage.read_header(fmt)
    img = await open_qed(fmt, header, area, backing=None, readonly=False)
    await img.write(0, pattern(50, 3 * CS))
    await img.write(4 * MiB, pattern(51, CS))
    await img.close()
    data = bytearray(fmt.data)
    header = Header.parse(bytes(data[:4096]), len(data))
    l1 = header.l1_table_offset
    t0 = int.from_bytes(data[l1 : l1 + 8], "little")
    e1 = int.from_bytes(data[t0 + 8 : t0 + 16], "little")
    data[t0 + 5 * 8 : t0 + 6 * 8] = e1.to_bytes(8, "little")  # duplicate of entry 1
    data[t0 + 6 * 8 : t0 + 7 * 8] = (len(data) + 10 * CS).to_bytes(8, "little")  # past EOF
    if shared_table:
        data[l1 + 8 : l1 + 16] = t0.to_bytes(8, "little")  # L1 entry 1 -> table of entry 0
    features = int.from_bytes(data[16:24], "little") | Feature.NEED_CHECK
    data[16:24] = features.to_bytes(8, "little")
    return bytes(data)


def _repair_candidates() -> list[tuple[str, bytes, Counter[str]]]:
    """Dirty images whose open-time repair does each kind of work: crash states of
    test_harness's fresh workload (one per set of store calls the repair makes:
    clearing the flag, clearing invalid entries, truncating trailing leaks) and two
    handmade ones (copying duplicate clusters, moving a shared L2 table)."""
    sc = fresh_image_workload()
    crash = sc.crash
    found: dict[tuple[str, ...], tuple[str, bytes, Counter[str]]] = {}

    async def go() -> list[tuple[str, bytes, Counter[str]]]:
        for k in range(crash.crash_points() + 1):
            for state in crash.scenarios(k):
                if not Header.parse(state.data[:4096], len(state.data)).needs_check:
                    continue
                calls = await _repair_calls(state.data)
                key = tuple(sorted(op for op, n in calls.items() if n and op != "read"))
                if key not in found:
                    found[key] = (f"fresh.qed {state.describe()}", state.data, calls)
        out = list(found.values())
        for shared in (False, True):
            data = await _handmade_dirty_image(shared_table=shared)
            name = "handmade: duplicate, invalid entry" + (", shared table" if shared else "")
            out.append((name, data, await _repair_calls(data)))
        return out

    return run(go())


def test_a_failed_open_time_repair_leaves_an_image_a_later_open_repairs(
    crash_summary: Record,
) -> None:
    candidates = _repair_candidates()
    assert any(calls["truncate"] for _, _, calls in candidates)  # trailing leaks reclaimed
    assert any(calls["write"] > 4 for _, _, calls in candidates)  # copies and tables
    totals = FaultTotals()

    async def reference(data: bytes) -> bytes:
        img = await _open(data, None)
        assert (await check_image(img)).corruptions == 0
        return await img.read(0, img.size)

    async def go() -> None:
        for name, data, calls in candidates:
            expect = await reference(data)
            for fault in faults_for({IMG: calls}):
                totals.runs += 1
                totals.by_op[fault.op] += 1
                inner = CrashStore(data, name=IMG)
                store = FaultStore(inner)
                store.fail(fault.op, nth=fault.nth, errno=fault.errno, partial=fault.partial)
                exc: BaseException | None = None
                try:
                    header, area = await QedImage.read_header(store)
                    await open_qed(store, header, area, backing=None, readonly=False)
                except Exception as caught:  # judged below
                    exc = caught
                problems = _check_error(exc, fault)
                if not problems:
                    totals.clean_errors += 1
                states = [
                    ("after the failed open", bytes(inner.data)),
                    ("power loss right after it", inner.durable_state(inner.position)),
                ]
                for label, state in states:
                    totals.crash_states += 1
                    try:
                        img = await _open(state, None)
                        report = await check_image(img)
                        got = await img.read(0, img.size)
                    except QedError as bad:
                        totals.corrupt += 1
                        problems.append(f"{label}: the next open raised {bad}")
                        continue
                    if report.corruptions:
                        totals.corrupt += 1
                        problems.append(f"{label}: {report.corruptions} corruptions remain")
                    elif got != expect:
                        totals.lost += 1
                        why = first_bad_byte(got, [expect], 0)
                        problems.append(f"{label}: the repaired guest differs: {why}")
                if problems:
                    totals.add_failure(
                        f"[{name}] open-time repair with {fault.describe()}",
                        problems,
                    )

    run(go())
    summary = totals.line("open-time repair of a dirty image")
    crash_summary(summary)
    assert not totals.failures, summary + "\n\n" + "\n\n".join(totals.failures)
    assert totals.lost == 0 and totals.corrupt == 0 and totals.clean_errors == totals.runs


# =====================================================================================
# Part 2: the qed command against real errors
# =====================================================================================


def _qed_limited(limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``qed`` with RLIMIT_FSIZE = ``limit`` bytes: writes past it fail (EFBIG)."""

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "qedkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=set_limit,
    )


def _qed(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qedkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_clean_failure(result: subprocess.CompletedProcess[str], path: Path, what: str) -> None:
    report = f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode != 0, report
    assert "Traceback" not in result.stdout + result.stderr, report
    lines = [line for line in result.stderr.splitlines() if line.startswith("qed: ")]
    assert lines and all(line.startswith(f"qed: {path}: ") for line in lines), report
    assert any(what in line for line in lines), report
    assert len(lines) == len(result.stderr.splitlines()), report  # nothing but qed: lines


def _assert_no_corruption(qemu: Any, path: Path) -> None:
    result = qemu.img("check", "-f", "qed", path, check=False)
    assert result.returncode in (0, 3), f"qemu-img check: {result.stdout}{result.stderr}"


def _guest(path: Path) -> bytes:
    with qedkit.open(str(path), readonly=True) as img:
        return img.read(0, img.size)


def _io_write_fails(qemu: Any, path: Path, run_failing: Callable[..., Any], what: str) -> None:
    """Data written and flushed, then a large allocating write that fails, then a
    read in the same script; afterwards the image is consistent and usable."""
    created = _qed("create", "-f", "qed", path, "64M")
    assert created.returncode == 0, created.stderr
    first = _qed("io", "-c", "write -P 0xaa 0 128k", "-c", "flush", path)
    assert first.returncode == 0, first.stderr
    result = run_failing(
        "io",
        "-c",
        "write -P 0xbb 1M 4M",
        "-c",
        "read -P 0xaa 0 128k",
        "-c",
        "write -P 0xcc 64k 4k",  # in place: no new space needed
        path,
    )
    _assert_clean_failure(result, path, what)
    assert re.search(rf"qed: {re.escape(str(path))}: write at offset \d+ failed: ", result.stderr)
    # The script went on after the failure, as qemu-io's does.
    assert "read 131072/131072 bytes at offset 0" in result.stdout, result.stdout
    assert "wrote 4096/4096 bytes at offset 65536" in result.stdout, result.stdout
    _assert_no_corruption(qemu, path)
    guest = _guest(path)
    assert guest[: 64 * 1024] == b"\xaa" * 64 * 1024
    assert guest[64 * 1024 : 68 * 1024] == b"\xcc" * 4096
    assert guest[68 * 1024 : 128 * 1024] == b"\xaa" * 60 * 1024
    failed = guest[MiB : 5 * MiB]
    assert not failed.replace(b"\xbb", b"").replace(b"\0", b""), "the failed write reads junk"
    assert guest[5 * MiB :] == bytes(len(guest) - 5 * MiB)
    qemu.io("-r", "-c", "read -P 0xaa 0 64k", path)  # QEMU reads the same
    # Later operations work: reclaim the leaked space, then allocate again.
    reclaimed = _qed("check", "-r", "leaks", path)
    assert reclaimed.returncode == 0, reclaimed.stdout + reclaimed.stderr
    again = _qed("io", "-c", "write -P 0xdd 8M 64k", "-c", "read -P 0xdd 8M 64k", path)
    assert again.returncode == 0, again.stderr
    _assert_no_corruption(qemu, path)
    assert _guest(path)[: 64 * 1024] == b"\xaa" * 64 * 1024


def test_cli_io_write_past_the_file_size_limit(qemu: Any, tmp_path: Path) -> None:
    path = tmp_path / "img.qed"

    def limited(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return _qed_limited(path.stat().st_size + 100 * 1024, *args)

    _io_write_fails(qemu, path, limited, os.strerror(errno.EFBIG))


def _source_image(tmp_path: Path) -> Path:
    src = tmp_path / "src.qed"
    assert _qed("create", "-f", "qed", src, "8M").returncode == 0
    wrote = _qed("io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 1M", src)
    assert wrote.returncode == 0, wrote.stderr
    return src


def _convert_fails(
    qemu: Any, src: Path, dst: Path, fmt: str, result: subprocess.CompletedProcess[str], what: str
) -> None:
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    _assert_clean_failure(result, dst, what)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    _assert_no_corruption(qemu, src)
    if fmt == "qed" and dst.exists() and dst.stat().st_size:
        _assert_no_corruption(qemu, dst)
        # What made it into the target is the source's data: per cluster, the
        # source's bytes or zeros (not copied yet), nothing else.
        source, target = _guest(src), _guest(dst)
        unit = 64 * 1024
        for pos in range(0, len(source), unit):
            piece = target[pos : pos + unit]
            assert piece in (source[pos : pos + unit], bytes(len(piece))), f"cluster {pos:#x}"


@pytest.mark.parametrize("fmt", ["qed", "raw"])
def test_cli_convert_past_the_file_size_limit(qemu: Any, tmp_path: Path, fmt: str) -> None:
    src = _source_image(tmp_path)
    dst = tmp_path / f"dst.{fmt}"
    result = _qed_limited(MiB, "convert", "-O", fmt, src, dst)
    _convert_fails(qemu, src, dst, fmt, result, os.strerror(errno.EFBIG))


# ---- ENOSPC for real: a small tmpfs (root only; small_fs in tests/conftest.py) ------


def test_cli_io_write_on_a_full_file_system(qemu: Any, small_fs: Path) -> None:
    path = small_fs / "img.qed"
    _io_write_fails(qemu, path, _qed, os.strerror(errno.ENOSPC))


def test_cli_convert_onto_a_full_file_system(qemu: Any, tmp_path: Path, small_fs: Path) -> None:
    src = _source_image(tmp_path)
    dst = small_fs / "dst.qed"
    result = _qed("convert", "-O", "qed", src, dst)
    _convert_fails(qemu, src, dst, "qed", result, os.strerror(errno.ENOSPC))
