"""Copy-on-read in the engine (engine.qed.io): a read of clusters the image leaves to
its backing chain copies exactly those clusters into it, whole, all-zero ones as zero
clusters; allocated clusters are untouched; a guest write racing a fill wins; a fill
commits only over the backing image it read from. QEMU's own copy-on-read (qemu-io
-C) is compared in tests/interop/test_copy_on_read_qemu.py."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from streamkit import CS, DATA, UNALLOCATED, ZERO, Gate, MiB, base_bytes, kinds, overlay, run

import qedkit
from qedkit.engine.chain import open_image
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.errors import InvalidRequestError, ReadOnlyError
from qedkit.store import MemoryStore


def test_a_read_copies_exactly_the_clusters_it_touches() -> None:
    base = base_bytes(2 * MiB)

    async def go() -> None:
        img = await overlay(base, 2 * MiB)
        assert await img.read(CS + 100, 5000) == base[CS + 100 : CS + 5100]  # inside cluster 1
        assert await img.read(3 * CS - 10, 20) == base[3 * CS - 10 : 3 * CS + 10]  # 2 and 3
        assert await img.read(10 * CS, 3 * CS) == base[10 * CS : 13 * CS]  # 10-12, aligned
        want = [UNALLOCATED] * 32
        for c in (1, 2, 3, 10, 11, 12):
            want[c] = DATA
        assert await kinds(img) == want
        # the copies hold the backing bytes, whole clusters, and the top image alone
        # reads them now
        img.backing = None
        for c in (1, 2, 3, 10, 11, 12):
            assert await img.read(c * CS, CS) == base[c * CS : (c + 1) * CS]
        await img.close()

    run(go())


def test_all_zero_clusters_become_zero_clusters() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB)
        assert await img.read(3 * CS, 4 * CS) == base[3 * CS : 7 * CS]  # 3, zeros 4-5, 6
        assert (await kinds(img))[2:8] == [UNALLOCATED, DATA, ZERO, ZERO, DATA, UNALLOCATED]
        await img.close()

    run(go())


def test_past_the_backing_end_and_a_partial_last_cluster() -> None:
    base = random.Random(5).randbytes(3 * CS + 1000)  # ends inside cluster 3
    size = 6 * CS + 512  # the image ends inside cluster 6

    async def go() -> None:
        img = await overlay(base, size)
        got = await img.read(3 * CS, size - 3 * CS)
        assert got == base[3 * CS :] + bytes(size - len(base))
        assert (await kinds(img))[3:] == [DATA, ZERO, ZERO, ZERO]
        img.backing = None
        assert await img.read(3 * CS, CS) == base[3 * CS :] + bytes(4 * CS - len(base))
        await img.close()

    run(go())


def test_a_read_across_two_l2_tables_fills_both() -> None:
    cs = 4096
    span = 2 * cs * cs // 8  # 4 KiB clusters, table_size 2: 4 MiB per L2 table
    base = random.Random(3).randbytes(span + 4 * cs)

    async def go() -> None:
        img = await overlay(base, len(base), cluster_size=cs, table_size=2)
        assert await img.read(span - 100, 200) == base[span - 100 : span + 100]
        assert img.l1_table[0] and img.l1_table[1]
        statuses = [await img.block_status(p, cs) for p in (span - 2 * cs, span - cs, span)]
        assert [ext.kind for (ext,) in statuses] == [UNALLOCATED, DATA, DATA]
        img.backing = None
        assert await img.read(span - cs, 2 * cs) == base[span - cs : span + cs]
        await img.close()

    run(go())


def test_allocated_and_zero_clusters_are_left_alone() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB)
        await img.write(CS, b"\xaa" * 100)  # cluster 1: allocated (copy-on-write)
        await img.write_zeroes(2 * CS, CS)  # cluster 2: a zero cluster
        end = img.file_end
        got = await img.read(CS, 2 * CS)
        assert got == b"\xaa" * 100 + base[CS + 100 : 2 * CS] + bytes(CS)
        assert img.file_end == end  # nothing was copied
        assert (await kinds(img))[1:3] == [DATA, ZERO]
        await img.close()

    run(go())


def test_without_copy_on_read_nothing_is_copied() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB, cor=False)
        assert await img.read(0, MiB) == base
        assert set(await kinds(img)) == {UNALLOCATED}
        await img.close()

    run(go())


def test_a_guest_write_racing_a_fill_wins() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        gate = Gate(base)
        img = await overlay(gate, MiB)
        reader = asyncio.ensure_future(img.read(CS, 2 * CS))  # clusters 1 and 2
        await gate.reading.wait()  # the fill is reading the backing image
        # The guest writes into cluster 2 meanwhile (its copy-on-write reads the
        # backing image too: let that read through, then hold the gate again).
        gate.opened.set()
        await img.write(2 * CS + 10, b"\x55" * 20)  # runs to its end before the fill goes on
        got = await reader
        assert got == base[CS : 3 * CS]  # the read saw the state before the write
        # cluster 1 was copied; cluster 2 is the guest's, whatever the fill read
        assert await img.read(2 * CS, CS) == (
            base[2 * CS : 2 * CS + 10] + b"\x55" * 20 + base[2 * CS + 30 : 3 * CS]
        )
        img.backing = None
        assert await img.read(CS, CS) == base[CS : 2 * CS]
        assert await img.read(2 * CS + 10, 20) == b"\x55" * 20
        await img.close()

    run(go())


def test_a_guest_write_during_the_fill_read_is_not_overwritten() -> None:
    """The fill's bytes were read before the guest's write landed: committing them
    would lose the write. The write allocated the cluster under the allocation lock
    first, so the fill skips it."""
    base = base_bytes(MiB)

    async def go() -> None:
        gate = Gate(base)
        img = await overlay(gate, MiB)
        result: list[Any] = []

        async def cor() -> None:
            result.append(await img.copy_up(3 * CS, CS))

        task = asyncio.ensure_future(cor())
        await gate.reading.wait()
        # a whole-cluster write needs no copy-on-write read: it lands while the fill
        # still waits for its bytes
        await img.write(3 * CS, b"\x77" * CS)
        gate.opened.set()
        await task
        (filled,) = result
        assert (filled.data_clusters, filled.skipped_clusters) == (0, 1)
        assert await img.read(3 * CS, CS) == b"\x77" * CS
        await img.close()

    run(go())


def test_a_fill_is_dropped_when_the_backing_image_changed_meanwhile() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        gate = Gate(base)
        img = await overlay(gate, MiB)
        task = asyncio.ensure_future(img.copy_up(0, 2 * CS))
        await gate.reading.wait()
        img.backing = RawImage(MemoryStore(bytes(MiB), writable=False), MiB)  # a rebase
        gate.opened.set()
        filled = await task
        assert (filled.data_clusters, filled.zero_clusters, filled.skipped_clusters) == (0, 0, 2)
        assert set(await kinds(img)) == {UNALLOCATED}
        await img.close()

    run(go())


def test_a_fill_waits_for_a_stall_on_its_clusters_and_stalls_writes_while_it_flushes() -> None:
    """A stalled cluster is being changed by someone else (a mover, another fill): the
    fill waits for it. A fill's own clusters stall guest writes only between its data
    write and its L2 entries (while the data is flushed with the lock released)."""
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB)
        async with img.allocations_paused():
            release = await img.stall_writes([1])
        task = asyncio.ensure_future(img.copy_up(0, 3 * CS))
        await asyncio.sleep(0.01)
        assert not task.done()  # waits for cluster 1
        assert (await kinds(img))[:3] == [UNALLOCATED] * 3
        release()
        filled = await task
        assert (filled.data_clusters, filled.skipped_clusters) == (3, 0)
        assert (await kinds(img))[:3] == [DATA] * 3
        assert img.stalled_clusters == []  # every stall released
        # while a fill flushes, its clusters stall; others do not
        seen: list[list[int]] = []
        real_flush = img.store.flush

        async def flush() -> None:
            seen.append(img.stalled_clusters)
            await real_flush()

        img.store.flush = flush  # type: ignore[method-assign]
        await img.copy_up(8 * CS, 2 * CS)
        assert seen == [[8, 9]]
        await img.close()

    run(go())


def test_copy_up_wants_whole_clusters() -> None:
    async def go() -> None:
        img = await overlay(base_bytes(MiB), MiB + 512)
        with pytest.raises(InvalidRequestError, match="not cluster aligned"):
            await img.copy_up(100, CS)
        with pytest.raises(InvalidRequestError, match="not cluster aligned"):
            await img.copy_up(0, CS + 1)
        filled = await img.copy_up(16 * CS, 512)  # the partial last cluster
        assert filled.zero_clusters == 1
        await img.close()

    run(go())


def test_copy_on_read_needs_a_writable_image(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(base_bytes(MiB))
    top = tmp_path / "top.qed"
    qedkit.create(str(top), backing_file="base.raw", backing_format="raw")
    with pytest.raises(InvalidRequestError, match="copy-on-read writes the image"):
        qedkit.open(str(top), readonly=True, copy_on_read=True)
    img = run(open_image(str(top), readonly=True))
    try:
        assert isinstance(img, QedImage)
        with pytest.raises(ReadOnlyError, match="copy-on-read"):
            img.copy_on_read = True
    finally:
        run(img.close())


def test_the_synchronous_api_copies_on_read(tmp_path: Path) -> None:
    base = base_bytes(MiB)
    (tmp_path / "base.raw").write_bytes(base)
    top = tmp_path / "top.qed"
    qedkit.create(str(top), backing_file="base.raw", backing_format="raw")
    with qedkit.open(str(top), copy_on_read=True) as img:
        assert img.read(5 * CS, 2 * CS) == base[5 * CS : 7 * CS]
        buf = bytearray(CS)
        img.readinto(8 * CS, buf)
        assert buf == base[8 * CS : 9 * CS]
    with qedkit.open(str(top), readonly=True, backing_chain=False) as img:
        entries = [(e.start, e.length, e.zero, e.data) for e in img.map() if e.present]
    assert entries == [
        (5 * CS, CS, True, False),
        (6 * CS, CS, False, True),
        (8 * CS, CS, False, True),
    ]


def test_writes_to_clusters_of_a_fill_wait_only_while_it_flushes() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB)
        real_flush = img.store.flush
        held = asyncio.Event()
        flushing = asyncio.Event()
        calls = 0

        async def flush() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                flushing.set()
                await held.wait()
            await real_flush()

        img.store.flush = flush  # type: ignore[method-assign]
        fill = asyncio.ensure_future(img.copy_up(8 * CS, 2 * CS))
        await flushing.wait()  # the fill's data is written, its entries are not
        stalled = asyncio.ensure_future(img.write(8 * CS + 100, b"\x99" * 10))
        await img.write(13 * CS + 5, b"\x88" * 10)  # another cluster: not held up
        await asyncio.sleep(0.01)
        assert not stalled.done()  # cluster 8 waits for the fill's entries
        held.set()
        filled = await fill
        await stalled
        assert filled.data_clusters == 2
        want = bytearray(base[8 * CS : 9 * CS])
        want[100:110] = b"\x99" * 10
        assert await img.read(8 * CS, CS) == want  # the write landed on the copy
        assert await img.read(13 * CS + 5, 10) == b"\x88" * 10
        await img.close()

    run(go())
