"""The crash-simulation and fault-injection stores, and the first engine crash tests.

Part 1 tests the harness itself (qedkit/store/crash.py, qedkit/store/faults.py).
Part 2 runs small workloads through the async QED engine on a CrashStore and, for
every crash point and every possible disk state there, recovers the image the way a
user would (a read-write open, which repairs when NEED_CHECK is set), checks it, and
compares what the guest reads with what may legitimately be there (the rules and
the machinery are in crashkit.py, shared with test_workloads.py).

Totals are printed (run with ``-s`` to see them) and collected in the terminal
summary (conftest.py).
"""

from __future__ import annotations

import errno
import importlib.util
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    CS,
    MiB,
    Scenario,
    Totals,
    backing_file_workload,
    crash_all,
    fresh_image_workload,
    pattern,
    run,
    touched_ranges,
)

from qedkit.engine.chain import open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.errors import StoreError
from qedkit.format.header import Feature
from qedkit.store import ByteStore, CrashStore, FaultStore, MemoryStore

# =====================================================================================
# Part 1: the harness
# =====================================================================================

# The store contract suite (tests/unit/test_store_conformance.py) runs on both new
# stores too. It is loaded by path because tests/ is not a package.
_contract_path = Path(__file__).parents[1] / "unit" / "test_store_conformance.py"
_spec = importlib.util.spec_from_file_location("_qedkit_store_contract", _contract_path)
assert _spec is not None and _spec.loader is not None
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
StoreContract: type = _contract.StoreContract


class TestCrashStoreContract(StoreContract):  # type: ignore[misc]
    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        if not writable:
            return MemoryStore(data, writable=False)  # a CrashStore is always writable
        return CrashStore(data)


class TestFaultStoreContract(StoreContract):  # type: ignore[misc]
    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        return FaultStore(MemoryStore(data, writable=writable))


def _log(store: CrashStore, *calls: tuple[str, Any]) -> None:
    async def go() -> None:
        for name, args in calls:
            await getattr(store, name)(*args)

    run(go())


def test_durable_state_after_a_flush_holds_every_flushed_write() -> None:
    store = CrashStore(b"\0" * 4096)
    _log(
        store,
        ("write", (0, b"a" * 100)),
        ("writev", (1000, [b"b" * 50, b"c" * 50])),
        ("flush", ()),
        ("write", (2000, b"d" * 10)),
    )
    assert store.crash_points() == 4
    assert [op.kind for op in store.ops] == ["write", "write", "flush", "write"]
    assert store.ops[1].data == b"b" * 50 + b"c" * 50 and store.ops[1].source == "writev"
    assert store.last_flush_before(0) == 0
    assert store.last_flush_before(2) == 0
    assert store.last_flush_before(3) == 3
    assert store.last_flush_before(4) == 3
    expected = bytearray(4096)
    expected[0:100] = b"a" * 100
    expected[1000:1100] = b"b" * 50 + b"c" * 50
    for k in (3, 4):
        assert store.durable_state(k) == bytes(expected)
        # Every possible state holds the flushed writes.
        for state in store.states(k, torn=True):
            assert state[0:100] == b"a" * 100 and state[1000:1100] == expected[1000:1100]
    assert store.durable_state(2) == bytes(4096)
    assert store.is_durable(0, 3) and store.is_durable(1, 4) and not store.is_durable(3, 4)
    assert not store.is_durable(0, 2)
    # Reads see everything, flushed or not.
    assert run(store.read(2000, 10)) == b"d" * 10


def test_states_are_every_subset_of_the_unflushed_writes_in_log_order() -> None:
    store = CrashStore(bytes(64))
    _log(
        store,
        ("write", (0, b"x" * 8)),
        ("flush", ()),
        ("write", (10, b"A" * 4)),
        ("write", (20, b"B" * 4)),
        ("write", (12, b"C" * 10)),  # overlaps both earlier ones
    )
    base = bytearray(64)
    base[0:8] = b"x" * 8
    got = list(store.scenarios(5))
    assert len(got) == 8
    seen = set()
    for state in got:
        expect = bytearray(base)
        for op in sorted(state.persisted_ops):  # log order: later wins
            o = store.ops[op]
            expect[o.offset : o.end] = o.data
        assert state.data == bytes(expect), state.describe()
        seen.add(state.persisted_ops)
    assert len(seen) == 8  # 2**3 distinct subsets
    # The tail of crash point 3 is one write: two states.
    assert sorted(s[10:14] for s in store.states(3)) == [bytes(4), b"A" * 4]
    assert list(store.states(2)) == [bytes(base)]  # just after the flush
    assert sorted(store.states(1)) == [bytes(64), bytes(base)]
    assert list(store.states(0)) == [bytes(64)]
    with pytest.raises(ValueError):
        next(store.states(6))


def test_torn_writes_give_sector_mixtures_only() -> None:
    old = bytes([0xEE]) * 8192
    store = CrashStore(old)
    new = pattern(1, 2048 + 300)
    _log(store, ("write", (1024 + 100, new)))  # not sector aligned: 5 sector pieces
    assert [(u.start, u.end) for u in store.units(1, torn=True)] == [
        (1124, 1536),
        (1536, 2048),
        (2048, 2560),
        (2560, 3072),
        (3072, 3472),
    ]
    final = bytearray(old)
    final[1124 : 1124 + len(new)] = new
    mixtures = set()
    for state in store.states(1, torn=True):
        assert len(state) == 8192
        key = []
        for sector in range(0, 8192, 512):
            piece = state[sector : sector + 512]
            is_old, is_new = (
                piece == old[sector : sector + 512],
                piece == final[sector : sector + 512],
            )
            assert is_old or is_new, f"sector {sector} mixes bytes"
            key.append(is_new and not is_old)
        mixtures.add(tuple(key))
    assert len(mixtures) == 32  # every combination of the 5 touched sectors


def test_size_changes_persist_with_their_writes_and_truncates() -> None:
    store = CrashStore(b"h" * 1000)
    _log(
        store,
        ("write", (2000, b"e" * 24)),  # extends to 2024
        ("truncate", (500,)),
        ("write_zeroes", (0, 100)),
    )
    op0, op1, op2 = store.ops
    assert op0.extends and op1.kind == "truncate" and op2.source == "write_zeroes"
    sizes = {}
    for state in store.scenarios(3):
        sizes[state.persisted_ops] = len(state.data)
    assert sizes[frozenset()] == 1000  # the extension was lost: the file is shorter
    assert sizes[frozenset({0})] == 2024
    assert sizes[frozenset({1})] == 500
    assert sizes[frozenset({0, 1})] == 500  # truncate after the write wins
    # Torn: the size of an extending write is a unit of its own.
    torn = list(store.scenarios(1, torn=True))
    assert {len(s.data) for s in torn} == {1000, 2024}
    size_only = [s for s in torn if any(u.size_only for u in s.units) and len(s.units) == 1]
    assert size_only and size_only[0].data == b"h" * 1000 + bytes(1024)


def test_write_zeroes_punch_and_discard_never_extend_the_file() -> None:
    store = CrashStore(b"\xff" * 4096)
    _log(
        store,
        (
            "write_zeroes",
            (
                4000,
                1000,
            ),
        ),
    )
    assert run(store.size()) == 5000
    run(store.truncate(4096))
    run(store.write_zeroes(4000, 1000, punch=True))
    run(store.discard(0, 100_000))
    assert run(store.size()) == 4096
    assert store.ops[-2].end == 4096 and store.ops[-1].end == 4096
    assert store.ops[-1].source == "discard" and not any(store.ops[-1].data)
    # The discard may or may not have happened.
    assert {s[:10] for s in store.states(store.crash_points())} == {b"\xff" * 10, bytes(10)}
    keep = CrashStore(b"\xff" * 4096, discard="keep")
    run(keep.discard(0, 4096))
    assert keep.crash_points() == 0 and run(keep.read(0, 4)) == b"\xff" * 4


def test_marks_and_durability_questions() -> None:
    store = CrashStore()
    _log(store, ("write", (0, b"1")))
    ack = store.mark("first acknowledged")
    _log(store, ("write", (1, b"2")), ("flush", ()), ("write", (2, b"3")))
    assert ack == 1
    assert not store.durable_at("first acknowledged", 2)
    assert store.durable_at("first acknowledged", 3)
    assert store.durable_at(ack, 4)
    assert [op.index for op in store.pending(4)] == [3]
    assert "#2 flush" in store.describe_ops()


def test_large_tails_are_sampled_reproducibly_within_max_states() -> None:
    store = CrashStore(bytes(64 * 1024))
    _log(store, *[("write", (i * 512, pattern(i, 512))) for i in range(40)])
    first = [s.units for s in store.scenarios(40, max_states=50)]
    again = [s.units for s in store.scenarios(40, max_states=50)]
    assert first == again and len(first) == 50 and len(set(first)) == 50
    assert first[0] == () and len(first[1]) == 40  # nothing, then everything
    other = [s.units for s in store.scenarios(40, max_states=50, rng=random.Random(7))]
    assert other != first
    # Small tails are exhaustive unless max_states is smaller than 2**n.
    assert len(list(store.states(3))) == 8
    assert len(list(store.states(3, max_states=4))) == 4


# ---- FaultStore ----------------------------------------------------------------------


def test_fault_store_fails_the_nth_write_and_leaves_the_data_untouched() -> None:
    inner = MemoryStore(b"." * 100, name="disk.img")
    store = FaultStore(inner)
    rule = store.fail("write", nth=3, errno=errno.ENOSPC)

    async def go() -> None:
        await store.write(0, b"a")
        await store.writev(1, [b"v"])  # a writev is not a write: not counted by the rule
        await store.write(2, b"b")
        with pytest.raises(StoreError) as info:
            await store.write(3, b"c" * 10)
        err = info.value
        assert err.errno == errno.ENOSPC and err.filename == "disk.img"
        assert str(err).startswith("disk.img: write of 10 bytes at offset 3 failed")
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
        assert inner.data[3:13] == b"." * 10  # not performed
        await store.write(3, b"d")  # once: disarmed
        assert bytes(inner.data[:5]) == b"avbd."

    run(go())
    assert store.calls["write"] == 4 and store.calls["writev"] == 1
    assert rule.fired == 1 and rule.seen == 3
    assert [(f.op, f.call, f.offset) for f in store.injected] == [("write", 3, 3)]


def test_fault_store_rules_by_range_sticky_and_other_operations() -> None:
    inner = MemoryStore(bytes(8192))
    store = FaultStore(inner, name="f")
    store.fail("writev", offset_range=(4096, 8192), once=False)
    store.fail("flush", nth=2)
    store.fail("read", offset_range=(100, 101))
    store.fail("truncate", offset_range=(0, 10))
    store.fail("write_zeroes")

    async def go() -> None:
        await store.writev(0, [b"x" * 4096])  # outside the range
        for _ in range(2):  # sticky: every call in range fails
            with pytest.raises(StoreError, match="writev of 2 bytes at offset 4095"):
                await store.writev(4095, [b"y", b"y"])
        assert inner.data[4095] == ord("x") and inner.data[4096] == 0
        await store.flush()
        with pytest.raises(StoreError, match="flush failed"):
            await store.flush()
        await store.flush()
        assert await store.read(0, 100) == b"x" * 100
        with pytest.raises(StoreError) as info:
            await store.read_exact(50, 100, "L2 table")
        assert info.value.errno == errno.EIO
        with pytest.raises(StoreError):
            await store.truncate(5)
        await store.truncate(9000)
        with pytest.raises(StoreError):
            await store.write_zeroes(0, 10)
        assert await store.read(0, 10) == b"x" * 10
        assert await store.size() == 9000

    run(go())
    with pytest.raises(ValueError):
        store.fail("flush", offset_range=(0, 1))
    with pytest.raises(ValueError):
        store.fail("flush", partial=True)
    with pytest.raises(ValueError):
        store.fail("seek")


def test_fault_store_partial_writes_persist_the_first_half() -> None:
    crash = CrashStore(bytes(4096))
    store = FaultStore(crash)
    store.fail("writev", partial=True)
    store.fail("write", nth=2, partial=True)

    async def go() -> None:
        with pytest.raises(StoreError):
            await store.writev(0, [b"a" * 600, b"b" * 400])
        assert await crash.read(0, 1000) == b"a" * 500 + bytes(500)
        await store.write(2000, b"c")
        with pytest.raises(StoreError):
            await store.write(3000, b"d" * 10)
        assert await crash.read(3000, 10) == b"d" * 5 + bytes(5)

    run(go())
    # The partial writes reached the crash log like any other write.
    assert [(op.offset, len(op.data)) for op in crash.ops] == [(0, 500), (2000, 1), (3000, 5)]
    assert store.injected[0].partial


# =====================================================================================
# Part 2: the engine under crashes
# =====================================================================================


@pytest.fixture(scope="module")
def fresh() -> Scenario:
    return fresh_image_workload()


@pytest.fixture(scope="module")
def overlay() -> Scenario:
    return backing_file_workload()


def test_workloads_issue_the_documented_ordering(fresh: Scenario, overlay: Scenario) -> None:
    """Sanity of the workloads themselves: the flags and flushes DESIGN.md §2 promises."""
    first = fresh.crash.ops[fresh.ops[0].start : fresh.ops[0].end]
    assert [(op.kind, op.source) for op in first] == [
        ("write", "write"),  # header with NEED_CHECK
        ("flush", "flush"),
        ("write", "writev"),  # the data clusters
        ("write", "write"),  # the new L2 table
        ("flush", "flush"),
        ("write", "write"),  # the L1 sector
    ]
    assert int.from_bytes(first[0].data[16:24], "little") & Feature.NEED_CHECK
    cow = overlay.crash.ops[overlay.ops[1].start : overlay.ops[1].end]
    assert [op.kind for op in cow] == ["write", "flush", "write"]  # data, flush, L2 sector
    assert fresh.crash.crash_points() > 20 and overlay.crash.crash_points() > 15


@pytest.mark.parametrize("torn", [False, True], ids=["whole-writes", "torn-sectors"])
@pytest.mark.parametrize("which", ["fresh", "overlay"])
def test_every_crash_state_recovers_to_old_or_new_data(
    which: str,
    torn: bool,
    request: pytest.FixtureRequest,
    crash_summary: Callable[[str], None],
) -> None:
    sc: Scenario = request.getfixturevalue(which)
    totals: Totals = crash_all(sc, torn=torn, max_states=64 if torn else None)
    summary = totals.line(f"{sc.name} {'torn' if torn else 'whole'}")
    crash_summary(summary)
    assert totals.states > totals.crash_points
    assert not totals.failures, summary + "\n\n" + "\n\n".join(totals.failures)
    assert totals.ok, summary


def test_a_failed_allocating_write_leaves_a_checkable_image() -> None:
    """FaultStore against the engine: the data write of an allocation fails."""

    async def go() -> None:
        fmt = MemoryStore()
        await QedImage.format_store(fmt, MiB, cluster_size=CS, table_size=2)
        store = FaultStore(MemoryStore(fmt.data, name="img.qed"))
        header, area = await QedImage.read_header(store)
        img = await open_qed(store, header, area, backing=None, readonly=False)
        await img.write(0, b"a" * 100)
        store.fail("writev", errno=errno.ENOSPC)
        with pytest.raises(StoreError) as info:
            await img.write(CS, b"b" * 100)
        assert info.value.errno == errno.ENOSPC and info.value.filename == "img.qed"
        assert await img.read(0, 100) == b"a" * 100
        assert await img.read(CS, 100) == bytes(100)
        report = await check_image(img)
        assert report.corruptions == 0
        await img.write(CS, b"c" * 100)  # the store works again
        await img.flush()
        assert await img.read(CS, 100) == b"c" * 100
        assert (await check_image(img)).corruptions == 0

    run(go())


class _DropsTheDataFlush(CrashStore):
    """A broken disk for the self-test below: it ignores the flush the engine issues
    between an allocation's data and its L2 entry (DESIGN.md §2, step 3), which
    ``_flush_placed`` makes for a write and a group of them."""

    async def flush(self) -> None:
        if sys._getframe(1).f_code.co_name == "_flush_placed":
            return
        await super().flush()


def test_the_harness_catches_a_missing_flush() -> None:
    """Without step 3 an L2 entry can reach the disk before its data: the harness
    must see it (entries past the end of the file, or clusters reading zeros
    instead of the backing file's data)."""
    sc = backing_file_workload(_DropsTheDataFlush)
    totals = crash_all(sc, torn=False, max_states=None)
    print("\n" + totals.line("overlay.qed without the data flush (must fail)"))
    assert totals.failures
    assert "overlay.qed" in totals.failures[0] and "store ops" in totals.failures[0]


async def _guest_after_recovery(sc: Scenario, image: bytes) -> tuple[list[bytes], int]:
    """Open ``image`` read-write (repairing), return the touched guest ranges and the
    corruptions a check then finds."""
    store = MemoryStore(image, name=sc.name)
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=sc.backing, readonly=False)
    report = await check_image(img)
    return [await img.read(a, b - a) for a, b in touched_ranges(sc)], report.corruptions


def test_a_crash_during_repair_is_repaired_again_to_the_same_result(
    fresh: Scenario, crash_summary: Callable[[str], None]
) -> None:
    """Take crash states that need a repair, run the repair on a CrashStore, and crash
    it at every point: opening any of those states must repair to the same guest
    content as the uninterrupted repair."""
    crash = fresh.crash
    needing_repair: dict[bytes, None] = {}

    async def collect() -> None:
        for k in range(crash.crash_points() + 1):
            for data in crash.states(k):
                store = MemoryStore(data, writable=False)
                header, area = await QedImage.read_header(store)
                if not header.needs_check or data in needing_repair:
                    continue
                img = await open_qed(store, header, area, backing=None, readonly=True)
                if (await check_image(img)).corruptions:
                    needing_repair[data] = None

    run(collect())
    assert len(needing_repair) >= 10
    states = 0
    failures: list[str] = []

    async def go() -> None:
        nonlocal states
        for image in list(needing_repair)[:40]:
            expected, corruptions = await _guest_after_recovery(fresh, image)
            assert corruptions == 0
            repair = CrashStore(image, name="repairing.qed")
            header, area = await QedImage.read_header(repair)
            await open_qed(repair, header, area, backing=None, readonly=False)
            assert repair.crash_points() >= 3  # table rewrites, then flush, header, flush
            for k in range(repair.crash_points() + 1):
                for state in repair.scenarios(k, torn=True, max_states=16):
                    states += 1
                    got, corruptions = await _guest_after_recovery(fresh, state.data)
                    if corruptions or got != expected:
                        failures.append(
                            f"{state.describe()}: {corruptions} corruptions, guest content "
                            f"{'differs' if got != expected else 'same'}; repair log:\n"
                            + repair.describe_ops(0, k)
                        )

    run(go())
    summary = (
        f"crash during repair: {min(40, len(needing_repair))} images needing repair, "
        f"{states} states, {len(failures)} failures"
    )
    crash_summary(summary)
    assert not failures, summary + "\n" + "\n\n".join(failures[:3])
