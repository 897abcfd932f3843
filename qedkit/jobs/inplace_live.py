"""Live in-place conversion: a qcow2 image served read-write becomes QED while a
client keeps reading and writing it (``qed serve --convert-qcow2``, the
``convert-to-qed`` job).

Theory of operation
-------------------
qedkit does not write qcow2 metadata (no refcounts, no COPIED bits, no L2 updates):
writing qcow2 natively would mean a second allocator and a second set of crash
rules, for an image that is about to stop being qcow2. Instead ``LiveConversion``
serves the qcow2 image through a plan made when it is opened
(jobs.inplace ``InPlaceConverter.plan``, which also refuses what cannot be
converted, before anything is served):

* **reads** go to the qcow2 driver until the switch, to the QED image after it;
* **writes into clusters the plan reuses** (fully allocated data clusters, whose
  host bytes are the same in both formats) go in place at once: that is a valid
  qcow2 write (the cluster is allocated and, with no snapshot, its refcount is 1)
  and it is already where the QED tables will point;
* **every other write** (into unallocated, zero, compressed or partly allocated
  clusters, discards excepted: advisory, ignored until then) is held until the
  switch and then goes to the QED image, whose allocating write path does it. A
  held write is not acknowledged, so a flush never has to cover it; nothing that a
  client was told is written can be lost by a crash before the switch.

``convert`` (the job) writes the QED tables past the end of the file (reads and
in-place writes go on), then stops taking new requests in qcow2 mode, waits for the
ones in flight, writes the header sector, opens the QED image over the same store,
and hands every held and new request to it (``on_switch`` callbacks let the server
serve the QED image directly from then on). The reclaim then runs online: the
mover's per-cluster write stalls keep guest writes and cluster moves apart.

Crash safety is jobs.inplace's: before the switch the file is the qcow2 image (with
the in-place writes, which qcow2 itself would have made the same way), after it the
QED image. Images with internal snapshots or bitmaps are refused (even with
``--discard-snapshots``, offline only): an in-place write into a cluster a snapshot
shares would change the snapshot before the switch, and a bitmap would miss it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..engine.base import BlockImage, Extent, ImageInfo
from ..engine.qcow2 import Qcow2Image
from ..engine.qed import QedImage
from ..errors import (
    CorruptImageError,
    InvalidRequestError,
    JobError,
    StoreError,
    UnsupportedFeatureError,
)
from ..format import qcow2 as q
from ..format.sizes import parse_size
from ..store.base import Buffer
from .base import Argument, Job
from .inplace import (
    Checkpoint,
    ConversionPlan,
    ConversionReport,
    InPlaceConverter,
    Reclaim,
    no_checkpoint,
    reclaim_and_report,
)


class LiveConversion(BlockImage):
    """A qcow2 image served read-write until ``convert`` makes it QED (see the
    module docstring). Build with ``prepare``."""

    def __init__(self, src: Qcow2Image, converter: InPlaceConverter) -> None:
        self.src = src
        self.converter = converter
        self.filename = src.filename
        self.format_name = "qcow2"
        self.readonly = False
        self.store = src.store
        self.backing = src.backing
        self.qed: QedImage | None = None
        self.on_switch: list[Callable[[QedImage], None]] = []
        self._busy = 0  # requests running in qcow2 mode
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Event()  # set at the switch, or when held writes must fail
        self._switching = False
        self._failed: str | None = None
        self._converting = False
        # Requests before the switch: written in place at once, or held for it.
        self.in_place_writes = 0
        self.held_requests = 0

    @classmethod
    async def prepare(cls, src: Qcow2Image) -> LiveConversion:
        """Plan the conversion of ``src`` (opened on a writable store, engine.chain
        ``open_for_conversion``); refuses (UnsupportedFeatureError, CorruptImageError)
        what cannot be converted, and images with snapshots or bitmaps, before
        anything is served. Writes nothing."""
        h = src.header
        ext = src.meta.extensions.bitmaps
        if h.nb_snapshots or (ext is not None and ext.nb_bitmaps):
            raise UnsupportedFeatureError(
                "a qcow2 image with internal snapshots or persistent bitmaps cannot be "
                "converted while it is served (in-place writes would change what they "
                "hold); convert it offline: qed convert --in-place --discard-snapshots",
                filename=src.filename,
                field="nb_snapshots",
                offset=q.FIELD_OFFSETS["nb_snapshots"],
            )
        converter = InPlaceConverter(src)
        plan = await converter.plan()
        shared = plan.stats.copy_reasons.get("shared", 0)
        if plan.overlaps is None:
            raise CorruptImageError(
                "the qcow2 metadata cannot be listed, so in-place writes cannot be known "
                "not to hit it; convert the image offline",
                filename=src.filename,
            )
        if shared or plan.overlaps:
            raise CorruptImageError(
                f"{shared + plan.overlaps} data clusters share their host cluster with other "
                "data, compressed clusters or metadata, so writing them in place would change "
                "those too; repair the image (qemu-img check -r all) or convert it offline",
                filename=src.filename,
            )
        return cls(src, converter)

    @property
    def plan(self) -> ConversionPlan:
        return self.converter.planned

    @property
    def size(self) -> int:
        return self.src.size

    @property
    def cluster_size(self) -> int | None:
        return self.qed.cluster_size if self.qed is not None else self.src.cluster_size

    # ======================================================================
    # which image serves a request
    # ======================================================================

    def _enter(self) -> bool:
        """True: the request runs on the qcow2 image (counted until ``_leave``)."""
        if self.qed is None and not self._switching and self._failed is None:
            self._busy += 1
            self._idle.clear()
            return True
        return False

    def _leave(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def _target(self) -> QedImage:
        """The QED image, once there is one (a held request waits here)."""
        if self.qed is None:
            self.held_requests += 1
        while self.qed is None:
            if self._failed is not None:
                raise StoreError(self._failed, filename=self.filename)
            await self._changed.wait()  # set once, for good: the switch or a failure
        return self.qed

    def _in_place(self, offset: int, length: int) -> bool:
        """Every guest cluster of the range keeps its host cluster in the plan."""
        if length <= 0:
            return False
        plan = self.plan
        bits = plan.geometry.cluster_bits
        return all(
            plan.is_reused(g) for g in range(offset >> bits, ((offset + length - 1) >> bits) + 1)
        )

    def release_held(self, why: str = "the server is stopping") -> None:
        """Held writes (and any later request) fail with ``why`` unless the image is
        QED already (the server calls this when it stops)."""
        if self.qed is None and self._failed is None:
            self._failed = f"{why}: the write waited for the qcow2 -> QED conversion"
        self._changed.set()

    # ======================================================================
    # I/O
    # ======================================================================

    def read_now(self, offset: int, length: int) -> bytes | None:
        if self.qed is not None:
            return self.qed.read_now(offset, length)
        if self._switching or self._failed is not None:
            return None
        return self.src.read_now(offset, length)

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        if self.qed is not None:
            return self.qed.readinto_now(offset, view)
        if self._switching or self._failed is not None:
            return False
        return self.src.readinto_now(offset, view)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        if self._enter():
            try:
                await self.src.readinto(offset, buf)
            finally:
                self._leave()
            return
        await (await self._target()).readinto(offset, buf)

    def write_now(self, offset: int, data: Buffer) -> bool:
        return self.qed.write_now(offset, data) if self.qed is not None else False

    def write_batch_now(self, writes: Sequence[tuple[int, Buffer]]) -> int:
        return self.qed.write_batch_now(writes) if self.qed is not None else 0

    async def _through(self, offset: int, length: int, data: memoryview | None) -> None:
        """Write (or zero) reused clusters at their host offsets, qcow2's and QED's."""
        async for run in self.src.iter_runs(offset, length):
            if run.kind is not q.SubclusterType.NORMAL or run.host_offset is None:
                raise JobError(  # the plan said reused: a bug if it is not data
                    f"guest range {run.start}+{run.length} is not data in place",
                    filename=self.filename,
                )
            if data is None:
                await self.store.write_zeroes(run.host_offset, run.length)
            else:
                await self.store.write(run.host_offset, data[run.start - offset : run.end - offset])

    async def _wrote_in_place(self, offset: int, length: int, data: memoryview | None) -> bool:
        """Before the switch, write (or zero) a range of reused clusters in place (see
        ``_through``); False (nothing done) when the range is not all reused or the
        image is switching: the request goes to the QED image."""
        if self.qed is None and self._in_place(offset, length) and self._enter():
            self.in_place_writes += 1
            try:
                await self._through(offset, length, data)
            finally:
                self._leave()
            return True
        return False

    async def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not await self._wrote_in_place(offset, len(view), view):
            await (await self._target()).write(offset, view)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_range(offset, length)
        if not await self._wrote_in_place(offset, length, None):
            await (await self._target()).write_zeroes(offset, length, unmap=unmap)

    async def discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self.qed is not None:
            await self.qed.discard(offset, length)
        # before the switch: advisory, nothing done (the data stays readable)

    async def flush(self) -> None:
        if self._enter():
            try:
                await self.store.flush()
            finally:
                self._leave()
            return
        # during the switch: the QED image's flush (after the switch's own) covers
        # every write completed before this flush
        await (await self._target()).flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self._enter():
            try:
                return await self.src.block_status(offset, length)
            finally:
                self._leave()
        return await (await self._target()).block_status(offset, length)

    async def resize(self, new_size: int) -> None:
        await (await self._target()).resize(new_size)

    async def info(self) -> ImageInfo:
        if self.qed is not None:
            return await self.qed.info()
        return await self.src.info()

    async def close(self) -> None:
        self.release_held("the image is closing")
        if self.qed is not None:
            await self.qed.close()
        else:
            await self.src.close()

    # ======================================================================
    # the conversion
    # ======================================================================

    async def convert(
        self,
        checkpoint: Checkpoint = no_checkpoint,
        mode: Reclaim = Reclaim.COMPACT,
        *,
        rate: int = 0,
    ) -> ConversionReport:
        """Write the QED tables (copies paced at ``rate`` bytes per second, 0: no
        limit), switch (see the module docstring), reclaim. Before
        the header write an error or a cancellation leaves the served qcow2 image as
        it was (the appended bytes cut away); if the header write itself fails, the
        image stops serving (requests fail) since which format is on disk is
        unknown."""
        if self.qed is not None:
            raise JobError("the image is QED already", filename=self.filename)
        if self._converting:
            raise JobError("a conversion is already running", filename=self.filename)
        if self._failed is not None:
            raise JobError(self._failed, filename=self.filename)
        started = time.monotonic()
        self._converting = True
        conv = self.converter
        try:
            await conv.write_tables(checkpoint, rate=rate)
            self._switching = True
            try:
                await self._idle.wait()  # every request in qcow2 mode has finished
            except BaseException:
                self._switching = False
                with contextlib.suppress(Exception):
                    await self.store.truncate(self.plan.file_size)
                raise
            try:
                qed = await conv.switch()
            except BaseException as exc:
                self._failed = f"the switch to QED failed ({exc}); restart the server"
                self._changed.set()
                raise
            self.qed = qed
            self.format_name = "qed"
            self.backing = qed.backing
            self._switching = False
            self._changed.set()
            for callback in self.on_switch:
                callback(qed)
        finally:
            self._converting = False
        return await reclaim_and_report(
            qed, mode, checkpoint, self.plan, conv.bytes_written, started
        )


class ConvertToQedJob(Job):
    """``job-start type=convert-to-qed``: convert a qcow2 export (served with
    ``qed serve --convert-qcow2``) to QED in place while clients use it."""

    type = "convert-to-qed"
    summary = "make a served qcow2 image (qed serve --convert-qcow2) QED in the same file"
    argument_spec = (
        Argument("rate", "size", "bytes copied per second at most (default 0: no limit)"),
        Argument(
            "reclaim",
            "compact|punch",
            "compact (default): move clusters into the space the qcow2 metadata held and "
            "truncate, the image checks clean; punch: only punch it (checkers see leaks)",
        ),
    )

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        names = cls.argument_names()
        for key in arguments:
            if key not in names:
                raise InvalidRequestError(
                    f"convert-to-qed: unknown argument {key!r} ({', '.join(names)})"
                )
        mode = str(arguments.get("reclaim", "compact"))
        if mode not in ("compact", "punch"):
            raise InvalidRequestError(
                f"convert-to-qed: reclaim must be compact or punch, not {mode!r}"
            )
        try:
            rate = parse_size(str(arguments.get("rate", 0) or 0))
        except ValueError as exc:
            raise InvalidRequestError(f"convert-to-qed: {exc}") from None
        return {"reclaim": mode, "rate": rate}

    async def work(self) -> dict[str, Any]:
        image = self.image
        if isinstance(image, QedImage):
            raise JobError(f"{image.filename}: the image is QED already")
        if not isinstance(image, LiveConversion):
            raise JobError(
                f"{image.filename}: only a qcow2 image served with 'qed serve "
                "--convert-qcow2' converts while served"
            )
        report = await image.convert(
            self.checkpoint, Reclaim(self.options["reclaim"]), rate=self.options["rate"]
        )
        await self.checkpoint(1, 1)
        return {
            **report.as_dict(),
            "in-place-writes": image.in_place_writes,
            "held-requests": image.held_requests,
        }
