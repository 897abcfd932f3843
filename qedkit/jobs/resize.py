"""Resize an image: grow (any writable format), or shrink (``shrink=True``), refusing
to cut data unless forced.

Theory of operation
-------------------
Growing is the driver's ``resize`` (QED: the new range is made to read zeros first,
then the header gets the size; raw: the file is extended). Shrinking cuts the tail
``[new_size, size)``; before anything is written, that tail is searched for data: the
ranges this image's own layer holds as data (block status; a backing file's data is
not this image's) are read, and the first non-zero byte refuses the shrink
(``TailHoldsData``) unless ``force``. Then QED images shrink in the engine
(QedImage.shrink: entries cleared, then the header) and the clusters nothing
references any more are reclaimed (``reclaim``: Mover.compact moves the clusters past
the used space into the free slots, lowest first, and truncates; with the home
allocation policy only the free tail is cut, so that data stays at home). Raw images
are truncated.

Failure guarantee: a refused resize writes nothing; a shrink that fails midway
leaves an image whose remaining disk ``[0, new_size)`` reads as before (QedImage.shrink
documents every intermediate state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.base import BlockImage, ExtentKind
from ..engine.qed import CompactStats, Mover, QedImage
from ..errors import InvalidRequestError, UnsupportedFeatureError
from ..format.geometry import SECTOR_SIZE

CHUNK = 4 * 1024 * 1024  # bytes read at a time when searching the tail for data


class TailHoldsData(InvalidRequestError):
    """A shrink would cut guest data (``offset``: its first non-zero byte)."""

    def __init__(self, message: str, *, filename: str | None, offset: int) -> None:
        super().__init__(message, filename=filename)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class ResizeResult:
    old_size: int
    new_size: int
    stats: CompactStats = field(default_factory=CompactStats)  # a QED shrink's reclaim

    @property
    def reclaimed_bytes(self) -> int:
        """File bytes given back by a shrink (the truncated tail)."""
        return self.stats.truncated_bytes


def new_size_of(current: int, text_value: int, sign: str) -> int:
    """The size a ``[+|-]SIZE`` argument asks for, from the current size."""
    if sign == "+":
        return current + text_value
    if sign == "-":
        return current - text_value
    return text_value


async def first_data_byte(img: BlockImage, start: int, end: int) -> int | None:
    """Offset of the first non-zero byte that ``img``'s own layer holds as data in
    ``[start, end)``, or None."""
    if start >= end:
        return None
    for ext in await img.block_status(start, end - start):
        if ext.kind is not ExtentKind.DATA:
            continue
        pos = ext.start
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            data = await img.read(pos, n)
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + n - len(stripped)
            pos += n
    return None


async def resize_image(
    img: BlockImage, new_size: int, *, shrink: bool = False, force: bool = False
) -> ResizeResult:
    """Resize ``img`` to ``new_size`` bytes (see the module docstring)."""
    old = img.size
    if new_size < 0:
        raise InvalidRequestError(f"invalid size {new_size}: negative", filename=img.filename)
    if isinstance(img, QedImage) and new_size % SECTOR_SIZE:
        raise InvalidRequestError(
            f"invalid size {new_size}: a QED image size must be a multiple of 512",
            filename=img.filename,
        )
    if new_size >= old:
        await img.resize(new_size)
        return ResizeResult(old, new_size)
    if not shrink:
        raise InvalidRequestError(
            f"{new_size} bytes is smaller than the image ({old} bytes): use --shrink to cut it",
            filename=img.filename,
        )
    if not force:
        bad = await first_data_byte(img, new_size, old)
        if bad is not None:
            raise TailHoldsData(
                f"shrinking to {new_size} bytes would cut data (the first non-zero byte "
                f"is at guest offset {bad}); use --force to discard it",
                filename=img.filename,
                offset=bad,
            )
    if isinstance(img, QedImage):
        await img.shrink(new_size)
        stats = await reclaim(img)
        return ResizeResult(old, new_size, stats)
    if img.format_name != "raw":
        raise UnsupportedFeatureError(
            f"shrinking {img.format_name} images is not supported", filename=img.filename
        )
    await img.resize(new_size)
    return ResizeResult(old, new_size, CompactStats(truncated_bytes=old - new_size))


async def reclaim(img: QedImage) -> CompactStats:
    """Give back the space of clusters nothing references (after a shrink): compact
    (crash-safe moves, then truncate), or only cut the free tail with the home
    allocation policy."""
    await img.ensure_cluster_map()
    mover = Mover(img)
    if img.home_allocation:
        return CompactStats(truncated_bytes=await mover.truncate())
    return await mover.compact()
