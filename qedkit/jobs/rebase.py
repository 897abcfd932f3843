"""Change an overlay's backing file: safely (the guest view stays the same), or only
the name (``unsafe``), or to none at all (flatten).

References: qemu-img(1) "rebase"; QEMU qemu-img.c (img_rebase).

Theory of operation
-------------------
The overlay's view is its own clusters over its backing chain. Where the overlay
holds data or zero clusters nothing below matters; everywhere else (its own layer
UNALLOCATED) it shows the old chain, and after the rebase it would show the new one.
Safe mode therefore visits the overlay's unallocated ranges cluster by cluster:

* both chains' maps (engine.mapping) say zeros there (zero clusters, holes, past the
  end of a shorter image): nothing to do, nothing is read;
* else both views are read and compared: equal clusters are left unallocated; a
  cluster that differs gets the *old* view written into the overlay: zeros become a
  zero cluster (write-zeroes over an unallocated whole cluster: no data, and it hides
  whatever the new base holds there), anything else is written as data.

Then every copy is flushed and the header gets the new name in one sector write
(QedImage.set_backing_file: NO_PROBE is set for a raw backing file). Flattening
(no new backing file) is the same with a new chain that reads zeros: every cluster
the old chain shows non-zero is copied.

Crash safety: the copies are allocating writes over a backing file, so their data is
durable before their L2 entries; until the header changes, a copy that survived
shows the old view it was written from, and one that did not leaves the old chain
showing through: either way the old view. The header changes only after a flush of
everything, so from then on every copy is there and the new chain shows through
only where it equals the old view.

Failure guarantee: an error before the header write leaves the old backing file and
the old view (copies made so far are harmless); the header write is atomic.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..engine.base import BlockImage, ExtentKind
from ..engine.mapping import map_chain
from ..engine.qed import QedImage

CHUNK = 2 * 1024 * 1024  # guest bytes compared per step

Checkpoint = Callable[[int, int], Awaitable[None]]  # (bytes done, bytes total)


@dataclass
class RebaseStats:
    bytes_compared: int = 0  # read from both chains
    bytes_copied: int = 0  # written as data into the overlay
    bytes_zeroed: int = 0  # made zero clusters (or zeros) in the overlay
    seconds: float = 0.0


async def _zero_ranges(img: BlockImage | None, start: int, end: int) -> list[tuple[int, int]]:
    """Sub-ranges of ``[start, end)`` where ``img``'s chain surely reads zeros
    (everything past its end, and the whole range without an image)."""
    if img is None:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    stop = min(end, img.size)
    if start < stop:
        for entry in await map_chain(img, start, stop - start):
            if entry.zero or not entry.present:
                out.append((entry.start, entry.end))
    if stop < end:
        out.append((max(start, stop), end))
    return out


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether sorted, disjoint ``ranges`` cover ``[start, end)``."""
    pos = start
    for a, b in ranges:
        if b <= pos:
            continue
        if a > pos:
            return False
        pos = b
        if pos >= end:
            return True
    return pos >= end


async def _view(img: BlockImage | None, pos: int, n: int) -> bytes:
    """Guest bytes ``[pos, pos + n)`` of a backing chain: zeros past its end."""
    if img is None:
        return bytes(n)
    have = max(0, min(n, img.size - pos))
    data = await img.read(pos, have) if have else b""
    return data + bytes(n - have)


async def copy_differences(
    top: QedImage,
    new: BlockImage | None,
    *,
    checkpoint: Checkpoint | None = None,
    stats: RebaseStats | None = None,
) -> RebaseStats:
    """Write into ``top`` the old view of every cluster where its old chain
    (``top.backing``) and ``new`` differ and ``top`` does not decide the bytes itself.
    ``top``'s guest view does not change."""
    stats = stats or RebaseStats()
    old = top.backing
    geo = top.geo
    cs = geo.cluster_size
    size = top.size
    for ext in await top.block_status(0, size):
        if ext.kind is not ExtentKind.UNALLOCATED:
            continue
        pos = ext.start
        while pos < ext.end:
            end = min(ext.end, pos + CHUNK)
            if end < ext.end:
                end = max(pos + cs, geo.start_of_cluster(end))
            old_zero = await _zero_ranges(old, pos, end)
            new_zero = await _zero_ranges(new, pos, end)
            old_bytes: bytes | None = None
            new_bytes: bytes | None = None
            runs: list[tuple[int, int, bool]] = []  # (start, end, zeros) to write
            c = pos
            while c < end:
                c_end = min(end, geo.start_of_cluster(c) + cs)
                if _covered(old_zero, c, c_end) and _covered(new_zero, c, c_end):
                    c = c_end
                    continue
                if old_bytes is None or new_bytes is None:
                    old_bytes = await _view(old, pos, end - pos)
                    new_bytes = await _view(new, pos, end - pos)
                    stats.bytes_compared += 2 * (end - pos)
                a, b = old_bytes[c - pos : c_end - pos], new_bytes[c - pos : c_end - pos]
                if a != b:
                    zeros = a.count(0) == len(a)
                    if runs and runs[-1][1] == c and runs[-1][2] == zeros:
                        runs[-1] = (runs[-1][0], c_end, zeros)
                    else:
                        runs.append((c, c_end, zeros))
                c = c_end
            # One request per run of differing clusters: one allocation, one flush.
            for start, stop, zeros in runs:
                if zeros:
                    await top.write_zeroes(start, stop - start)
                    stats.bytes_zeroed += stop - start
                else:
                    assert old_bytes is not None
                    await top.write(start, old_bytes[start - pos : stop - pos])
                    stats.bytes_copied += stop - start
            pos = end
            if checkpoint:
                await checkpoint(pos, size)
    return stats


async def rebase(
    top: QedImage,
    new: BlockImage | None,
    name: str | None,
    *,
    raw: bool = False,
    unsafe: bool = False,
    checkpoint: Checkpoint | None = None,
) -> RebaseStats:
    """Make ``name`` (None or "": none) the backing file of ``top``; ``new`` is that
    image, open (None without one; unused when ``unsafe``). Safe mode first copies
    what differs (see the module docstring). ``top`` reads through ``new``
    afterwards; its old backing image is closed."""
    started = time.monotonic()
    stats = RebaseStats()
    if not unsafe:
        await copy_differences(top, new, checkpoint=checkpoint, stats=stats)
    await top.set_backing_file(name or None, raw=raw and bool(name))
    old = top.backing
    top.backing = new if name else None
    if old is not None and old is not new:
        await old.close()
    stats.seconds = time.monotonic() - started
    if checkpoint:
        await checkpoint(top.size, top.size)
    return stats
