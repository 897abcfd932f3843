"""Streaming (jobs.stream): everything the chain still holds for an overlay ends up in
it, all-zero clusters as zero clusters and the chain's holes left alone; then the
backing file is gone from the header. A guest write racing a step wins; a run that
stops leaves the link and a consistent image, and the next run copies only what is
missing; the rate and the progress (with its ETA) are kept; the job runs through a
JobManager as the control socket runs it. The CLI and real servers are in
tests/e2e/test_e2e_stream.py."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from streamkit import CS, DATA, UNALLOCATED, ZERO, Gate, MiB, base_bytes, kinds, overlay, run

import qedkit
from qedkit.engine.chain import open_image, open_qed
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.errors import InvalidRequestError, JobError, ReadOnlyError
from qedkit.format.header import Feature
from qedkit.jobs.base import JobCancelled, JobManager, JobStatus
from qedkit.jobs.stream import Streamer, StreamJob, plan
from qedkit.store import MemoryStore


async def expect_standalone(img: QedImage, want: bytes) -> None:
    """No backing file in the header, none attached; reads ``want``; checks clean."""
    assert img.backing is None
    assert not img.header.has_backing_file
    assert not img.header.has(Feature.BACKING_FORMAT_NO_PROBE)
    assert img.backing_filename is None
    assert await img.read(0, img.size) == want
    report = await check_image(img)
    assert (report.corruptions, report.leaks) == (0, 0)


def test_streaming_copies_the_base_and_drops_the_backing_file() -> None:
    base = base_bytes(2 * MiB)

    async def go() -> None:
        img = await overlay(base, 2 * MiB + 3 * CS, cor=False)
        await img.write(CS + 7, b"\x11" * 300)  # the guest's data stays the guest's
        want = bytearray(base + bytes(3 * CS))
        want[CS + 7 : CS + 307] = b"\x11" * 300
        stats = await Streamer(img, chunk=5 * CS).run()
        assert stats.done and stats.passes == 1
        assert stats.backing_file == "base.raw"
        clusters = 2 * MiB // CS
        assert stats.bytes_total == stats.bytes_read == (clusters - 1) * CS
        assert (stats.data_clusters, stats.zero_clusters) == (clusters - 3, 2)
        await expect_standalone(img, bytes(want))
        statuses = await kinds(img)
        assert statuses[4:6] == [ZERO, ZERO]  # the base's written zeros
        assert statuses[clusters:] == [UNALLOCATED] * 3  # past the base's end: left alone
        # on disk: the header, read back from the store
        header, area = await QedImage.read_header(img.store)
        assert not header.has_backing_file and header.backing_filename(area) is None
        await img.close()

    run(go())


def test_the_chain_s_holes_and_zero_clusters_are_left_alone() -> None:
    """top -> mid.qed (data, a zero cluster hiding base data, unallocated) -> base.qed
    (data in clusters 8-11, nothing elsewhere): only what is data below is copied.
    (Holes of a sparse raw file: tests/e2e/test_e2e_stream.py.)"""

    async def go() -> None:
        size = 16 * CS
        base_store = MemoryStore(name="base.qed")
        await QedImage.format_store(base_store, size)
        header, area = await QedImage.read_header(base_store)
        base = await open_qed(base_store, header, area, backing=None, readonly=False)
        base_data = random.Random(1).randbytes(4 * CS)
        await base.write(8 * CS, base_data)
        mid_store = MemoryStore(name="mid.qed")
        await QedImage.format_store(mid_store, size, backing_name="base.qed")
        header, area = await QedImage.read_header(mid_store)
        mid = await open_qed(mid_store, header, area, backing=base, readonly=False)
        await mid.write(0, b"\x22" * CS)  # cluster 0: data in mid
        await mid.write_zeroes(9 * CS, CS)  # cluster 9: zeros over base data
        img = await overlay(mid, size, cor=False)
        want = bytearray(size)
        want[8 * CS : 12 * CS] = base_data
        want[0:CS] = b"\x22" * CS
        want[9 * CS : 10 * CS] = bytes(CS)
        assert await plan(img) == [(0, CS), (8 * CS, 9 * CS), (10 * CS, 12 * CS)]
        stats = await Streamer(img).run()
        assert stats.bytes_read == 4 * CS and stats.data_clusters == 4
        assert await kinds(img) == (
            [DATA] + [UNALLOCATED] * 7 + [DATA, UNALLOCATED, DATA, DATA] + [UNALLOCATED] * 4
        )
        await expect_standalone(img, bytes(want))
        await img.close()

    run(go())


def test_a_stopped_run_keeps_the_link_and_the_next_one_copies_only_the_rest() -> None:
    base = base_bytes(2 * MiB)

    async def go() -> None:
        img = await overlay(base, 2 * MiB, cor=False)
        steps = 0

        async def cancel_after_three(done: int, total: int) -> None:
            nonlocal steps
            steps += 1
            if steps > 3:
                raise JobCancelled

        first = Streamer(img, chunk=4 * CS)
        with pytest.raises(JobCancelled):
            await first.run(checkpoint=cancel_after_three)
        assert first.stats.bytes_read == 12 * CS and not first.stats.done
        assert img.backing is not None and img.header.has_backing_file
        assert (await check_image(img)).corruptions == 0
        second = await Streamer(img, chunk=4 * CS).run()
        assert second.bytes_total == 2 * MiB - 12 * CS  # only what was still missing
        await expect_standalone(img, base)
        await img.close()

    run(go())


def test_a_guest_write_racing_a_step_wins() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        gate = Gate(base)
        img = await overlay(gate, MiB, cor=False)
        task = asyncio.ensure_future(Streamer(img, chunk=MiB).run())
        await gate.reading.wait()  # the one step is reading the whole base
        await img.write(7 * CS, b"\x33" * CS)  # whole clusters: no copy-on-write read
        await img.write(9 * CS, b"\x44" * (2 * CS))
        gate.opened.set()
        stats = await task
        assert stats.skipped_clusters == 3 and stats.done
        want = bytearray(base)
        want[7 * CS : 8 * CS] = b"\x33" * CS
        want[9 * CS : 11 * CS] = b"\x44" * (2 * CS)
        await expect_standalone(img, bytes(want))
        await img.close()

    run(go())


def test_the_backing_image_is_closed_once_reads_of_it_are_done() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        gate = Gate(base)
        img = await overlay(gate, MiB, cor=False)
        gate.opened.set()
        await Streamer(img, chunk=MiB).run()  # everything copied, the link dropped
        assert gate.closed

        gate2 = Gate(base)
        img2 = await overlay(gate2, MiB, cor=False)
        reader = asyncio.ensure_future(img2.read(0, CS))  # a guest read in flight below
        await gate2.reading.wait()
        dropping = asyncio.ensure_future(img2.drop_backing_file())
        await asyncio.sleep(0.01)
        assert img2.backing is None and not img2.header.has_backing_file
        assert not gate2.closed and not dropping.done()  # waits for the read
        gate2.opened.set()
        assert await reader == base[:CS]
        await dropping
        assert gate2.closed
        await img.close()
        await img2.close()

    run(go())


def test_nothing_to_do_without_a_backing_file_and_a_refusal_when_it_is_not_open(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        img = await overlay(None, MiB, cor=False)
        stats = await Streamer(img).run()
        assert stats.done and stats.bytes_read == 0 and stats.backing_file is None
        await img.close()

    run(go())
    (tmp_path / "base.raw").write_bytes(base_bytes(MiB))
    top = tmp_path / "top.qed"
    qedkit.create(str(top), backing_file="base.raw", backing_format="raw")
    img = run(open_image(str(top), backing_chain=False))
    try:
        assert isinstance(img, QedImage)
        with pytest.raises(JobError, match="is not open"):
            run(Streamer(img).run())
        assert img.header.has_backing_file
    finally:
        run(img.close())
    ro = run(open_image(str(top), readonly=True))
    try:
        assert isinstance(ro, QedImage)
        with pytest.raises(ReadOnlyError):
            run(Streamer(ro).run())
    finally:
        run(ro.close())


def test_the_rate_is_kept() -> None:
    base = base_bytes(MiB)

    async def go() -> float:
        img = await overlay(base, MiB, cor=False)
        started = time.monotonic()
        await Streamer(img, chunk=2 * CS, rate=4 * MiB).run()
        elapsed = time.monotonic() - started
        await img.close()
        return elapsed

    # 1 MiB at 4 MiB/s: at least a quarter second (a bound, not a speed figure)
    assert run(go()) >= 0.24


def test_progress_counts_planned_bytes_and_the_eta_excludes_pauses() -> None:
    base = base_bytes(MiB)

    async def go() -> None:
        img = await overlay(base, MiB, cor=False)
        streamer = Streamer(img, chunk=4 * CS)
        seen: list[tuple[int, int, float | None]] = []

        async def checkpoint(done: int, total: int) -> None:
            seen.append((done, total, streamer.eta()))
            if len(seen) == 2:
                await asyncio.sleep(0.2)  # "paused"

        await streamer.run(checkpoint=checkpoint)
        assert [d for d, _, _ in seen] == [k * 4 * CS for k in range(4)] + [MiB]
        assert {t for _, t, _ in seen} == {MiB}
        assert seen[0][2] is None and seen[-1][2] == 0.0
        assert streamer.stats.seconds < 0.2  # the pause is not streaming time
        await img.close()

    run(go())


def test_chunks_are_whole_clusters_and_bad_arguments_are_refused() -> None:
    async def go() -> None:
        img = await overlay(base_bytes(MiB), MiB, cor=False)
        assert Streamer(img, chunk=CS + 1).chunk == 2 * CS
        with pytest.raises(InvalidRequestError):
            Streamer(img, chunk=0)
        await img.close()

    run(go())
    assert StreamJob.parse_arguments({"rate": "50M", "chunk": "1M"}) == {
        "rate": 50 * MiB,
        "chunk": MiB,
    }
    with pytest.raises(InvalidRequestError, match="unknown argument 'speed'"):
        StreamJob.parse_arguments({"speed": 1})
    with pytest.raises(InvalidRequestError, match="stream:"):
        StreamJob.parse_arguments({"rate": "fast"})


def test_the_stream_job_reports_progress_with_an_eta_and_its_result() -> None:
    base = base_bytes(2 * MiB)
    events: list[tuple[str, dict[str, Any]]] = []

    async def go() -> None:
        img = await overlay(base, 2 * MiB, cor=False)
        manager = JobManager(lambda name, data: events.append((name, data)))
        manager.register(StreamJob)
        job = manager.start("stream", "", img, {"chunk": "64k", "rate": "2M"})
        assert job.task is not None
        await job.task  # a second: progress events every half second
        assert job.status is JobStatus.CONCLUDED, job.error
        assert job.result is not None and job.result["done"] is True
        assert job.result["bytes-read"] == 2 * MiB
        assert img.backing is None
        await img.close()

    run(go())
    progress = [data for name, data in events if name == "JOB_PROGRESS"]
    assert progress, events
    assert {"eta-seconds", "bytes-per-second", "current", "total"} <= set(progress[-1])
    assert any(p["eta-seconds"] is not None for p in progress)


def test_a_cancelled_job_leaves_the_link_and_a_consistent_image() -> None:
    base = base_bytes(2 * MiB)

    async def go() -> None:
        img = await overlay(base, 2 * MiB, cor=False)
        manager = JobManager(lambda name, data: None)
        manager.register(StreamJob)
        job = manager.start("stream", "", img, {"chunk": "64k", "rate": "1M"})
        await asyncio.sleep(0.15)
        job.pause()
        await asyncio.sleep(0.1)
        done_paused = job.current
        await asyncio.sleep(0.1)
        assert job.current == done_paused  # paused means no step
        job.resume()
        await asyncio.sleep(0.05)
        job.cancel()
        assert job.task is not None
        await job.task
        assert job.status is JobStatus.CANCELLED
        assert img.backing is not None and img.header.has_backing_file
        assert (await check_image(img)).corruptions == 0
        assert await img.read(0, img.size) == base
        stats = await Streamer(img).run()  # the next run finishes the job
        assert 0 < stats.bytes_total < 2 * MiB
        await expect_standalone(img, base)
        await img.close()

    run(go())


def test_steps_share_a_flush_and_no_stall_outlives_a_pause() -> None:
    """The steps' entries wait in a group for one flush (not one per step); when a
    pause is coming, the group is committed first, so that no guest write to a copied
    cluster waits for the pause to end."""
    base = base_bytes(2 * MiB)

    async def go() -> None:
        img = await overlay(base, 2 * MiB, cor=False)
        flushes = 0
        real_flush = img.store.flush

        async def counting_flush() -> None:
            nonlocal flushes
            flushes += 1
            await real_flush()

        img.store.flush = counting_flush  # type: ignore[method-assign]
        steps = 2 * MiB // (2 * CS)
        stats = await Streamer(img, chunk=2 * CS).run()
        assert stats.done
        assert flushes <= 4, f"{flushes} flushes for {steps} steps"  # group, drop

        img2 = await overlay(base, 2 * MiB, cor=False)
        pausing = False
        seen: list[list[int]] = []

        async def checkpoint(done: int, total: int) -> None:
            nonlocal pausing
            if pausing:
                seen.append(img2.stalled_clusters)  # what a paused job would hold
            pausing = done >= total // 2

        await Streamer(img2, chunk=2 * CS, pausing=lambda: pausing).run(checkpoint)
        assert seen and all(s == [] for s in seen), seen[:3]
        await expect_standalone(img2, base)
        await img.close()
        await img2.close()

    run(go())
