"""Mover.compact (engine.qed.move): every free slot inside the used part of the file
is removed, whatever the layout, and the guest reads what it read before."""

from __future__ import annotations

import asyncio
import random

import pytest

from qedkit.engine.chain import open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qed import Mover, QedImage
from qedkit.store import MemoryStore

CS = 4096
TS = 2
SPAN = CS * (TS * CS // 8)  # guest bytes one L2 table maps


async def _image(size: int, table_size: int = TS) -> QedImage:
    store = MemoryStore(name="compact.qed")
    await QedImage.format_store(store, size, cluster_size=CS, table_size=table_size)
    header, area = await QedImage.read_header(store)
    return await open_qed(store, header, area, backing=None, readonly=False)


async def _leak(img: QedImage, guest_cluster: int) -> None:
    """Clear the entry of ``guest_cluster``: its data cluster becomes a leak."""
    l1_index, index = divmod(guest_cluster, img.geo.l2_entries)
    table = await img.get_l2(l1_index)
    assert table is not None and table[index] > 1
    await img.tables.write_entries(l1_index, table, {index: 0})
    await img.store.flush()


async def _compact_and_judge(img: QedImage, expect: bytes) -> None:
    leaks = (await check_image(img)).leaks
    assert leaks > 0
    await img.ensure_cluster_map()
    await Mover(img).compact()
    report = await check_image(img)
    assert (report.corruptions, report.leaks, report.check_errors) == (0, 0, 0)
    assert await img.read(0, img.size) == expect
    ts = img.geo.table_size
    used = 1 + ts + sum(ts for off in img.l1_table if off) + report.allocated_clusters
    assert await img.store.size() == used * CS


def test_a_sparse_image_with_one_cluster_per_table_compacts() -> None:
    """Data, table, data, table ...: no window of slots below the used space holds
    data alone, so the table at the top must evict a table below (it once raised
    'no room to move an L2 table below the used space')."""

    async def go() -> None:
        img = await _image(6 * SPAN)
        expect = bytearray(img.size)
        for k in range(5):
            await img.write(k * SPAN, bytes([k + 1]) * CS)
            expect[k * SPAN : k * SPAN + CS] = bytes([k + 1]) * CS
        await _leak(img, 2 * SPAN // CS)
        expect[2 * SPAN : 2 * SPAN + CS] = bytes(CS)
        await _compact_and_judge(img, bytes(expect))

    asyncio.run(go())


@pytest.mark.parametrize("seed", range(24))
def test_random_layouts_with_random_leaks_compact(seed: int) -> None:
    """Dense or sparse (a few clusters in each of many L2 tables), table_size 2 to 8."""

    async def go() -> None:
        rng = random.Random(seed)
        ts = rng.choice((2, 4, 8))
        span = CS * (ts * CS // 8)
        spans = rng.randrange(1, 9)
        img = await _image(spans * span, ts)
        expect = bytearray(img.size)
        per_span = span // CS
        if seed % 2:  # sparse
            clusters = [s * per_span + rng.randrange(per_span) for s in range(spans)]
            clusters += rng.sample(range(img.size // CS), rng.randrange(0, 4))
        else:
            clusters = rng.sample(range(img.size // CS), rng.randrange(3, 40))
        clusters = list(dict.fromkeys(clusters))
        if len(clusters) < 2:
            clusters.append((clusters[0] + 1) % (img.size // CS))
        for i, c in enumerate(clusters):
            data = bytes([i % 250 + 1]) * CS
            await img.write(c * CS, data)
            expect[c * CS : (c + 1) * CS] = data
        for c in rng.sample(clusters, rng.randrange(1, len(clusters))):
            await _leak(img, c)
            expect[c * CS : (c + 1) * CS] = bytes(CS)
        await _compact_and_judge(img, bytes(expect))

    asyncio.run(go())
