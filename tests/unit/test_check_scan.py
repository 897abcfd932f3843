"""The check's quick scan (bulk tests per table) counts exactly as the exact scan on
images without a problem, and hands every image with one to the exact scan; both of
its inner loops (the compiled helper of qedkit/_speedups.c and the pure-Python one)
are held to that."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest
from qedtest import require_speedups

from qedkit.engine import check as check_module
from qedkit.engine.check import (
    LEAK_PROBLEMS,
    ScanSource,
    _exact_scan,
    _quick_scan,
    check_image,
    scan_source,
)
from qedkit.engine.qed import QedImage
from qedkit.store import MemoryStore

KiB = 1024
MiB = 1 << 20


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True, params=["compiled", "python"])
def inner_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each of the quick scan's inner loops."""
    if request.param == "compiled":
        monkeypatch.setattr(check_module, "_mark_clusters", require_speedups().mark_clusters)
    else:
        monkeypatch.setattr(check_module, "_mark_clusters", check_module._mark_clusters_py)
    return str(request.param)


async def _image(cluster_size: int, seed: int) -> tuple[QedImage, MemoryStore]:
    """Random writes and zero clusters over several L2 tables, some allocated in
    runs (extents), some scattered."""
    store = MemoryStore(name="img.qed")
    size = 64 * MiB if cluster_size == 4096 else 3072 * MiB  # 16 or 3 L2 tables
    await QedImage.format_store(store, size, cluster_size=cluster_size, table_size=2)
    header, area = await QedImage.read_header(store)
    from qedkit.engine.chain import open_qed

    img = await open_qed(store, header, area, backing=None, readonly=False)
    rng = random.Random(seed)
    for _ in range(60):
        offset = rng.randrange(0, size // cluster_size) * cluster_size
        length = cluster_size * rng.choice([1, 1, 3, 40 if cluster_size == 4096 else 8])
        length = min(length, size - offset)
        if rng.random() < 0.15:
            await img.write_zeroes(offset, length)
        else:
            await img.write(offset, b"\x5a" * length)
    await img.flush()
    return img, store


async def _both(img: QedImage) -> tuple[Any, Any]:
    source = await scan_source(img)
    return await _quick_scan(source, None, False), await _exact_scan(source, None, False)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
@pytest.mark.parametrize("seed", range(3))
def test_the_quick_scan_counts_as_the_exact_one(cluster_size: int, seed: int) -> None:
    async def go() -> None:
        img, _ = await _image(cluster_size, seed)
        quick, exact = await _both(img)
        assert quick is not None
        assert (quick.allocated, quick.fragmented, quick.corruptions) == (
            exact.allocated,
            exact.fragmented,
            0,
        )
        assert quick.used == exact.used
        assert exact.allocated > 50

    run(go())


def _poke(store: MemoryStore, offset: int, value: int) -> None:
    store.data[offset : offset + 8] = struct.pack("<Q", value)


def _peek(store: MemoryStore, offset: int) -> int:
    return int(struct.unpack("<Q", bytes(store.data[offset : offset + 8]))[0])


DAMAGES = {
    "unaligned entry": lambda entry, geo, end: entry + 512,
    "low byte 1 but not a zero cluster": lambda entry, geo, end: entry + 1,
    "entry past the end of the file": lambda entry, geo, end: end + 4 * geo.cluster_size,
    "entry on the L1 table": lambda entry, geo, end: geo.cluster_size,  # (L1 at cluster 1)
    "duplicate data reference": None,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damage_sends_the_image_to_the_exact_scan(damage: str) -> None:
    async def go() -> None:
        img, store = await _image(65536, 7)
        geo = img.geo
        l2 = next(offset for offset in img.l1_table if offset)
        slots = [l2 + 8 * i for i in range(geo.l2_entries) if _peek(store, l2 + 8 * i) > 1]
        entry = _peek(store, slots[0])
        fn = DAMAGES[damage]
        value = _peek(store, slots[1]) if fn is None else fn(entry, geo, img.file_end)
        _poke(store, slots[0], value)
        reopened = await _reopen(store)
        quick, exact = await _both(reopened)
        assert quick is None, damage
        assert exact.corruptions >= 1, damage
        report = await check_image(reopened)
        assert report.corruptions == exact.corruptions

    run(go())


async def _reopen(store: MemoryStore) -> QedImage:
    from qedkit.engine.chain import open_qed

    fresh = MemoryStore(bytes(store.data), name="img.qed")
    header, area = await QedImage.read_header(fresh)
    return await open_qed(fresh, header, area, backing=None, readonly=True)


def test_an_empty_table_and_an_image_without_tables_scan_quickly() -> None:
    async def go() -> None:
        store = MemoryStore(name="img.qed")
        await QedImage.format_store(store, 8 * MiB, cluster_size=4096, table_size=2)
        img = await _reopen(store)
        quick, _ = await _both(img)
        assert quick is not None and quick.allocated == 0

    run(go())


def test_leaks_are_all_counted_but_listed_only_in_part() -> None:
    async def go() -> None:
        _, store = await _image(4096, 1)
        extra = 5 * LEAK_PROBLEMS
        store.data.extend(bytes(-len(store.data) % 4096 + extra * 4096))
        report = await check_image(await _reopen(store))
        assert report.leaks == extra
        assert sum(p.kind == "leak" for p in report.problems) == LEAK_PROBLEMS

    run(go())


def test_scan_source_reads_tables_as_bytes() -> None:
    async def go() -> None:
        img, _ = await _image(4096, 2)
        source: ScanSource = await scan_source(img)
        l2 = next(offset for offset in img.l1_table if offset)
        raw = await source.read_table(l2)
        assert isinstance(raw, bytes) and len(raw) == img.geo.table_bytes

    run(go())
