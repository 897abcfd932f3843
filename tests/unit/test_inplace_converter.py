"""The in-place qcow2 -> QED converter (jobs.inplace) and the live export
(jobs.inplace_live) on qcow2 images packed here by hand (struct only), on memory
stores: the geometry choice, what each kind of entry becomes, refusals before any
write, the roll-back of a failed append, and the live export's routing (writes into
reused clusters at once, the others held until the switch)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from qedkit.engine.check import check_image
from qedkit.engine.qcow2 import Qcow2Image
from qedkit.errors import CorruptImageError, StoreError, UnsupportedFeatureError
from qedkit.jobs.inplace import (
    CopyReason,
    InPlaceConverter,
    QedGeometry,
    Reclaim,
    reclaim,
)
from qedkit.jobs.inplace_live import ConvertToQedJob, LiveConversion
from qedkit.store import FaultStore, MemoryStore

T = TypeVar("T")
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CS = 4096
COPIED = 1 << 63


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ==========================================================================================
# A qcow2 image packed by hand
# ==========================================================================================


def qcow2(
    size: int = 1 * MiB, entries: dict[int, int] | None = None, *, data: dict[int, bytes]
) -> bytes:
    """v3, 4 KiB clusters: header (0), refcount table (1), refcount block (2), L1 (3),
    one L2 table (4), then data clusters. ``entries``: guest cluster -> raw L2 entry
    (host offsets as given); ``data``: host offset -> cluster bytes."""
    end = max([5 * CS, *(h + CS for h in data)])
    buf = bytearray(end)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, 12, size, 0, 1, 3 * CS, 1 * CS, 1, 0, 0,
        0, 0, 0, 4, 104,
    )  # fmt: skip
    buf[: len(header)] = header
    struct.pack_into(">Q", buf, 1 * CS, 2 * CS)  # refcount table -> block
    for i in range(end // CS):
        struct.pack_into(">H", buf, 2 * CS + 2 * i, 1)
    struct.pack_into(">Q", buf, 3 * CS, COPIED | 4 * CS)  # L1 -> L2
    for g, entry in (entries or {}).items():
        struct.pack_into(">Q", buf, 4 * CS + 8 * g, entry)
    for host, payload in data.items():
        buf[host : host + len(payload)] = payload
    return bytes(buf)


def sample() -> tuple[bytes, bytes]:
    """The image and the guest bytes it holds: cluster 0 data at host 5 (reused),
    1 a zero cluster, 2 data at host 6 (reused), 3 unallocated, 4 data pointing at the
    same host cluster as 0 (corrupt: copied), 255 (the last) data at host 7."""
    a, b, c = b"A" * CS, b"B" * CS, b"C" * CS
    entries = {
        0: COPIED | 5 * CS,
        1: 1,
        2: COPIED | 6 * CS,
        4: 5 * CS,
        255: COPIED | 7 * CS,
    }
    image = qcow2(entries=entries, data={5 * CS: a, 6 * CS: b, 7 * CS: c})
    guest = bytearray(1 * MiB)
    guest[0:CS] = a
    guest[2 * CS : 3 * CS] = b
    guest[4 * CS : 5 * CS] = a
    guest[255 * CS :] = c
    return image, bytes(guest)


async def _open(store: MemoryStore | FaultStore) -> Qcow2Image:
    meta = await Qcow2Image.read_metadata(store)
    return await Qcow2Image.open(store, meta, backing=None)


# ==========================================================================================
# Geometry
# ==========================================================================================


@pytest.mark.parametrize(
    ("qcow2_cluster", "size", "expected"),
    [
        (64 * KiB, 1 * GiB, (64 * KiB, 2)),  # the qcow2 cluster size, table_size 2
        (4 * KiB, 1 * GiB, (4 * KiB, 2)),
        (4 * KiB, 200 * GiB, (4 * KiB, 16)),  # table_size grows first
        (4 * KiB, 1 * TiB, (8 * KiB, 16)),  # then the cluster size
        (512, 1 * MiB, (4 * KiB, 2)),  # QED's minimum
        (2 * MiB, 1 << 62, (2 * MiB, 8)),  # 2 MiB with 16 would wrap in QEMU
    ],
)
def test_the_qed_geometry_keeps_the_qcow2_cluster_size_when_it_can(
    qcow2_cluster: int, size: int, expected: tuple[int, int]
) -> None:
    geo = QedGeometry.choose(qcow2_cluster, size, "x")
    assert (geo.cluster_size, geo.table_size) == expected


def test_a_size_no_geometry_holds_is_refused() -> None:
    with pytest.raises(UnsupportedFeatureError, match="does not fit any QED geometry"):
        QedGeometry.choose(2 * MiB, 1 << 64, "x")


# ==========================================================================================
# Offline
# ==========================================================================================


def test_entries_become_reused_zero_unallocated_and_copied_clusters() -> None:
    image, guest = sample()

    async def go() -> None:
        store = MemoryStore(image, name="t.qcow2")
        conv = InPlaceConverter(await _open(store))
        plan = await conv.plan()
        assert store.data == image  # planning writes nothing
        s = plan.stats
        assert (s.reused, s.zero, s.copied) == (3, 1, 1)
        assert s.copy_reasons == {CopyReason.SHARED.value: 1}
        assert s.unallocated == 256 - 5
        assert plan.geometry == QedGeometry(CS, 2)
        report = await conv.run()
        img = conv.qed
        assert img is not None
        assert await img.read(0, img.size) == guest
        table = await img.get_l2(0)
        assert table is not None
        # reused clusters point where they were (the compaction may have lowered the
        # highest ones into the freed metadata slots, keeping each one's data)
        assert table[1] == 1 and table[3] == 0
        check = await check_image(img)
        assert (check.corruptions, check.leaks) == (0, 0)
        assert img.header.l1_table_offset == CS  # cluster 1, QEMU's layout
        assert report.bytes_written == plan.bytes_to_write
        await conv.close()

    run(go())


def test_dirty_corrupt_snapshots_and_bitmaps_are_refused_before_any_write() -> None:
    image, _ = sample()
    for offset, flag, message in (
        (79, 1, "dirty bit"),
        (79, 2, "corrupt bit"),
    ):
        bad = bytearray(image)
        bad[offset] |= flag
        store = MemoryStore(bad)

        async def go(store: MemoryStore = store, message: str = message) -> None:
            with pytest.raises(UnsupportedFeatureError, match=message):
                await InPlaceConverter(await _open(store)).plan()

        run(go())
        assert store.data == bad


def test_a_data_cluster_past_the_end_of_the_file_is_refused() -> None:
    image = qcow2(entries={0: COPIED | 40 * CS}, data={})

    async def go() -> None:
        store = MemoryStore(image)
        with pytest.raises(CorruptImageError, match="past the end of the file"):
            await InPlaceConverter(await _open(store)).plan()
        assert store.data == image

    run(go())


def test_a_size_that_is_no_multiple_of_512_is_refused() -> None:
    image = bytearray(qcow2(size=1 * MiB - 100, data={}))

    async def go() -> None:
        with pytest.raises(UnsupportedFeatureError, match="not a multiple of 512"):
            await InPlaceConverter(await _open(MemoryStore(image))).plan()

    run(go())


@pytest.mark.parametrize("op", ["writev", "truncate", "flush"])
def test_a_failed_append_cuts_the_file_back_to_the_qcow2_image(op: str) -> None:
    image, guest = sample()
    image += b"\x07" * 100  # a file that ends inside a cluster: the append pads first

    async def go() -> None:
        inner = MemoryStore(image, name="t.qcow2")
        store = FaultStore(inner)
        conv = InPlaceConverter(await _open(store))
        await conv.plan()
        store.fail(op)
        with pytest.raises(StoreError):
            await conv.write_tables()
        assert bytes(inner.data) == image
        # and a retry goes through
        store.clear()
        await conv.write_tables()
        img = await conv.switch()
        await reclaim(img, Reclaim.PUNCH)
        assert await img.read(0, img.size) == guest

    run(go())


# ==========================================================================================
# Live
# ==========================================================================================


def sample_without_sharing() -> tuple[bytes, bytes]:
    image, guest = sample()
    image = bytearray(image)
    struct.pack_into(">Q", image, 4 * CS + 8 * 4, 0)  # guest cluster 4: unallocated
    g = bytearray(guest)
    g[4 * CS : 5 * CS] = bytes(CS)
    return bytes(image), bytes(g)


def test_the_live_export_refuses_shared_host_clusters() -> None:
    image, _ = sample()

    async def go() -> None:
        with pytest.raises(CorruptImageError, match="share their host cluster"):
            await LiveConversion.prepare(await _open(MemoryStore(image)))

    run(go())


def test_the_live_export_refuses_data_over_metadata() -> None:
    image = qcow2(entries={0: COPIED | 4 * CS}, data={})  # data "in" the L2 table

    async def go() -> None:
        with pytest.raises(CorruptImageError, match="share their host cluster"):
            await LiveConversion.prepare(await _open(MemoryStore(image)))

    run(go())


def test_the_live_export_writes_reused_clusters_at_once_and_holds_the_others() -> None:
    image, guest = sample_without_sharing()

    async def go() -> None:
        store = MemoryStore(image, name="t.qcow2")
        live = await LiveConversion.prepare(await _open(store))
        assert live.format_name == "qcow2"
        await live.write(100, b"x" * 50)  # cluster 0: reused, in place at host 5
        assert store.data[5 * CS + 100 : 5 * CS + 150] == b"x" * 50
        assert live.in_place_writes == 1
        held = asyncio.ensure_future(live.write(3 * CS, b"y" * 10))  # unallocated
        zeroed = asyncio.ensure_future(live.write_zeroes(CS, CS))  # a zero cluster
        await asyncio.sleep(0.01)
        assert not held.done() and not zeroed.done()
        assert await live.read(100, 50) == b"x" * 50  # reads go on
        switched: list[object] = []
        live.on_switch.append(switched.append)
        report = await live.convert()
        await asyncio.gather(held, zeroed)
        assert live.format_name == "qed" and switched == [live.qed]
        expect = bytearray(guest)
        expect[100:150] = b"x" * 50
        expect[3 * CS : 3 * CS + 10] = b"y" * 10
        assert await live.read(0, live.size) == bytes(expect)
        assert report.plan is not None and report.plan.stats.reused == 3
        assert live.held_requests == 2
        qed = live.qed
        assert qed is not None
        assert (await check_image(qed)).corruptions == 0
        await live.close()

    run(go())


def test_held_writes_fail_when_the_server_stops() -> None:
    image, _ = sample_without_sharing()

    async def go() -> None:
        store = MemoryStore(image)
        live = await LiveConversion.prepare(await _open(store))
        held = asyncio.ensure_future(live.write(3 * CS, b"y"))
        await asyncio.sleep(0)
        live.release_held()
        with pytest.raises(StoreError, match="the server is stopping"):
            await held
        assert bytes(store.data) == image
        await live.close()

    run(go())


def test_the_job_checks_its_arguments() -> None:
    assert ConvertToQedJob.parse_arguments({}) == {"reclaim": "compact", "rate": 0}
    assert ConvertToQedJob.parse_arguments({"rate": "8M", "reclaim": "punch"}) == {
        "reclaim": "punch",
        "rate": 8 * MiB,
    }
    from qedkit.errors import InvalidRequestError

    for bad in ({"reclaim": "x"}, {"rate": "lots"}, {"speed": 1}):
        with pytest.raises(InvalidRequestError, match="convert-to-qed"):
            ConvertToQedJob.parse_arguments(bad)
