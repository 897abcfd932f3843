"""Streaming: copy into an image everything it still reads from its backing chain, then
drop the backing file, offline (``qed stream``) or while the image is served (the
``stream`` job of the control socket).

Theory of operation
-------------------
*Plan.* What must be copied is every cluster this image leaves UNALLOCATED over
which the chain below holds data: this layer's block status, and for its
unallocated runs the chain's map (engine.mapping, the one walk that ``qed map``
uses too), keeping the entries that are present and not zero, rounded out to whole
clusters. Ranges the chain reports as zeros (holes of a raw file or an NBD export,
zero clusters of a lower QED image) and ranges past the end of a shorter backing
image are left alone: they read zeros through the chain today and, unallocated,
they read zeros once the link is gone, so copying them would only cost L2 tables
and zero entries (QEMU's block-stream also copies only what the layers below
allocate). An HTTP base has no map: all of it is data, and its all-zero clusters
become zero clusters as they are copied.

*Copy.* The plan is walked in steps of ``chunk`` bytes (2 MiB by default), four in
flight. Each step is ``QedImage.copy_up``: read from the backing image with no lock
held; then, under the allocation lock, the clusters still unallocated get new
clusters holding the data (all-zero ones become zero clusters) and writes to exactly
those clusters stall. The steps' entries wait in a ``FillGroup``: every
COMMIT_BYTES (or COMMIT_SECONDS, or before a pause) one flush makes the data of all
of them durable, then their L2 entries are written and the stalls end
(``commit_fills``). A flush per 2 MiB step cost more than the copy (2 GiB from
nginx: 303 MB/s; 434 MB/s with groups; 679 MB/s without any flush, which is not
crash-safe). Guest I/O goes on meanwhile: reads and in-place writes never wait, a
write that reaches a cluster of a step first wins (the step skips every cluster that
is no longer unallocated when it holds the lock), and a write to a cluster of a
pending step waits for that group's commit only (at most COMMIT_SECONDS). No write
ever waits for the network.

*Drop.* When a fresh plan finds nothing left (the guest can never make a cluster
unallocated again, so nothing can reappear), ``QedImage.drop_backing_file`` flushes,
writes the header without the backing file in one sector write and flushes again
(the order of ``set_backing_file(None)``), and detaches the backing image.

*Stopping and resuming.* The job stops only between steps (pause, cancel, a
server shutting down); an error of the backing image (its server gone, a changed
size) fails the step before it wrote anything; a crash at any instant leaves every
cluster unallocated or complete (the crash suite sweeps it). Nothing is recorded
but the image itself, so a new run plans exactly what is still missing and goes on
from there.

*Rate and progress.* ``rate`` bounds the bytes read per second (as the defrag job's
rate does); progress counts the planned bytes done (copied or found allocated by
the guest meanwhile), and the ETA divides what is left by the speed so far, time
spent paused not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.base import BlockImage, ExtentKind
from ..engine.mapping import map_chain
from ..engine.qed import Filled, FillGroup, QedImage
from ..errors import InvalidRequestError, JobError, ReadOnlyError
from ..format.sizes import parse_size
from .base import Argument, Job

# Bytes per step, and steps in flight: a step's fixed cost (one flush, one L2 sector
# write) is spread over 32 clusters, and while the oldest step flushes (FileStore does
# it on a thread when offloading: qed serve, qed stream) the next ones read and write.
# Measured on 1 GiB from nginx over loopback, medians of 4 interleaved runs on a busy
# 2-vCPU machine: 2 steps of 4 MiB 0.51x curl's speed, 4 of 4 MiB 0.61x, 8 of 1 MiB
# 0.71x, 4 of 2 MiB 0.75x (0.69x in another run, against 0.47x for 2 of 4 MiB).
DEFAULT_CHUNK = 2 * 1024 * 1024
PIPELINE = 4
# A group of steps shares one flush: at most this many bytes, or this many seconds
# since its first step (a guest write to a cluster of a pending step waits that long).
COMMIT_BYTES = 128 * 1024 * 1024
COMMIT_SECONDS = 0.5
# Passes over fresh plans before giving up: the second finds nothing unless the
# backing chain changed its map under us.
MAX_PASSES = 3

Checkpoint = Callable[[int, int], Awaitable[None]]


@dataclass
class StreamStats:
    """What a stream run did (``as_dict`` is the JSON of ``qed stream`` and the
    job's result)."""

    backing_file: str | None = None  # the name the header held
    bytes_total: int = 0  # planned
    bytes_done: int = 0  # of those, done (copied, or allocated by the guest meanwhile)
    bytes_read: int = 0  # read from the backing chain
    data_clusters: int = 0  # written with data
    zero_clusters: int = 0  # made zero clusters (all-zero data)
    skipped_clusters: int = 0  # allocated by the guest before the step got to them
    passes: int = 0
    seconds: float = 0.0
    done: bool = False  # every cluster copied and the backing file dropped

    def add(self, filled: Filled) -> None:
        self.data_clusters += filled.data_clusters
        self.zero_clusters += filled.zero_clusters
        self.skipped_clusters += filled.skipped_clusters

    def as_dict(self) -> dict[str, object]:
        mbps = self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0
        return {
            "backing-file": self.backing_file,
            "bytes-total": self.bytes_total,
            "bytes-done": self.bytes_done,
            "bytes-read": self.bytes_read,
            "data-clusters": self.data_clusters,
            "zero-clusters": self.zero_clusters,
            "skipped-clusters": self.skipped_clusters,
            "passes": self.passes,
            "seconds": round(self.seconds, 3),
            "mb-per-second": round(mbps, 1),
            "done": self.done,
        }


async def plan(img: QedImage) -> list[tuple[int, int]]:
    """The guest ranges (start, end) still to copy: unallocated in ``img``, data in
    its backing chain, rounded out to whole clusters (the last one may end at the
    image end) and merged. Reads tables and the chain's map; writes nothing."""
    backing = img.backing
    if backing is None:
        return []
    geo = img.geo
    size = img.size
    out: list[tuple[int, int]] = []
    for ext in await img.block_status(0, size):
        if ext.kind is not ExtentKind.UNALLOCATED:
            continue
        covered = min(ext.end, backing.size)
        if covered <= ext.start:
            continue
        for entry in await map_chain(backing, ext.start, covered - ext.start):
            if not entry.present or entry.zero:
                continue
            a = geo.start_of_cluster(entry.start)
            b = min(geo.round_up(entry.end), size)
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return out


@dataclass
class Streamer:
    """Streams one open QED image (see the module docstring)."""

    img: QedImage
    chunk: int = DEFAULT_CHUNK
    rate: int = 0  # bytes read per second at most; 0: no limit
    stats: StreamStats = field(default_factory=StreamStats)
    # Asked before every checkpoint: a pause or a cancel is coming (the job's), so
    # pending fills are committed first and no write stall outlives the step.
    pausing: Callable[[], bool] = lambda: False
    _active_since: float = 0.0
    _paused: float = 0.0

    def __post_init__(self) -> None:
        cs = self.img.cluster_size
        if self.chunk < 1:
            raise InvalidRequestError(f"stream: chunk must be positive, not {self.chunk}")
        self.chunk = -(-self.chunk // cs) * cs  # whole clusters
        if self.rate < 0:
            raise InvalidRequestError(f"stream: rate must be >= 0, not {self.rate}")

    def active_seconds(self) -> float:
        """Time spent streaming so far, time paused not counted."""
        if not self._active_since:
            return 0.0
        return max(0.0, time.monotonic() - self._active_since - self._paused)

    def eta(self) -> float | None:
        """Seconds left at the speed so far (None before anything was done)."""
        done, total = self.stats.bytes_done, self.stats.bytes_total
        elapsed = self.active_seconds()
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (total - done) * elapsed / done)

    async def run(self, checkpoint: Checkpoint | None = None) -> StreamStats:
        """Copy everything still missing, then drop the backing file. ``checkpoint
        (done, total)`` is awaited before every step (a job pauses and is cancelled
        there). Errors of the backing image propagate: the image is consistent and
        a later run goes on where this one stopped."""
        img = self.img
        if img.readonly:
            raise ReadOnlyError("image is open read-only", filename=img.filename)
        if img.backing is None and img.header.has_backing_file:
            # Dropping the link now would lose every cluster still in the chain.
            raise JobError(f"{img.filename}: the backing file {img.backing_filename!r} is not open")
        stats = self.stats
        stats.backing_file = img.backing_filename
        self._active_since = time.monotonic()
        self._paused = 0.0

        group = FillGroup()
        group_since = 0.0

        async def commit(force: bool = False) -> None:
            if group and (
                force
                or group.bytes >= COMMIT_BYTES
                or time.monotonic() - group_since >= COMMIT_SECONDS
            ):
                stats.add(await img.commit_fills(group))

        async def check() -> None:
            await commit(force=self.pausing())
            if checkpoint is not None:
                t = time.monotonic()
                await checkpoint(stats.bytes_done, stats.bytes_total)
                self._paused += time.monotonic() - t

        bufs = [_buffer(self.chunk) for _ in range(PIPELINE)]
        views = [memoryview(b) for b in bufs]
        steps: deque[asyncio.Task[Filled]] = deque()
        turn = 0

        async def oldest() -> None:
            nonlocal group_since
            had = bool(group)
            stats.add(await steps.popleft())
            if group and not had:
                group_since = time.monotonic()

        try:
            while img.backing is not None:
                ranges = await plan(img)
                if not ranges:
                    break
                if stats.passes >= MAX_PASSES:
                    raise JobError(
                        f"{img.filename}: {len(ranges)} ranges still read from the backing "
                        f"chain after {MAX_PASSES} passes (did its map change?)"
                    )
                stats.passes += 1
                stats.bytes_total += sum(b - a for a, b in ranges)
                for a, b in ranges:
                    pos = a
                    while pos < b:
                        await check()
                        n = min(self.chunk, b - pos)
                        if len(steps) == PIPELINE:
                            await oldest()  # its buffer is the one to use next
                        steps.append(asyncio.ensure_future(img.copy_up(pos, n, views[turn], group)))
                        turn = (turn + 1) % PIPELINE
                        stats.bytes_read += n
                        stats.bytes_done += n
                        pos += n
                        await self._throttle(check)
                while steps:
                    await oldest()
                await commit(force=True)
            await check()
            if img.backing is not None:
                await img.drop_backing_file()
            stats.done = True
        finally:
            # Steps under way finish (a step is never abandoned half done); their
            # errors, after the first, are not news.
            while steps:
                with contextlib.suppress(Exception):
                    await oldest()
            await commit(force=True)  # what was copied stays copied; the stalls end
            stats.seconds = self.active_seconds()
            for view, buf in zip(views, bufs, strict=True):
                view.release()
                with contextlib.suppress(BufferError):
                    buf.close()
        return stats

    async def _throttle(self, check: Callable[[], Awaitable[None]]) -> None:
        """Sleep while ahead of the rate (checking for pause and cancel meanwhile)."""
        if self.rate <= 0:
            return
        while True:
            ahead = self.stats.bytes_read / self.rate - self.active_seconds()
            if ahead <= 0:
                return
            await asyncio.sleep(min(ahead, 0.05))
            await check()


def _buffer(size: int) -> mmap.mmap:
    """A page-aligned step buffer (unaligned large buffers copy slower: jobs.convert)."""
    return mmap.mmap(-1, size)


# ---- the online job ---------------------------------------------------------------


class StreamJob(Job):
    """``job-start type=stream``: stream a served image while clients use it.

    Arguments: ``argument_spec`` (rate, chunk). Progress events carry the ETA."""

    type = "stream"
    summary = (
        "copy every cluster the image still reads from its backing chain into it, "
        "then drop the backing file (a new run goes on where the last one stopped)"
    )
    argument_spec = (
        Argument("rate", "size", "bytes read per second at most (default 0: no limit)"),
        Argument(
            "chunk",
            "size",
            f"bytes copied per step (default {DEFAULT_CHUNK >> 20}M; whole clusters)",
        ),
    )
    streamer: Streamer | None = None

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``rate`` (bytes per second, "50M") and ``chunk`` at job-start."""
        names = cls.argument_names()
        for key in arguments:
            if key not in names:
                raise InvalidRequestError(f"stream: unknown argument {key!r} ({', '.join(names)})")
        try:
            rate = parse_size(str(arguments.get("rate", 0) or 0))
            chunk = parse_size(str(arguments.get("chunk", DEFAULT_CHUNK) or DEFAULT_CHUNK))
        except ValueError as exc:
            raise InvalidRequestError(f"stream: {exc}") from None
        if chunk < 1:
            raise InvalidRequestError("stream: chunk must be at least 1 byte")
        return {"rate": rate, "chunk": chunk}

    async def work(self) -> dict[str, Any]:
        image: BlockImage = self.image
        if not isinstance(image, QedImage):
            raise JobError(f"{image.filename}: only QED images have a backing file to stream")
        if image.readonly:
            raise JobError(f"{image.filename}: the export is read-only")
        self.streamer = Streamer(
            image,
            chunk=self.options["chunk"],
            rate=self.options["rate"],
            pausing=lambda: self.stopping,
        )
        stats = await self.streamer.run(checkpoint=self.checkpoint)
        return stats.as_dict()

    def progress_data(self) -> dict[str, Any]:
        data = super().progress_data()
        streamer = self.streamer
        if streamer is not None:
            eta = streamer.eta()
            elapsed = streamer.active_seconds()
            data["eta-seconds"] = None if eta is None else round(eta, 1)
            data["bytes-per-second"] = (
                round(streamer.stats.bytes_read / elapsed) if elapsed > 0 else 0
            )
        return data
