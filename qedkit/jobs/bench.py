"""A request benchmark through the engine, in the spirit of ``qemu-img bench``.

References: qemu-img(1) "bench"; QEMU qemu-img.c (img_bench, bench_cb).

Theory of operation
-------------------
``count`` requests of ``size`` bytes go to the image through its driver (the same
read and write paths as ``qed serve`` and the Python API: lookups, the L2 cache,
allocating writes under the allocation lock, copy-on-write). ``depth`` worker
coroutines each keep one request in flight, each with its own page-aligned buffer
(written with ``pattern`` for writes), so that with O_DIRECT (``direct``, qemu-img's
``-t none``) the data goes straight to the disk. Offsets advance by ``step`` from
``offset`` and wrap as qemu-img's do (modulo the image size).
With a local file through the page cache every request completes inline (engine
design: syscalls are made in the coroutine), so the workers take turns rather than
overlap; with O_DIRECT the store is told to ``offload`` (its direct reads and writes
wait for the disk on worker threads), so ``depth`` requests are really in flight, as
in QEMU's thread pool. Writes end with a flush,
inside the timed run (and every ``flush_interval`` writes if given).

Failure guarantee: reads change nothing; writes write only the pattern at the
requested offsets (an error stops the run and is raised).
"""

from __future__ import annotations

import asyncio
import mmap
import time
from dataclasses import dataclass

from ..engine.base import BlockImage
from ..errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class BenchResult:
    requests: int
    request_size: int
    depth: int
    write: bool
    seconds: float

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.requests * self.request_size / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "request-size": self.request_size,
            "depth": self.depth,
            "write": self.write,
            "seconds": round(self.seconds, 6),
            "iops": round(self.iops, 1),
            "mb-per-second": round(self.mb_per_second, 1),
        }


def offsets(image_size: int, size: int, count: int, offset: int, step: int) -> list[int]:
    """The request offsets: from ``offset`` by ``step``, modulo the image size as
    qemu-img bench takes them (a request that then crosses the end fails there too)."""
    out = []
    pos = offset
    for _ in range(count):
        out.append(pos)
        pos = (pos + step) % image_size
    return out


async def bench(
    img: BlockImage,
    *,
    count: int = 75000,
    size: int = 4096,
    depth: int = 64,
    write: bool = False,
    pattern: int = 0,
    offset: int = 0,
    step: int | None = None,
    flush_interval: int = 0,
) -> BenchResult:
    """Run the benchmark on ``img`` (see the module docstring)."""
    step = size if step is None else step
    if count < 1 or size < 1 or depth < 1 or step < 0 or offset < 0:
        raise InvalidRequestError(
            "count, size and depth must be positive, step and offset not negative",
            filename=img.filename,
        )
    if offset + size > img.size:
        raise InvalidRequestError(
            f"a request of {size} bytes at {offset} is outside the image ({img.size} bytes)",
            filename=img.filename,
        )
    plan = offsets(img.size, size, count, offset, step)
    crossing = next((p for p in plan if p + size > img.size), None)
    if crossing is not None:
        raise InvalidRequestError(
            f"the request at {crossing} would cross the end of the image ({img.size} bytes): "
            "choose a step that divides the image size",
            filename=img.filename,
        )
    store = img.store
    if getattr(store, "direct_fd", None) is not None and hasattr(store, "offload"):
        store.offload = True
    buffers = [mmap.mmap(-1, max(size, mmap.PAGESIZE)) for _ in range(min(depth, count))]
    for buf in buffers:
        if pattern:
            buf.write(bytes([pattern]) * size)
    views = [memoryview(b)[:size] for b in buffers]
    next_index = 0
    writes = 0

    async def worker(view: memoryview) -> None:
        nonlocal next_index, writes
        while next_index < count:
            pos = plan[next_index]
            next_index += 1
            if write:
                await img.write(pos, view)
                writes += 1
                if flush_interval and writes % flush_interval == 0:
                    await img.flush()
            else:
                await img.readinto(pos, view)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(v) for v in views))
        if write:
            await img.flush()
    finally:
        seconds = time.perf_counter() - started
        for view in views:
            view.release()
        for buf in buffers:
            buf.close()
    return BenchResult(count, size, depth, write, seconds)
