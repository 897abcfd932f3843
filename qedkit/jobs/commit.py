"""Commit an overlay into its backing image, then empty the overlay.

References: qemu-img(1) "commit"; QEMU block/commit.c, qemu-img.c (img_commit).

Theory of operation
-------------------
The overlay's view above the base is what the chain map (engine.mapping) reports at
depths above the base's: data (read through the overlay, whichever layer holds it)
is written into the base, and zeros (zero clusters, and ranges past the end of a
shorter layer in between) are written as zeros. Ranges the base itself decides are
left alone. A base smaller than the overlay is grown first (it then reads zeros in
the new range, as the overlay did there). The base is flushed.

Only then is the overlay emptied (unless ``keep``): every L2 table is unlinked (its
L1 entry becomes 0, flushed, one table at a time), and the file is truncated to the
header and the L1 table (Mover.truncate, after a scan of the cluster map finds
nothing else in use). The overlay then reads through to the base everywhere, and
``qemu-img map`` shows no data in it. QEMU cannot empty a QED overlay and leaves it
full.

Crash safety: while the base is written, the overlay still covers every range being
written (its tables are untouched), so its guest view cannot change whatever part of
the base's writes survive; the base is complete and durable before the overlay
forgets anything, and from then on each of its tables reads the same as the base
below it, so every subset of the unlinks reads the same. Images *between* the
overlay and the base (``-b`` deeper in the chain) are not emptied: their own view may
change (the base now holds the overlay's data), the overlay's does not.

Failure guarantee: an error leaves the overlay's guest view unchanged (a partial
commit may have written part of the base, which the overlay still covers).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..engine.base import BlockImage
from ..engine.chain import open_image
from ..engine.mapping import map_chain
from ..engine.qed import Mover, QedImage
from ..errors import BackingFileError, InvalidRequestError, ReadOnlyError

# Bytes copied per read/write pair: a run of the overlay's map (maximal already: the
# map merges adjacent data clusters) is copied in writes of up to this much. 8 MiB:
# larger than any run of the bench's overlay, so each run is one read and one write.
CHUNK = 8 * 1024 * 1024

Checkpoint = Callable[[int, int], Awaitable[None]]  # (bytes done, bytes total)


@dataclass
class CommitStats:
    bytes_copied: int = 0
    bytes_zeroed: int = 0
    base_grown_to: int | None = None
    tables_dropped: int = 0
    truncated_bytes: int = 0
    emptied: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "bytes-copied": self.bytes_copied,
            "bytes-zeroed": self.bytes_zeroed,
            "base-grown-to": self.base_grown_to,
            "tables-dropped": self.tables_dropped,
            "truncated-bytes": self.truncated_bytes,
            "emptied": self.emptied,
            "seconds": round(self.seconds, 3),
        }


def find_in_chain(top: BlockImage, base: str) -> int:
    """Depth of the image ``base`` names in ``top``'s backing chain (1: the
    backing file); BackingFileError if it is not there."""
    want = os.path.realpath(base) if "://" not in base else base
    for depth, img in enumerate(top.chain()):
        name = img.filename
        have = os.path.realpath(name) if "://" not in name else name
        if depth and have == want:
            return depth
    raise BackingFileError(f"{base} is not in the backing chain", filename=top.filename)


async def reopen_writable(top: BlockImage, depth: int) -> BlockImage:
    """Replace the read-only image at ``depth`` of ``top``'s chain by the same file
    opened read-write (with its own chain); returns it. The image above it reads
    through the new one from then on."""
    chain = top.chain()
    old = chain[depth]
    if "://" in old.filename:
        raise ReadOnlyError("remote images are read-only", filename=old.filename)
    new = await open_image(old.filename, fmt=old.format_name)
    if new.readonly:  # pragma: no cover - open_image refuses read-write opens it cannot do
        await new.close()
        raise ReadOnlyError("cannot open the base read-write", filename=old.filename)
    chain[depth - 1].backing = new
    await old.close()
    return new


@dataclass
class Committer:
    """Commits ``top``'s view above ``base`` (the read-write image at ``depth`` of its
    chain) into ``base``; see the module docstring."""

    top: BlockImage
    base: BlockImage
    depth: int = 1
    stats: CommitStats | None = None

    async def run(self, *, keep: bool = False, checkpoint: Checkpoint | None = None) -> CommitStats:
        """Copy, flush the base, then empty the overlay unless ``keep``."""
        top, base = self.top, self.base
        if top.chain()[self.depth] is not base:
            raise InvalidRequestError(
                "the base is not in the overlay's backing chain", filename=top.filename
            )
        if base.readonly:
            raise ReadOnlyError("the base image is open read-only", filename=base.filename)
        empty = not keep
        if empty and not isinstance(top, QedImage):
            raise InvalidRequestError(
                f"a {top.format_name} overlay cannot be emptied (use -d)", filename=top.filename
            )
        if empty and self.depth != 1:
            raise InvalidRequestError(
                "the overlay is emptied only when committing into its own backing file",
                filename=top.filename,
            )
        if empty and top.readonly:
            raise ReadOnlyError("the overlay is open read-only", filename=top.filename)
        stats = self.stats = CommitStats()
        started = time.monotonic()
        old_base_size = base.size
        if base.size < top.size:
            await base.resize(top.size)
            stats.base_grown_to = top.size
        total = top.size
        entries = [e for e in await map_chain(top) if e.depth < self.depth]
        done = 0
        # One reused page-aligned buffer (machine notes; its pages are faulted in as
        # the largest run needs them): ``top.read`` would allocate and copy twice per
        # chunk, and fault in fresh pages each time.
        buffer = mmap.mmap(-1, CHUNK)
        view = memoryview(buffer)
        try:
            for entry in entries:
                if entry.data:
                    await self._copy(entry.start, entry.end, view, stats, done, checkpoint)
                elif entry.start < old_base_size:
                    # Zeros above the base: zero clusters, or the end of a shorter
                    # image in between. Past the old end the grown base reads zeros.
                    end = min(entry.end, old_base_size)
                    await base.write_zeroes(entry.start, end - entry.start)
                    stats.bytes_zeroed += end - entry.start
                done = max(done, entry.end)
                if checkpoint:
                    await checkpoint(done, total)
        finally:
            view.release()
            buffer.close()
        await base.flush()
        if empty:
            assert isinstance(top, QedImage)
            stats.tables_dropped, stats.truncated_bytes = await empty_overlay(top)
            stats.emptied = True
        stats.seconds = time.monotonic() - started
        if checkpoint:
            await checkpoint(total, total)
        return stats

    async def _copy(
        self,
        start: int,
        end: int,
        view: memoryview,
        stats: CommitStats,
        done: int,
        checkpoint: Checkpoint | None,
    ) -> None:
        """Copy the overlay's view of ``[start, end)`` into the base through ``view``."""
        top, base = self.top, self.base
        pos = start
        while pos < end:
            n = min(len(view), end - pos)
            chunk = view[:n]
            if not top.readinto_now(pos, chunk):
                await top.readinto(pos, chunk)
            await base.write(pos, chunk)
            stats.bytes_copied += n
            pos += n
            if checkpoint:
                await checkpoint(done + pos - start, self.top.size)


async def empty_overlay(img: QedImage) -> tuple[int, int]:
    """Unlink every L2 table of ``img`` and truncate the file to what stays in use
    (the header and the L1 table). Only for an overlay whose every guest byte reads
    the same from its backing image (its data was committed and flushed). Returns
    (tables dropped, bytes truncated)."""
    dropped = 0
    async with img.allocations_paused():
        await img.store.flush()
        for l1_index, offset in enumerate(img.l1_table):
            if offset:
                await img.tables.unlink(l1_index)
                dropped += 1
        img.alloc.forget_map()
    await img.ensure_cluster_map()
    return dropped, await Mover(img).truncate()
