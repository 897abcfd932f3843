"""Online jobs that look at an image in use: ``check`` and ``scrub``.

* ``check``: the consistency check of engine.check (no repair), run while the image is
  served. Allocating writes wait while it scans, so that the tables it reads cannot
  change under it; reads and writes to allocated clusters go on. Pausing it keeps
  allocations waiting; cancel to release them.
* ``scrub``: reads every data cluster of the image's own layer, at an optional rate
  (``rate``, bytes per second), and reports which ranges could not be read; the image
  is not modified. Guest I/O is never held up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..engine.base import ExtentKind
from ..engine.check import check_image
from ..engine.qed import QedImage
from ..errors import InvalidRequestError, JobError, QedError
from ..format.sizes import parse_size
from .base import Argument, Job

SCRUB_CHUNK = 1 << 20


class CheckJob(Job):
    type = "check"
    summary = "consistency check of the served image (no repair)"

    async def work(self) -> dict[str, Any]:
        image = self.image
        if not isinstance(image, QedImage):
            raise JobError(f"{image.filename}: only QED images have a consistency check")
        async with image.allocations_paused():
            report = await check_image(image, None, checkpoint=self.checkpoint)
        await self.checkpoint(len(image.l1_table), len(image.l1_table))
        return {
            "exit-code": report.exit_code,
            "corruptions": report.corruptions,
            "leaks": report.leaks,
            "check-errors": report.check_errors,
            "total-clusters": report.total_clusters,
            "allocated-clusters": report.allocated_clusters,
            "fragmented-clusters": report.fragmented_clusters,
            "problems": [f"{p.kind} at {p.offset:#x}: {p.message}" for p in report.problems[:50]],
        }


class ScrubJob(Job):
    type = "scrub"
    summary = "read every data cluster, report what cannot be read"
    argument_spec = (
        Argument("rate", "size", "bytes read per second at most (default 0: no limit)"),
    )

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        for key in arguments:
            if key not in cls.argument_names():
                raise InvalidRequestError(
                    f"scrub: unknown argument {key!r} ({', '.join(cls.argument_names())})"
                )
        try:
            return {"rate": parse_size(str(arguments.get("rate", 0) or 0))}
        except ValueError as exc:
            raise InvalidRequestError(f"scrub: {exc}") from None

    async def work(self) -> dict[str, Any]:
        image = self.image
        rate = self.options["rate"]
        extents = [e for e in await image.block_status(0, image.size) if e.kind is ExtentKind.DATA]
        total = sum(e.length for e in extents)
        done = 0
        errors: list[str] = []
        buf = bytearray(SCRUB_CHUNK)
        view = memoryview(buf)
        started = time.monotonic()
        for extent in extents:
            pos = extent.start
            while pos < extent.end:
                n = min(SCRUB_CHUNK, extent.end - pos)
                try:
                    await image.readinto(pos, view[:n])
                except QedError as exc:
                    errors.append(f"[{pos}, {pos + n}): {exc}")
                pos += n
                done += n
                await self.checkpoint(done, total)
                if rate > 0:
                    await self.rest(done / rate - (time.monotonic() - started))
        return {"bytes-read": done, "errors": errors}
