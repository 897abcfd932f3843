"""Shared machinery of the crash tests (imported as ``crashkit``; tests/crash is on
sys.path like tests/ is).

A :class:`Workload` drives the async QED engine on a :class:`CrashStore` while it
keeps a model of what the guest must read after each request (computed from the
request, not read back from the engine; only discard and a backing file change ask
the engine which clusters are allocated, because their effect depends on it). The
finished :class:`Scenario` is then crashed at chosen crash points (:func:`crash_all`)
and every resulting disk state is recovered as a user would (a read-write open,
which repairs a dirty image) and judged (:func:`verify_state`):

* a guest request is *durable* at crash point k when a store flush completed after it
  was acknowledged (``CrashStore.durable_at(op.end, k)``): it must read back exactly
  where no later request overwrote it; a byte that does not is a **lost write**;
* every byte of a request that was not durable but had started (issued at least one
  store op before k) may read old or new: per byte, the candidates are the last
  durable content and the content of each later started request covering it; a
  byte that is none of them is **corrupt**;
* header changes (resize, a new backing file) are *structural*: the recovered
  header must show the state before or after each started one, never anything else,
  and the one it shows decides whether that request happened (a grown image must
  then read zeros in the new range, whatever the backing file holds there);
* ``check_image`` after recovery finds no corruption, untouched ranges are still
  unallocated, the recovered image takes a new allocating write, and (for a sample
  of states) ``qemu-img check`` on the repaired file reports no corruption.

Scale: ``QEDKIT_CRASH_SCALE`` (default 1) multiplies the sampled crash points and
states and the length of the large random workloads (see README.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qedkit.engine.base import BlockImage, ExtentKind
from qedkit.engine.chain import open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.errors import QedError
from qedkit.format.header import Feature
from qedkit.store import CrashStore, MemoryStore

T = TypeVar("T")
KiB = 1 << 10
MiB = 1 << 20
CS = 4096  # cluster size of the engine crash tests: small clusters, few sectors per write
TABLE_SIZE = 2  # L2 tables of 1024 entries: one table maps 4 MiB
L2_SPAN = CS * (TABLE_SIZE * CS // 8)


def _scale() -> float:
    text = os.environ.get("QEDKIT_CRASH_SCALE", "1")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"QEDKIT_CRASH_SCALE={text!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"QEDKIT_CRASH_SCALE={text!r} must be positive")
    return value


SCALE = _scale()


def scaled(n: int) -> int:
    """``n`` multiplied by QEDKIT_CRASH_SCALE (at least 1)."""
    return max(1, round(n * SCALE))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pattern(seed: int, n: int) -> bytes:
    """``n`` pseudo-random non-zero bytes, different for each seed."""
    return random.Random(seed).randbytes(n).replace(b"\0", b"\x01")


def round_down(n: int, unit: int = CS) -> int:
    return n - n % unit


def round_up(n: int, unit: int = CS) -> int:
    return -(-n // unit) * unit


# =====================================================================================
# Workloads
# =====================================================================================


@dataclass(eq=False, repr=False)  # identity; and no repr of megabytes of data
class GuestOp:
    """One request of a workload and where its store ops sit in the crash log.

    ``data`` is what the guest reads in ``[offset, offset + length)`` right after the
    request (a resize: zeros in the new range; a backing change: the whole image as
    the new backing file shows it). ``size`` and ``backing`` are the guest size and
    backing file name after the request.
    """

    kind: str  # write, zero, discard, flush, resize, backing, cor (a copy-on-read fill)
    offset: int = 0
    length: int = 0
    data: bytes = b""
    start: int = 0  # log position before its first store op
    end: int = 0  # log position when it was acknowledged
    size: int = 0
    backing: str | None = None
    detail: str = ""
    # Cluster ranges the request took out of UNALLOCATED (allocated or made zero
    # clusters): if it is rolled back they show whatever backing file is there then.
    claimed: list[tuple[int, int]] = field(default_factory=list)

    @property
    def structural(self) -> bool:
        return self.kind in ("resize", "backing")

    @property
    def stop(self) -> int:
        return self.offset + self.length

    def __repr__(self) -> str:
        return f"<GuestOp {self.describe()}>"

    def describe(self) -> str:
        if self.kind == "flush":
            where = ""
        elif self.kind == "resize":
            where = f" {self.offset:#x} -> {self.size:#x}"
        elif self.kind == "backing":
            where = f" -> {self.backing!r}"
        else:
            where = f" {self.length} bytes at {self.offset:#x}"
        extra = f" {self.detail}" if self.detail else ""
        return f"{self.kind}{where}{extra} (store ops {self.start}..{self.end - 1})"


@dataclass(repr=False)
class Scenario:
    name: str
    initial: bytes  # the image file before the workload
    size: int  # guest size before the workload
    baseline: bytes  # what the guest reads before the workload (padded to max_size)
    backing: BlockImage | None  # the backing image before the workload
    ops: list[GuestOp]
    crash: CrashStore
    backing_name: str | None = None  # its name in the header
    backings: dict[str, bytes] = field(default_factory=dict)  # every raw backing file named
    max_size: int = 0
    touched: list[tuple[int, int]] = field(default_factory=list)
    last_base: tuple[tuple[int, ...], bytes] = ((-1,), b"")  # Expectation's cache

    def __repr__(self) -> str:
        return f"<Scenario {self.name}: {len(self.ops)} requests, {self.crash.position} store ops>"

    def backing_image(self, name: str | None) -> BlockImage | None:
        if name is None:
            return None
        return raw_backing(self.backings[name], name)


class Workload:
    """Builds a Scenario: each method runs one guest request on the live image,
    records where its store ops sit in the crash log and updates the model."""

    def __init__(
        self,
        name: str,
        img: QedImage,
        crash: CrashStore,
        initial: bytes,
        baseline: bytes,
        backing_name: str | None,
        backings: dict[str, bytes],
        *,
        verify: bool,
    ) -> None:
        self.name = name
        self.img = img
        self.crash = crash
        self.initial = initial
        self.size = img.size
        self.baseline = baseline
        self.initial_backing = img.backing
        self.backing_name = backing_name
        self.first_backing_name = backing_name
        self.backings = backings
        self.model = bytearray(baseline)
        self.ops: list[GuestOp] = []
        self.verify = verify

    @classmethod
    async def create(
        cls,
        name: str,
        size: int,
        *,
        backing: bytes | None = None,
        backing_name: str = "base.raw",
        other_backings: dict[str, bytes] | None = None,
        store_class: type[CrashStore] = CrashStore,
        prepare: Callable[[QedImage, MemoryStore], Awaitable[None]] | None = None,
        verify: bool = True,
    ) -> Workload:
        """A new image of ``size`` (over ``backing`` if given) opened read-write on a
        ``store_class``. ``prepare(img, store)``, if given, runs first on a plain
        MemoryStore (not logged): its result, closed cleanly, is the initial image."""
        backings = dict(other_backings or {})
        if backing is not None:
            backings[backing_name] = backing
        fmt = await new_qed(name, size, backing_name if backing is not None else None)

        def backing_image() -> BlockImage | None:
            return raw_backing(backing, backing_name)

        if prepare is not None:
            header, area = await QedImage.read_header(fmt)
            img = await open_qed(fmt, header, area, backing=backing_image(), readonly=False)
            await prepare(img, fmt)
            await img.close()
        initial = bytes(fmt.data)
        crash = store_class(initial, name=name)
        header, area = await QedImage.read_header(crash)
        img = await open_qed(crash, header, area, backing=backing_image(), readonly=False)
        baseline = await img.read(0, size)
        if prepare is None:
            expect = (backing or b"")[:size]
            assert baseline == expect + bytes(size - len(expect))
        return cls(
            name,
            img,
            crash,
            initial,
            baseline,
            backing_name if backing is not None else None,
            backings,
            verify=verify,
        )

    async def _unallocated(self, lo: int, hi: int) -> list[tuple[int, int]]:
        lo, hi = round_down(lo), min(self.img.size, round_up(hi))
        if lo >= hi:
            return []
        return [
            (e.start, e.end)
            for e in await self.img.block_status(lo, hi - lo)
            if e.kind is ExtentKind.UNALLOCATED
        ]

    async def _run(self, op: GuestOp, coro: Coroutine[Any, Any, None]) -> GuestOp:
        track = op.kind in ("write", "zero", "cor", "backing")
        before = await self._unallocated(op.offset, op.stop) if track else []
        op.start = self.crash.position
        await coro
        op.end = self.crash.position
        await self._record(op, before)
        return op

    async def _record(self, op: GuestOp, before: list[tuple[int, int]]) -> None:
        """Log a finished request: the pieces it claimed (unallocated ``before``,
        allocated now), and the image size and backing name after it."""
        if before:
            still = await self._unallocated(op.offset, op.stop)
            op.claimed = [piece for a, b in before for piece in _subtract(a, b, still)]
        op.size = self.img.size
        op.backing = self.backing_name
        self.ops.append(op)

    async def _check_model(self, lo: int, hi: int) -> None:
        if not self.verify:
            return
        lo, hi = max(0, round_down(lo)), min(self.img.size, round_up(hi))
        got = await self.img.read(lo, hi - lo)
        if got != self.model[lo:hi]:
            bad = next(i for i in range(hi - lo) if got[i] != self.model[lo + i])
            raise AssertionError(
                f"[{self.name}] without any crash, guest byte {lo + bad:#x} reads "
                f"{got[bad]:#04x}, expected {self.model[lo + bad]:#04x} after "
                f"{self.ops[-1].describe()}"
            )

    async def write(self, offset: int, data: bytes) -> GuestOp:
        op = await self._run(
            GuestOp("write", offset, len(data), data), self.img.write(offset, data)
        )
        self.model[offset : offset + len(data)] = data
        await self._check_model(offset, offset + len(data))
        return op

    async def write_now(self, offset: int, data: bytes) -> GuestOp:
        """A write as the NBD server's fast path makes it: ``write_now`` (in place,
        or a synchronous allocation), else the general path."""

        async def go() -> None:
            if not self.img.write_now(offset, data):
                await self.img.write(offset, data)

        op = await self._run(GuestOp("write", offset, len(data), data, detail="now"), go())
        self.model[offset : offset + len(data)] = data
        await self._check_model(offset, offset + len(data))
        return op

    async def write_batch(
        self, writes: list[tuple[int, bytes]], *, now: bool = False
    ) -> list[GuestOp]:
        """Writes handed to the engine together (``write_batch``, the NBD server's
        gathered writes): one request each, all started with the first store op of
        the batch and acknowledged at its end. ``now``: as the server hands a
        chunk's writes over, the first ones at once (``write_batch_now``: in place,
        or group commits of synchronous allocations; detail "batch-now"), the rest
        through ``write_batch`` ("batch-general")."""
        ops = [GuestOp("write", o, len(d), d, detail="batch") for o, d in writes]
        before = [await self._unallocated(op.offset, op.stop) for op in ops]
        start = self.crash.position
        done = 0
        if now:
            done = self.img.write_batch_now(writes)
            for k, op in enumerate(ops):
                op.detail = "batch-now" if k < done else "batch-general"
        results = await self.img.write_batch(writes[done:]) if done < len(writes) else []
        end = self.crash.position
        assert results == [None] * (len(writes) - done), results
        for op, was in zip(ops, before, strict=True):
            op.start, op.end = start, end
            await self._record(op, was)
            self.model[op.offset : op.stop] = op.data
        for op in ops:
            await self._check_model(op.offset, op.stop)
        return ops

    async def zero(self, offset: int, length: int, *, unmap: bool = False) -> GuestOp:
        op = await self._run(
            GuestOp("zero", offset, length, bytes(length), detail="unmap" if unmap else ""),
            self.img.write_zeroes(offset, length, unmap=unmap),
        )
        self.model[offset : offset + length] = bytes(length)
        await self._check_model(offset, offset + length)
        return op

    async def discard(self, offset: int, length: int) -> GuestOp:
        """Whole allocated clusters of the range read zeros afterwards; the rest of
        the range is left alone (DESIGN.md, "Zero clusters, write-zeroes, discard")."""
        a, b = round_up(offset), round_down(offset + length)
        if a < b:
            for ext in await self.img.block_status(a, b - a):
                if ext.kind is ExtentKind.DATA:
                    self.model[ext.start : ext.end] = bytes(ext.length)
        op = await self._run(
            GuestOp("discard", offset, length, bytes(self.model[offset : offset + length])),
            self.img.discard(offset, length),
        )
        await self._check_model(offset, offset + length)
        return op

    async def flush(self) -> GuestOp:
        return await self._run(GuestOp("flush"), self.img.flush())

    async def resize(self, new_size: int) -> GuestOp:
        """Grow: the new range reads zeros, whatever the backing file holds there."""
        old = self.img.size
        self.model.extend(bytes(new_size - old))
        op = await self._run(
            GuestOp("resize", old, new_size - old, bytes(new_size - old)),
            self.img.resize(new_size),
        )
        await self._check_model(round_down(old), new_size)
        return op

    async def set_backing(self, name: str | None) -> GuestOp:
        """Change the backing file (rebase -u): unallocated clusters now show the new
        backing file (zeros past its end, zeros everywhere without one)."""
        size = self.img.size
        data = self.backings[name] if name is not None else b""
        for ext in await self.img.block_status(0, size):
            if ext.kind is ExtentKind.UNALLOCATED:
                piece = data[ext.start : ext.end]
                self.model[ext.start : ext.end] = piece + bytes(ext.length - len(piece))

        async def change() -> None:
            await self.img.set_backing_file(name, raw=True)
            self.backing_name = name
            old = self.img.backing
            self.img.backing = (
                RawImage(MemoryStore(data, name=name, writable=False), len(data))
                if name is not None
                else None
            )
            if old is not None:
                await old.close()

        op = await self._run(GuestOp("backing", 0, size, bytes(self.model[:size])), change())
        await self._check_model(0, size)
        return op

    async def cor_read(self, offset: int, length: int) -> GuestOp:
        """A read with copy-on-read: the clusters it touches that read from the backing
        file are copied in (the guest's view does not change)."""
        self.img.copy_on_read = True
        try:
            op = await self._run(
                GuestOp("cor", offset, length, bytes(self.model[offset : offset + length])),
                self._read_expecting(offset, length),
            )
        finally:
            self.img.copy_on_read = False
        await self._check_model(offset, offset + length)
        return op

    async def _read_expecting(self, offset: int, length: int) -> None:
        got = await self.img.read(offset, length)
        if self.verify and got != self.model[offset : offset + length]:
            raise AssertionError(f"[{self.name}] a copy-on-read read at {offset:#x} differs")

    async def stream(
        self, streamer: Any, checkpoint: Callable[[int, int], Awaitable[None]] | None = None
    ) -> GuestOp:
        """Run a ``jobs.stream.Streamer`` over the image: fills (the guest's view does
        not change), then the backing link dropped. ``checkpoint`` may run guest
        requests between the steps (they are recorded as requests of their own). A
        run stopped by its checkpoint (JobCancelled) is a fill without a header
        change (kind "cor"), else the header change makes it a backing change."""
        size = self.img.size
        op = GuestOp("backing", 0, size, detail="stream")
        stopped = False

        async def go() -> None:
            nonlocal stopped
            from qedkit.jobs.base import JobCancelled

            try:
                await streamer.run(checkpoint=checkpoint)
            except JobCancelled:
                stopped = True
            self.backing_name = self.img.backing_filename

        await self._run(op, go())
        op.data = bytes(self.model[:size])  # after the requests the checkpoint made
        if stopped:
            op.kind, op.detail = "cor", "stream, stopped"
        await self._check_model(0, size)
        return op

    def scenario(self) -> Scenario:
        """The finished scenario. No close: the power goes out after the last request."""
        max_size = len(self.model)
        baseline = self.baseline + bytes(max_size - len(self.baseline))
        spans = sorted(
            (round_down(op.offset), round_up(op.stop))
            for op in self.ops
            if op.kind != "flush" and op.length
        )
        return Scenario(
            self.name,
            self.initial,
            self.size,
            baseline,
            self.initial_backing,
            self.ops,
            self.crash,
            backing_name=self.first_backing_name,
            backings=self.backings,
            max_size=max_size,
            touched=merge_ranges(spans),
        )


async def new_qed(name: str, size: int, backing_name: str | None = None) -> MemoryStore:
    """A new QED image of ``size`` (CS clusters, TABLE_SIZE tables) in a MemoryStore
    ``name``, over the raw backing file ``backing_name`` if given (recorded as raw)."""
    store = MemoryStore(name=name)
    await QedImage.format_store(
        store,
        size,
        cluster_size=CS,
        table_size=TABLE_SIZE,
        backing_name=backing_name,
        backing_raw=True,
    )
    return store


def raw_backing(data: bytes | None, name: str) -> RawImage | None:
    """``data`` as a read-only raw image named ``name`` (a backing file); None for None."""
    if data is None:
        return None
    return RawImage(MemoryStore(data, name=name, writable=False), len(data))


def merge_ranges(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def touched_ranges(sc: Scenario) -> list[tuple[int, int]]:
    """Cluster-rounded ranges the workload touches, merged."""
    return sc.touched


# ---- the workloads of test_harness.py ----------------------------------------------


def fresh_image_workload() -> Scenario:
    """No backing file: NEED_CHECK protects the allocations."""

    async def build() -> Scenario:
        w = await Workload.create("fresh.qed", 5 * MiB)
        await w.write(0, pattern(1, 6000))  # allocating, new L2 table
        await w.write(3 * CS, pattern(2, CS))  # allocating into the existing L2
        await w.write(1000, pattern(3, 100))  # in place
        await w.flush()
        await w.write(4 * MiB + 512, pattern(4, 1024))  # a second L2 table
        await w.zero(5 * CS, 2 * CS)  # whole unallocated clusters: zero clusters
        await w.zero(512, 1024)  # partial, allocated: zeros in place
        await w.write(5 * CS + 100, pattern(5, 200))  # into a zero cluster
        await w.write(CS + 2000, pattern(6, CS))  # allocated cluster 1 + new cluster 2
        await w.flush()  # clears NEED_CHECK: the next allocation sets it again
        await w.write(4 * MiB - 1000, pattern(7, 3000))  # across the two L2 tables
        await w.discard(3 * CS, CS)  # punches cluster 3
        return w.scenario()

    return run(build())


def backing_file_workload(store_class: type[CrashStore] = CrashStore) -> Scenario:
    """A raw backing file: copy-on-write, and the flush before every L2 update."""
    size = 1 * MiB

    async def build() -> Scenario:
        w = await Workload.create(
            "overlay.qed", size, backing=pattern(99, size), store_class=store_class
        )
        await w.write(CS + 100, pattern(11, 200))  # partial cluster over backing data
        await w.write(2 * CS + 3000, pattern(12, 2000))  # two partial clusters
        await w.write(CS + 500, pattern(13, 10))  # in place
        await w.flush()
        await w.zero(5 * CS, CS)  # unallocated whole cluster: zero cluster
        await w.zero(6 * CS + 100, 300)  # partial over backing: allocating zeros
        await w.write(5 * CS + 1000, pattern(14, 100))  # into a zero cluster: zero fill
        await w.zero(2 * CS + 3500, 100)  # partial, allocated: zeros in place
        await w.write(8 * CS, pattern(15, 2 * CS))  # whole clusters over backing
        await w.discard(8 * CS, CS)
        return w.scenario()

    return run(build())


# =====================================================================================
# Judging one crash state
# =====================================================================================


@dataclass
class Totals:
    states: int = 0
    crash_points: int = 0
    dirty_states: int = 0  # NEED_CHECK set: recovery repaired the image
    entries_repaired: int = 0  # corruptions found (and fixed) by that repair
    lost: int = 0  # (state, durable request) pairs not read back: must be 0
    corrupt: int = 0  # states with corruption or impossible content: must be 0
    corruptions: int = 0  # found by check_image AFTER recovery: must be 0
    rolled_back: int = 0  # (state, acknowledged unflushed request) not read back: allowed
    qemu_checks: int = 0  # qemu-img check runs on repaired images
    qemu_corrupt: int = 0  # ... that reported corruption: must be 0
    failing_states: int = 0
    failures: list[str] = field(default_factory=list)  # reports of the first few

    @property
    def lost_writes(self) -> int:  # the name test_harness.py used first
        return self.rolled_back

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.states} states at {self.crash_points} crash points, "
            f"{self.lost} lost, {self.corrupt} corrupt, {self.qemu_checks} qemu-img checks "
            f"({self.qemu_corrupt} corrupt); {self.dirty_states} dirty states repaired "
            f"({self.entries_repaired} entries), {self.rolled_back} unflushed requests "
            f"rolled back (allowed), {self.failing_states} failing states"
        )

    @property
    def ok(self) -> bool:
        return not (self.lost or self.corrupt or self.qemu_corrupt or self.failing_states)


def _subtract(lo: int, hi: int, cover: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[lo, hi)`` minus the union of ``cover``."""
    pieces = [(lo, hi)]
    for a, b in cover:
        nxt = []
        for x, y in pieces:
            if b <= x or y <= a:
                nxt.append((x, y))
                continue
            if x < a:
                nxt.append((x, a))
            if b < y:
                nxt.append((b, y))
        pieces = nxt
        if not pieces:
            break
    return pieces


class Expectation:
    """What the guest may read at crash point ``k``, given the size and backing file
    the recovered header shows (see the module docstring). ``problem`` is set when
    that header state is impossible."""

    def __init__(
        self, sc: Scenario, k: int, size: int | None = None, backing: str | None = None
    ) -> None:
        self.sc = sc
        self.k = k
        crash = sc.crash
        data_ops = [op for op in sc.ops if op.kind != "flush"]
        self.durable = [op for op in data_ops if crash.durable_at(op.end, k)]
        durable = {id(op) for op in self.durable}
        started = [op for op in data_ops if id(op) not in durable and op.start < k]
        started_ids = {id(op) for op in started}
        self.problem: str | None = None
        forced: list[GuestOp] = []
        dropped: list[GuestOp] = []
        if size is not None:
            # Header states in order: before the workload, after each structural op.
            states: list[tuple[tuple[int, str | None], GuestOp | None]] = [
                ((sc.size, sc.backing_name), None)
            ]
            states += [((op.size, op.backing), op) for op in sc.ops if op.structural]
            last_durable = max(
                (i for i, (_, op) in enumerate(states) if op is not None and id(op) in durable),
                default=0,
            )
            allowed = [last_durable] + [
                i for i, (_, op) in enumerate(states) if op is not None and id(op) in started_ids
            ]
            match = [i for i in allowed if states[i][0] == (size, backing)]
            if not match:
                shown = ", ".join(
                    f"size {s:#x} backing {b!r}" for (s, b), _ in (states[i] for i in allowed)
                )
                self.problem = (
                    f"recovered header shows size {size:#x} and backing file {backing!r}; "
                    f"possible: {shown}"
                )
            else:
                j = max(match)
                for i, (_, op) in enumerate(states):
                    if op is not None and id(op) in started_ids:
                        (forced if i <= j else dropped).append(op)
        forced_ids = {id(op) for op in forced}
        skip = forced_ids | {id(op) for op in dropped}
        self.guaranteed = [op for op in data_ops if id(op) in durable or id(op) in forced_ids]
        self.maybe = [op for op in started if id(op) not in skip]
        self.acknowledged = [op for op in self.maybe if op.end <= k]
        # A backing file change that persisted while an earlier unflushed request was
        # rolled back: the clusters that request took out of UNALLOCATED show the
        # new backing file (the outcome "the change happened, the request did not").
        self.alternatives: list[GuestOp] = []
        for b in forced:
            if b.kind != "backing":
                continue
            view = sc.backings[b.backing] if b.backing is not None else b""
            for m in self.maybe:
                if m.start >= b.start:
                    continue
                for lo, hi in m.claimed:
                    hi = min(hi, b.size)
                    piece = view[lo:hi]
                    self.alternatives.append(
                        GuestOp(
                            "rolled-back",
                            lo,
                            hi - lo,
                            piece + bytes(hi - lo - len(piece)),
                            m.start,
                            m.end,
                            detail=f"clusters of [{m.describe()}] over {b.backing!r}",
                        )
                    )
        key = tuple(id(op) for op in self.guaranteed)
        if sc.last_base[0] != key:  # consecutive crash points often share it
            base = bytearray(sc.baseline)
            for op in self.guaranteed:
                base[op.offset : op.stop] = op.data
            sc.last_base = (key, bytes(base))
        self.base = sc.last_base[1]
        self._order = {id(op): i for i, op in enumerate(self.guaranteed)}

    def mismatch(self, got: bytes, lo: int, hi: int) -> str | None:
        """None if ``got`` (guest bytes ``[lo, hi)``) is possible, else why not."""
        if got == self.base[lo:hi]:
            return None
        # Candidates are constant between request boundaries; the engine maps whole
        # clusters and the disk persists whole sectors, so try those pieces first.
        cuts = {lo, hi, *range(lo - lo % CS + CS, hi, CS)}
        near = [op for op in self.maybe + self.alternatives if op.offset < hi and lo < op.stop]
        for op in near:
            for c in (op.offset, op.stop):
                if lo < c < hi:
                    cuts.add(c)
        bounds = sorted(cuts)
        for a, b in itertools.pairwise(bounds):
            if got[a - lo : b - lo] == self.base[a:b]:
                continue
            covering = [op for op in near if op.offset <= a and b <= op.stop]
            options = [self.base[a:b]] + [op.data[a - op.offset : b - op.offset] for op in covering]
            if got[a - lo : b - lo] in options:
                continue
            sa = a
            while sa < b:  # per sector, then per byte
                sb = min(b, sa - sa % 512 + 512)
                if got[sa - lo : sb - lo] not in [opt[sa - a : sb - a] for opt in options]:
                    for i in range(sa, sb):
                        value = got[i - lo]
                        if all(opt[i - a] != value for opt in options):
                            return self._explain(i, value, covering)
                sa = sb
        return None

    def lost_ops(self, got: bytes, lo: int, hi: int) -> list[GuestOp]:
        """Durable requests overlapping ``[lo, hi)`` that do not read back where no
        later request may have overwritten them."""
        lost = []
        for op in self.durable:
            if op.stop <= lo or hi <= op.offset:
                continue
            later = [
                (o.offset, o.stop)
                for o in self.guaranteed[self._order[id(op)] + 1 :] + self.maybe + self.alternatives
            ]
            for a, b in _subtract(max(lo, op.offset), min(hi, op.stop), later):
                if got[a - lo : b - lo] != op.data[a - op.offset : b - op.offset]:
                    lost.append(op)
                    break
        return lost

    def _explain(self, i: int, value: int, covering: list[GuestOp]) -> str:
        names = ", ".join(op.describe() for op in covering) or "none"
        news = "".join(f", {op.kind} {op.data[i - op.offset]:#04x}" for op in covering)
        return (
            f"guest byte {i:#x} reads {value:#04x}; possible: old {self.base[i]:#04x}{news} "
            f"(unflushed requests covering it: {names})"
        )


class QemuChecker:
    """Runs ``qemu-img check`` on repaired images: every ``every``-th distinct image
    offered (the first one included). The backing files sit next to the image."""

    def __init__(self, qemu: Any, directory: Path, sc: Scenario, every: int = 1) -> None:
        self.qemu = qemu
        self.directory = directory
        self.every = max(1, every)
        self.path = directory / sc.name
        self.seen: set[bytes] = set()
        self.offered = 0
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in sc.backings.items():
            (directory / name).write_bytes(data)

    def offer(self, image: bytes, totals: Totals) -> str | None:
        digest = hashlib.blake2b(image, digest_size=16).digest()
        if digest in self.seen:
            return None
        self.seen.add(digest)
        self.offered += 1
        if (self.offered - 1) % self.every:
            return None
        self.path.write_bytes(image)
        result = self.qemu.img("check", "-f", "qed", self.path, check=False)
        totals.qemu_checks += 1
        if result.returncode in (0, 3):  # clean, or leaks only (allowed after a crash)
            return None
        totals.qemu_corrupt += 1
        keep = self.directory / f"failed-{totals.qemu_corrupt}-{self.path.name}"
        keep.write_bytes(image)
        return (
            f"qemu-img check exited {result.returncode} (image kept as {keep}): "
            f"{result.stdout.strip()} {result.stderr.strip()}"
        )


async def verify_state(
    sc: Scenario,
    k: int,
    state_bytes: bytes,
    totals: Totals,
    checker: QemuChecker | None = None,
    expectations: dict[tuple[int, int, str | None], Expectation] | None = None,
    reread: bool = True,
) -> list[str]:
    """Recover one crash state as a user would and return what is wrong with it.
    ``expectations`` caches the Expectation of each (crash point, header state);
    ``reread`` re-reads every touched range after the post-recovery write (a check
    runs after that write in any case)."""
    try:
        return await _verify_state(sc, k, state_bytes, totals, checker, expectations, reread)
    except QedError as exc:
        totals.corrupt += 1
        return [f"recovery raised {type(exc).__name__}: {exc}"]


async def _verify_state(
    sc: Scenario,
    k: int,
    state_bytes: bytes,
    totals: Totals,
    checker: QemuChecker | None,
    expectations: dict[tuple[int, int, str | None], Expectation] | None,
    reread: bool,
) -> list[str]:
    problems: list[str] = []
    # What a read-only check sees before any repair (for the totals).
    ro = MemoryStore(state_bytes, writable=False)
    header, area = await QedImage.read_header(ro)
    name = header.backing_filename(area)
    if name is not None and (
        name not in sc.backings or not header.has(Feature.BACKING_FORMAT_NO_PROBE)
    ):
        totals.corrupt += 1
        raw = header.has(Feature.BACKING_FORMAT_NO_PROBE)
        return [
            f"recovered header names backing file {name!r} (raw flag {raw}); the workload "
            f"only used raw backing files {sorted(sc.backings)}"
        ]
    if header.needs_check:
        totals.dirty_states += 1
        img_ro = await open_qed(ro, header, area, backing=sc.backing_image(name), readonly=True)
        totals.entries_repaired += (await check_image(img_ro)).corruptions
    # The real recovery: a read-write open repairs a dirty image.
    store = MemoryStore(state_bytes, name=sc.name)
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=sc.backing_image(name), readonly=False)
    report = await check_image(img)
    if report.corruptions or report.check_errors:
        totals.corruptions += report.corruptions
        totals.corrupt += 1
        problems.append(
            f"check after recovery: {report.corruptions} corruptions, "
            f"{report.check_errors} check errors: "
            + "; ".join(p.message for p in report.problems if p.kind != "leak")
        )
        return problems  # reading would only repeat it
    if img.header.needs_check:
        problems.append("NEED_CHECK still set after the recovering open")
    key = (k, img.size, name)
    exp = expectations.get(key) if expectations is not None else None
    if exp is None:
        exp = Expectation(sc, k, img.size, name)
        if expectations is not None:
            expectations[key] = exp
    if exp.problem:
        totals.corrupt += 1
        return [*problems, exp.problem]
    if checker is not None:
        why = checker.offer(bytes(store.data), totals)
        if why:
            problems.append(why)
    size = img.size
    touched = [(a, min(b, size)) for a, b in sc.touched if a < size]
    contents = []
    bad_content = False
    for a, b in touched:
        got = await img.read(a, b - a)
        contents.append(got)
        why = exp.mismatch(got, a, b)
        if why:
            bad_content = True
            problems.append(why)
            lost = exp.lost_ops(got, a, b)
            totals.lost += len(lost)
            problems += [f"lost durable request: {op.describe()}" for op in lost]
    if bad_content:
        totals.corrupt += 1
    pos = 0
    for a, b in [*touched, (size, size)]:
        if a > pos:
            for ext in await img.block_status(pos, a - pos):
                if ext.kind is not ExtentKind.UNALLOCATED:
                    problems.append(f"untouched range {ext.start:#x}+{ext.length:#x} is {ext.kind}")
        pos = max(pos, b)
    for op in exp.acknowledged:
        if await img.read(op.offset, op.length) != op.data:
            later = [o for o in exp.maybe if o.start >= op.end]
            if not any(o.offset < op.stop and op.offset < o.stop for o in later):
                totals.rolled_back += 1
    # The recovered image keeps working: a new allocation lands on no live cluster.
    new_at = size - CS
    new = b"N" * 700
    await img.write(new_at, new)
    await img.flush()
    after = await check_image(img)
    if after.corruptions or await img.read(new_at, 700) != new:
        problems.append(f"after a new write the image has {after.corruptions} corruptions")
    for (a, b), before in zip(touched, contents, strict=True):
        if not reread:
            break
        expect = bytearray(before)
        lo, hi = max(a, new_at), min(b, new_at + len(new))
        if lo < hi:
            expect[lo - a : hi - a] = new[lo - new_at : hi - new_at]
        if await img.read(a, b - a) != expect:
            problems.append(f"a write after recovery changed guest range {a:#x}..{b:#x}")
    return problems


def sample_points(crash: CrashStore, count: int | None, seed: int = 0) -> list[int]:
    """Crash points to try: all of them when ``count`` is None or covers them,
    else ``count`` of them chosen with a fixed seed (the last one always included)."""
    n = crash.crash_points()
    if count is None or count >= n + 1:
        return list(range(n + 1))
    chosen = set(random.Random(seed).sample(range(n), count - 1))
    return sorted(chosen | {n})


def crash_all(
    sc: Scenario,
    *,
    torn: bool,
    max_states: int | None = None,
    points: list[int] | None = None,
    checker: QemuChecker | None = None,
) -> Totals:
    """Recover and judge every state of every crash point in ``points`` (all by
    default); ``max_states`` caps the states of one crash point."""
    totals = Totals()
    crash = sc.crash
    todo = list(range(crash.crash_points() + 1)) if points is None else points
    sampled = points is not None

    async def go() -> None:
        for k in todo:
            totals.crash_points += 1
            expectations: dict[tuple[int, int, str | None], Expectation] = {}
            for state in crash.scenarios(k, torn=torn, max_states=max_states):
                totals.states += 1
                problems = await verify_state(
                    sc, k, state.data, totals, checker, expectations, totals.states % 4 == 1
                )
                if problems:
                    totals.failing_states += 1
                    if len(totals.failures) < 5:
                        totals.failures.append(report(sc, k, state.describe(), problems))
            if sampled:
                # Replays are cached per log position; sampled runs over a long log
                # would keep a copy of the file for every position tried.
                cache = getattr(crash, "_snapshots", None)
                if isinstance(cache, dict):
                    keep = {0, crash.last_flush_before(k)}
                    for p in [p for p in cache if p not in keep]:
                        del cache[p]

    run(go())
    return totals


def assert_totals(totals: Totals, summary: str, *, clean_after: bool = False) -> None:
    """The verdict of a sweep: more states than crash points, no failing state, none
    lost or corrupt; ``clean_after``: also no corruption found by ``check_image`` or
    ``qemu-img check`` after recovery."""
    assert totals.states > totals.crash_points, summary
    assert not totals.failures, summary + "\n\n" + "\n\n".join(totals.failures)
    assert totals.ok and totals.lost == 0 and totals.corrupt == 0, summary
    if clean_after:
        assert totals.corruptions == 0 and totals.qemu_corrupt == 0, summary


def final_image(sc: Scenario) -> QedImage:
    """The workload's final image (every write persisted), opened read-only over the
    backing image its header names."""

    async def go() -> QedImage:
        store = MemoryStore(bytes(sc.crash.data), writable=False)
        header, area = await QedImage.read_header(store)
        name = header.backing_filename(area)
        return await open_qed(store, header, area, backing=sc.backing_image(name), readonly=True)

    return run(go())


def report(sc: Scenario, k: int, state: str, problems: list[str]) -> str:
    crash = sc.crash
    p = crash.last_flush_before(k)
    lines = [f"[{sc.name}] {state}", *("  " + p_ for p_ in problems)]
    around = [op for op in sc.ops if op.end >= p - 1 and op.start <= k + 1]
    lines.append(f"  guest requests around the crash point ({len(sc.ops)} in all):")
    lines += [f"    {op.describe()}" for op in (sc.ops if len(sc.ops) <= 40 else around)]
    lines.append("  store ops from the last flush to the crash point:")
    lines += [f"    {line}" for line in crash.describe_ops(max(0, p - 1), k).splitlines()]
    return "\n".join(lines)
