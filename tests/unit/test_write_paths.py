"""The QED engine's writes for the NBD server: the synchronous allocation of
``write_now`` and the group commit of ``write_batch`` give the same image as the
general path, and each takes only the cases it claims."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import qedkit
from qedkit.engine.chain import open_image
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.errors import InvalidRequestError

KiB = 1024
MiB = 1 << 20
CS = 4096  # small clusters: one L2 table maps 8 MiB


def with_image(path: Path, body: Callable[[QedImage], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        img = await open_image(str(path))
        assert isinstance(img, QedImage)
        try:
            return await body(img)
        finally:
            await img.close()

    return asyncio.run(go())


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_write_now_allocates_at_once_once_need_check_is_set(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 16 * MiB, cluster_size=CS)

    async def body(img: QedImage) -> None:
        assert not img.write_now(0, b"a" * 100)  # NEED_CHECK not set yet: general path
        await img.write(0, b"a" * 100)
        assert img.header.needs_check
        assert img.write_now(5 * CS + 100, data(1, 3000))  # partial: zero head and tail
        assert img.write_now(2 * CS, data(2, 2 * CS))  # two whole clusters
        await img.write_zeroes(7 * CS, CS)
        assert img.write_now(7 * CS + 1, b"z")  # over a zero cluster
        assert not img.write_now(8 * MiB + 10, b"t")  # its table does not exist
        assert not img.write_now(8 * MiB - 10, b"x" * 20)  # across two L2 spans
        assert await img.read(5 * CS, CS) == bytes(100) + data(1, 3000) + bytes(996)
        assert await img.read(2 * CS, 2 * CS) == data(2, 2 * CS)
        assert await img.read(7 * CS, 3) == b"\0z\0"
        report = await check_image(img)
        assert (report.corruptions, report.leaks, report.allocated_clusters) == (0, 0, 5)

    with_image(path, body)


def test_write_now_leaves_what_needs_a_flush_or_a_wait_to_the_general_path(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(data(3, MiB))
    overlay = tmp_path / "ov.qed"
    qedkit.create(str(overlay), cluster_size=CS, backing_file="base.raw", backing_format="raw")

    async def over_backing(img: QedImage) -> None:
        await img.write(0, b"o")  # the table exists now
        assert not img.write_now(CS + 5, b"o")  # copy-on-write and a flush first

    with_image(overlay, over_backing)

    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 * MiB, cluster_size=CS)

    async def contended(img: QedImage) -> None:
        await img.write(0, b"a")
        async with img.allocations_paused():  # an allocating request in progress
            assert not img.write_now(CS, b"b")
        assert img.write_now(CS, b"b")
        await img.flush()  # clears NEED_CHECK: the next allocation sets it again
        assert not img.write_now(2 * CS, b"c")

    with_image(path, contended)


def _random_writes(seed: int, size: int, n: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    writes = []
    last = 0
    for i in range(n):
        length = rng.choice([1, 100, CS, CS, 5000, 3 * CS])
        if rng.random() < 0.25:  # over the clusters of the one before
            offset = max(0, min(size - length, last + rng.randrange(-CS, CS)))
        else:
            offset = rng.randrange(0, size - length)
            if rng.random() < 0.5:
                offset -= offset % CS
        last = offset
        writes.append((offset, data(seed * 1000 + i, length)))
    return writes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backing", [False, True], ids=["fresh", "overlay"])
@pytest.mark.parametrize("now", [False, True], ids=["write_batch", "write_batch_now"])
def test_write_batch_gives_the_image_writes_one_by_one_give(
    seed: int, backing: bool, now: bool, tmp_path: Path
) -> None:
    size = 12 * MiB  # two L2 tables
    if backing:
        (tmp_path / "base.raw").write_bytes(data(seed + 50, size))
    images = []
    for name in ("one-by-one.qed", "batched.qed"):
        path = tmp_path / name
        if backing:
            qedkit.create(str(path), cluster_size=CS, backing_file="base.raw", backing_format="raw")
        else:
            qedkit.create(str(path), size, cluster_size=CS)
        images.append(path)
    batches = [_random_writes(seed * 10 + b, size, 40) for b in range(4)]

    async def one_by_one(img: QedImage) -> bytes:
        for batch in batches:
            for offset, payload in batch:
                await img.write(offset, payload)
        return await img.read(0, size)

    async def batched(img: QedImage) -> tuple[bytes, int, int]:
        for i, batch in enumerate(batches):
            if now:  # as the NBD server: what can be done at once, then the rest
                done = img.write_batch_now(batch)
                assert await img.write_batch(batch[done:]) == [None] * (len(batch) - done)
            else:
                assert await img.write_batch(batch) == [None] * len(batch)
            if i == 1:
                await img.flush()
        report = await check_image(img)
        return await img.read(0, size), report.corruptions, report.leaks

    expected = with_image(images[0], one_by_one)
    got, corruptions, leaks = with_image(images[1], batched)
    assert got == expected
    assert (corruptions, leaks) == (0, 0)


def test_write_batch_reports_each_failure_and_does_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 * MiB, cluster_size=CS)

    async def body(img: QedImage) -> None:
        writes = [(0, b"a" * 10), (4 * MiB - 5, b"b" * 10), (CS, b"c" * 10), (-1, b"d")]
        results = await img.write_batch(writes)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], InvalidRequestError)
        assert isinstance(results[3], InvalidRequestError)
        assert await img.read(0, 10) == b"a" * 10
        assert await img.read(CS, 10) == b"c" * 10
        assert (await check_image(img)).corruptions == 0

    with_image(path, body)


def test_write_batch_commits_consecutive_allocations_together(tmp_path: Path) -> None:
    """One data write for the new clusters of a group, one update for its table."""
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 * MiB, cluster_size=CS)
    calls: list[tuple[str, int, int]] = []

    async def body(img: QedImage) -> None:
        await img.write(0, b"first")  # NEED_CHECK and the table
        store = img.store
        writev = store.writev

        async def logged_writev(offset: int, buffers: Any) -> None:  # every store write
            calls.append(("writev", offset, sum(len(b) for b in buffers)))
            await writev(offset, buffers)

        store.writev = logged_writev  # type: ignore[method-assign]
        writes = [(k * 37 % 64 * CS, data(k, CS)) for k in range(1, 17)]
        assert await img.write_batch(writes) == [None] * 16
        del store.writev
        for offset, payload in writes:
            assert await img.read(offset, CS) == payload

    with_image(path, body)
    assert [size for _, _, size in calls] == [16 * CS, 512], calls  # data, one L2 sector


def _log_now(img: QedImage, calls: list[tuple[str, int, int]]) -> None:
    """Record the image's synchronous store writes in ``calls`` (name, offset, size)."""
    pwrite, pwritev = img._pwrite_now, img._pwritev_now
    assert pwrite is not None and pwritev is not None

    def logged_pwrite(offset: int, data: Any) -> None:
        calls.append(("pwrite", offset, len(data)))
        pwrite(offset, data)

    def logged_pwritev(offset: int, buffers: Any) -> None:
        calls.append(("pwritev", offset, sum(len(b) for b in buffers)))
        pwritev(offset, buffers)

    img._pwrite_now, img._pwritev_now = logged_pwrite, logged_pwritev


def test_write_batch_now_commits_a_run_of_allocations_as_one_group(tmp_path: Path) -> None:
    """One data write for the group's new clusters; its table entries in one write
    where they lie near each other, apart where they lie far apart."""
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 8 * MiB, cluster_size=CS)  # one table, 2048 entries
    calls: list[tuple[str, int, int]] = []

    async def body(img: QedImage) -> None:
        await img.write(0, b"first")  # NEED_CHECK and the table
        _log_now(img, calls)
        near = [(k * 37 % 64 * CS + CS, data(k, CS)) for k in range(14)]  # sector 0
        near.append((330 * CS, data(98, CS)))  # sector 5: rewriting 1-4 costs less
        far = [(2000 * CS, data(99, CS))]  # sector 31
        writes = near + far
        assert img.write_batch_now(writes) == 16
        for offset, payload in writes:
            assert await img.read(offset, CS) == payload
        report = await check_image(img)
        assert (report.corruptions, report.leaks, report.allocated_clusters) == (0, 0, 17)

    with_image(path, body)
    assert [(name, size) for name, _, size in calls] == [
        ("pwritev", 16 * CS),  # the data, 16 clusters at the end of the file
        ("pwrite", 6 * 512),  # sectors 0 to 5
        ("pwrite", 512),  # the far one's sector
    ], calls


def test_write_batch_now_stops_where_it_cannot_go_on(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 16 * MiB, cluster_size=CS)  # two tables' spans

    async def body(img: QedImage) -> None:
        assert img.write_batch_now([(0, b"a")]) == 0  # NEED_CHECK not set: general path
        await img.write(0, b"a")
        writes = [
            (CS, b"b" * 10),
            (CS + 20, b"c" * 10),  # the group's cluster: a new group, in place
            (2 * CS, b"d" * 10),
            (8 * MiB + 10, b"e"),  # no table yet: the general path from here on
            (3 * CS, b"f"),
        ]
        assert img.write_batch_now(writes) == 3
        assert await img.read(CS, 30) == b"b" * 10 + bytes(10) + b"c" * 10
        assert img.write_batch_now([(-1, b"x")]) == 0  # invalid: the general path says so
        assert img.write_batch_now([]) == 0

    with_image(path, body)


def test_write_batch_now_stops_at_a_store_error_and_the_general_path_redoes_it(
    tmp_path: Path,
) -> None:
    """A failing table write ends the batch at the group before it; the general
    path then does the group again and the image is whole (space may leak)."""
    from qedkit.errors import StoreError

    path = tmp_path / "a.qed"
    qedkit.create(str(path), 8 * MiB, cluster_size=CS)

    async def body(img: QedImage) -> None:
        await img.write(0, b"first")
        table = img.l1_table[0]
        pwrite = img._pwrite_now
        assert pwrite is not None
        failures = [1]

        def failing(offset: int, payload: Any) -> None:
            if offset >= table and offset < table + 4 * CS and failures:
                failures.pop()
                raise StoreError(f"injected at {offset}", filename=str(path))
            pwrite(offset, payload)

        img._pwrite_now = failing
        writes = [(10, b"in place"), (CS, data(1, CS)), (1500 * CS, data(2, CS))]
        done = img.write_batch_now(writes)
        assert done == 1  # the in-place write; the group's first table write failed
        assert await img.write_batch(writes[done:]) == [None, None]
        assert await img.read(10, 8) == b"in place"
        assert await img.read(CS, CS) == data(1, CS)
        assert await img.read(1500 * CS, CS) == data(2, CS)
        report = await check_image(img)
        assert report.corruptions == 0

    with_image(path, body)
