"""Crash tests of copy-on-read and streaming (engine.qed.io copy_up, jobs.stream, and
the backing-link drop of QedImage.drop_backing_file).

Workloads over a raw backing file (4 KiB clusters, table_size 2: 4 MiB per L2 table),
built through crashkit.Workload on a CrashStore:

* ``cor_reads``: copy-on-read reads inside one cluster, across several (all-zero
  clusters among them: zero clusters), across an L2 table boundary (a new table),
  past the end of the backing file up to a partial last cluster, over clusters that
  are already allocated (nothing to do), between guest writes and flushes;
* ``stream_full``: guest writes and a copy-on-read read, then a stream (fills in
  steps of 8 clusters, the flush, the header without the backing file, the flush),
  then allocating writes under the no-backing rules (NEED_CHECK);
* ``stream_resumed``: a stream stopped after three steps, a guest write, a second
  stream that copies the rest and drops the link;
* ``stream_with_guest_writes``: guest writes between the steps of a stream (into
  clusters not copied yet, and into copied ones).

Every crash point, every whole-write state (or up to 32 torn-sector states) at each,
is recovered by a read-write open and judged by crashkit.verify_state (0 lost, 0
corrupt; the header shows the backing file before or after the drop and nothing
else; unallocated clusters read the backing file that header names), with
``qemu-img check`` on the repaired images. The last test shows that the checks catch
a drop that writes the header before the fills' entries are durable.

Totals lines as in test_workloads.py (printed with -s and in the terminal summary).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    CS,
    L2_SPAN,
    QemuChecker,
    Scenario,
    Workload,
    assert_totals,
    crash_all,
    final_image,
    pattern,
    run,
    scaled,
)

from qedkit.engine.qed import QedImage
from qedkit.jobs.base import JobCancelled
from qedkit.jobs.stream import Streamer

Record = Callable[[str], None]
WorkloadFn = Callable[[], Coroutine[Any, Any, Scenario]]
WORKLOADS: dict[str, WorkloadFn] = {}


def workload(fn: WorkloadFn) -> WorkloadFn:
    WORKLOADS[fn.__name__] = fn
    return fn


@functools.cache
def scenario(name: str) -> Scenario:
    return run(WORKLOADS[name]())


def backing_file(size: int, seed: int) -> bytes:
    """A pattern with clusters 5-7 all zeros (they become zero clusters)."""
    data = bytearray(pattern(seed, size))
    data[5 * CS : 8 * CS] = bytes(3 * CS)
    return bytes(data)


@workload
async def cor_reads() -> Scenario:
    size = L2_SPAN + 6 * CS + 1024  # a second L2 table, a partial last cluster
    backing = backing_file(L2_SPAN + 3 * CS, 70)  # ends before the image does
    w = await Workload.create("cor.qed", size, backing=backing)
    await w.write(CS + 100, pattern(71, 200))  # copy-on-write
    await w.cor_read(3 * CS + 10, 100)  # inside cluster 3
    await w.cor_read(4 * CS, 5 * CS)  # 4, zeros 5-7, 8
    await w.flush()
    await w.cor_read(CS, 3 * CS)  # 1 allocated, 2 copied, 3 allocated
    await w.cor_read(L2_SPAN - CS - 7, 2 * CS)  # across the table boundary: a new table
    await w.write(4 * CS + 5, pattern(72, 30))  # in place into a copied cluster
    await w.cor_read(L2_SPAN + 2 * CS, size - L2_SPAN - 2 * CS)  # past the backing end
    return w.scenario()


def _streamer(w: Workload) -> Streamer:
    return Streamer(w.img, chunk=8 * CS)


@workload
async def stream_full() -> Scenario:
    size = 40 * CS + 512
    w = await Workload.create("stream.qed", size, backing=backing_file(36 * CS, 80))
    await w.write(2 * CS + 300, pattern(81, 500))
    await w.cor_read(20 * CS, 2 * CS)
    await w.flush()
    await w.write(30 * CS + 7, pattern(82, 100))  # unflushed when the stream starts
    await w.stream(_streamer(w))
    await w.write(38 * CS + 3, pattern(83, 300))  # no backing now: NEED_CHECK
    await w.flush()
    await w.write(10 * CS, pattern(84, CS))  # in place
    await w.write(39 * CS, pattern(85, 100))
    return w.scenario()


@workload
async def stream_resumed() -> Scenario:
    size = 32 * CS
    w = await Workload.create("resumed.qed", size, backing=backing_file(size, 90))
    steps = 0

    async def stop_after_three(done: int, total: int) -> None:
        nonlocal steps
        steps += 1
        if steps > 3:
            raise JobCancelled

    await w.stream(_streamer(w), stop_after_three)
    await w.write(29 * CS + 50, pattern(91, 80))
    await w.stream(_streamer(w))
    await w.write(3 * CS, pattern(92, 64))
    return w.scenario()


@workload
async def stream_with_guest_writes() -> Scenario:
    size = 32 * CS
    w = await Workload.create("between.qed", size, backing=backing_file(size, 100))
    steps = 0

    async def guest(done: int, total: int) -> None:
        nonlocal steps
        steps += 1
        if steps == 2:
            await w.write(20 * CS + 10, pattern(101, 40))  # not copied yet
            await w.write(2 * CS, pattern(102, CS))  # copied already: in place
        if steps == 3:
            await w.zero(26 * CS, 2 * CS)  # zero clusters the stream must not copy over

    await w.stream(_streamer(w), guest)
    return w.scenario()


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_crash_state_recovers(
    name: str, torn: bool, qemu: Any, tmp_path: Path, crash_summary: Record
) -> None:
    sc = scenario(name)
    checker = QemuChecker(qemu, tmp_path, sc, every=1 if not torn else 4)
    totals = crash_all(sc, torn=torn, max_states=scaled(32) if torn else None, checker=checker)
    summary = totals.line(f"{sc.name} {'torn' if torn else 'whole'}")
    crash_summary(summary)
    assert totals.qemu_checks > 0
    assert_totals(totals, summary)


# ---- the workloads do what they claim ------------------------------------------------


def test_the_workloads_copy_and_drop_as_they_claim() -> None:
    cor = final_image(scenario("cor_reads"))
    assert cor.backing_filename == "base.raw"
    statuses = [run(cor.block_status(c * CS, CS))[0].kind.value for c in range(1, 10)]
    assert statuses == ["data"] * 4 + ["zero"] * 3 + ["data", "unallocated"]
    assert cor.l1_table[1] != 0  # the read across the boundary made the second table
    for name in ("stream_full", "stream_resumed", "stream_with_guest_writes"):
        img = final_image(scenario(name))
        assert img.backing_filename is None and not img.header.has_backing_file, name
    resumed = scenario("stream_resumed")
    assert [op.kind for op in resumed.ops] == ["cor", "write", "backing", "write"]
    kinds = [op.kind for op in scenario("stream_with_guest_writes").ops]
    assert kinds == ["write", "write", "zero", "backing"]
    between = final_image(scenario("stream_with_guest_writes"))
    zeros = run(between.block_status(26 * CS, 2 * CS))
    assert [e.kind.value for e in zeros] == ["zero"]  # the guest's zero clusters stayed


def test_the_checks_catch_a_drop_before_the_fills_are_durable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writing the header without the backing file before flushing the fills' L2
    entries lets a crash persist the header alone: the clusters then read zeros
    instead of the backing file's data. The checks must say so."""
    from dataclasses import replace

    from qedkit.format.header import Feature

    async def header_first(self: QedImage) -> None:
        header = replace(
            self.header.with_features(clear=Feature.BACKING_FILE | Feature.BACKING_FORMAT_NO_PROBE),
            backing_filename_size=0,
        )
        await self._write_header(header, flush=True)  # no flush before it
        self.backing_filename = None
        self.backing = None

    monkeypatch.setattr(QedImage, "drop_backing_file", header_first)

    async def build() -> Scenario:
        w = await Workload.create("header-first.qed", 16 * CS, backing=backing_file(16 * CS, 110))
        await w.stream(Streamer(w.img, chunk=16 * CS))
        return w.scenario()

    sc = run(build())
    totals = crash_all(sc, torn=False)
    print("\n" + totals.line("drop before the fills are durable (must fail)"))
    assert totals.corrupt > 0 and not totals.ok
    assert any("reads" in f for f in totals.failures)


def test_sizes_of_the_workloads() -> None:
    """Small enough to crash at every point: a few hundred store ops at most."""
    for name in WORKLOADS:
        sc = scenario(name)
        assert sc.crash.crash_points() < 400, (name, sc.crash.crash_points())
