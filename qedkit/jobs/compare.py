"""Compare the guest contents of two images, as ``qemu-img compare`` does.

References: qemu-img(1) "compare"; QEMU qemu-img.c (img_compare, compare_buffers,
check_empty_sectors).

Theory of operation
-------------------
Both chains are mapped first (engine.mapping.map_chain: each layer's block status,
walked down its backing chain), and the two maps are walked together in pieces where
neither side changes status. A piece where both sides read zeros (zero clusters,
unallocated ranges with nothing below, holes of a raw file) is equal without a read.
Where one side reads zeros and the other holds data, only the data side is read and
must be zero; where both hold data, both are read in chunks of CHUNK bytes and
compared. So a sparse image costs its allocated bytes, not its size. Where both top
layers are local QED or raw files opened without force-share (our locks then keep
writers and resizers out), a piece both hold as data is first compared in place, one
memcmp over read-only mappings of the two files, which saves copying it through the
buffers; only a piece that differs is read to find the sector.

The result names the first differing 512-byte sector, counted from the start of the
piece in which it lies (qemu-img reports the first differing sector of its chunk, and
its chunks start at block status boundaries too). Images of different sizes are
compared over the common part; then the rest of the longer one must read zeros (the
size mismatch is a warning, not a difference). Strict mode (``-s``) fails on a size
mismatch at once and on the first piece whose allocation differs (present, zero,
data and whether the range has a host offset, the block status flags qemu-img -s
compares), before it reads anything there.

Failure guarantee: nothing is written; an error opening or reading either image is
raised (the CLI's exit code 2).
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.base import BlockImage
from ..engine.mapping import MapEntry, map_chain

# Bytes read per call on each side: large enough that the per-call costs vanish, small
# enough for two page-aligned buffers to stay in the cache.
CHUNK = 2 * 1024 * 1024
SECTOR = 512  # qemu-img reports mismatches per 512-byte sector

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class Outcome(enum.Enum):
    IDENTICAL = "identical"
    CONTENT = "content"  # a byte differs (offset: its sector)
    SIZE = "size"  # strict mode: the sizes differ
    ALLOCATION = "allocation"  # strict mode: block status differs (offset: the piece)


@dataclass(frozen=True, slots=True)
class CompareResult:
    outcome: Outcome
    offset: int | None = None
    size_mismatch: bool = False
    bytes_read: int = 0  # both sides together: what skipping by block status saved

    @property
    def identical(self) -> bool:
        return self.outcome is Outcome.IDENTICAL

    def messages(self) -> list[str]:
        """The lines qemu-img compare prints (on stdout) for this result."""
        if self.outcome is Outcome.SIZE:
            return ["Strict mode: Image size mismatch!"]
        if self.outcome is Outcome.ALLOCATION:
            return [f"Strict mode: Offset {self.offset} block status mismatch!"]
        lines = ["Warning: Image size mismatch!"] if self.size_mismatch else []
        if self.outcome is Outcome.CONTENT:
            lines.append(f"Content mismatch at offset {self.offset}!")
        else:
            lines.append("Images are identical.")
        return lines


def _reads_zero(entry: MapEntry) -> bool:
    return entry.zero or not entry.present


def _status(entry: MapEntry) -> tuple[bool, bool, bool, bool]:
    return (entry.present, entry.zero, entry.data, entry.offset is not None)


class _Reader:
    """Chunked reads of two images into two reused buffers, compared with memcmp.

    Reused buffers: a fresh ``bytes`` per read (``os.pread``) costs a page fault per
    4 KiB of it, which made reading a third slower. The first side's buffer is a
    ``bytearray`` because ``bytearray.startswith(other_buffer)`` is a memcmp over any
    buffer (memoryview equality compares item by item, ~10x slower); the second is an
    mmap, page-aligned (machine notes: unaligned buffers copy several times slower).
    """

    def __init__(self, a: BlockImage, b: BlockImage) -> None:
        self.images = (a, b)
        # Where both top layers are mapped files (read-only, fenced against writers),
        # a piece that both hold as data is compared in place: one memcmp over the
        # mappings, without copying 2 x the data through the buffers first.
        self.mappings = (a.host_mapping(), b.host_mapping())
        self.mine = bytearray(CHUNK)
        self.other = mmap.mmap(-1, CHUNK)
        self.views = (memoryview(self.mine), memoryview(self.other))
        self.zeros = bytes(CHUNK)
        self.read = 0

    def close(self) -> None:
        for mapping in self.mappings:
            if mapping is not None:
                mapping.close()
        for view in self.views:
            view.release()
        self.other.close()

    async def _fill(self, side: int, pos: int, n: int) -> memoryview:
        """Guest bytes ``[pos, pos + n)`` of one side in its buffer (a view of them)."""
        view = self.views[side][:n]
        img = self.images[side]
        if not img.readinto_now(pos, view):  # the driver's one-pread fast path, or:
            await img.readinto(pos, view)
        self.read += n
        return view

    async def nonzero(self, side: int, start: int, end: int) -> int | None:
        """First sector (from ``start``) of ``[start, end)`` of one side holding a
        non-zero byte, or None."""
        pos = start
        zeros = self.zeros
        while pos < end:
            n = min(CHUNK, end - pos)
            view = await self._fill(side, pos, n)
            if not zeros.startswith(view):  # a memcmp against zeros
                for s in range(0, n, SECTOR):
                    if not zeros.startswith(view[s : s + SECTOR]):
                        return start + (pos - start + s) // SECTOR * SECTOR
            pos += n
        return None

    def equal_in_place(self, start: int, end: int, ea: MapEntry, eb: MapEntry) -> bool:
        """Whether ``[start, end)`` is equal on both sides by one memcmp over the
        mapped files; False also where the mappings cannot tell (then read it)."""
        ma, mb = self.mappings
        if ma is None or mb is None or ea.depth or eb.depth:
            return False
        if ea.offset is None or eb.offset is None:
            return False
        at_a, at_b = ea.offset + start - ea.start, eb.offset + start - eb.start
        if at_a + end - start > ma.size or at_b + end - start > mb.size:
            return False  # past the end of a file: let the driver's read decide
        if not ma.equal(at_a, mb, at_b, end - start):
            return False
        self.read += 2 * (end - start)
        return True

    async def differ(self, start: int, end: int) -> int | None:
        """First sector (from ``start``) where the two sides differ, or None."""
        pos = start
        mine = self.mine
        while pos < end:
            n = min(CHUNK, end - pos)
            await self._fill(0, pos, n)
            other = await self._fill(1, pos, n)
            if not mine.startswith(other):  # a memcmp of the first n bytes
                for s in range(0, n, SECTOR):
                    if not mine.startswith(other[s : s + SECTOR], s):
                        return start + (pos - start + s) // SECTOR * SECTOR
            pos += n
        return None


async def compare_images(
    a: BlockImage, b: BlockImage, *, strict: bool = False, progress: Progress | None = None
) -> CompareResult:
    """Compare the guest contents of ``a`` and ``b`` (each with its backing chain).
    Reads only ranges that a block status says may hold data."""
    size_a, size_b = a.size, b.size
    if strict and size_a != size_b:
        return CompareResult(Outcome.SIZE, size_mismatch=True)
    common = min(size_a, size_b)
    total = max(size_a, size_b)
    reader = _Reader(a, b)
    try:
        map_a = await map_chain(a, 0, common)
        map_b = await map_chain(b, 0, common)
        i = j = 0
        pos = 0
        while pos < common:
            ea, eb = map_a[i], map_b[j]
            end = min(ea.end, eb.end)
            if strict and _status(ea) != _status(eb):
                return CompareResult(Outcome.ALLOCATION, pos, bytes_read=reader.read)
            za, zb = _reads_zero(ea), _reads_zero(eb)
            bad: int | None = None
            if za and zb:
                pass
            elif za:
                bad = await reader.nonzero(1, pos, end)
            elif zb:
                bad = await reader.nonzero(0, pos, end)
            elif not reader.equal_in_place(pos, end, ea, eb):
                bad = await reader.differ(pos, end)
            if bad is not None:
                return CompareResult(Outcome.CONTENT, bad, bytes_read=reader.read)
            pos = end
            if ea.end == end:
                i += 1
            if eb.end == end:
                j += 1
            if progress:
                progress(pos, total)
        if size_a != size_b:
            side, longer = (0, a) if size_a > size_b else (1, b)
            for entry in await map_chain(longer, common, total - common):
                if not _reads_zero(entry):
                    bad = await reader.nonzero(side, entry.start, entry.end)
                    if bad is not None:
                        return CompareResult(
                            Outcome.CONTENT, bad, size_mismatch=True, bytes_read=reader.read
                        )
                if progress:
                    progress(entry.end, total)
        if progress:
            progress(total, total)
        return CompareResult(
            Outcome.IDENTICAL, size_mismatch=size_a != size_b, bytes_read=reader.read
        )
    finally:
        reader.close()
