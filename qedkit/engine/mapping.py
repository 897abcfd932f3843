"""The allocation map of a whole backing chain, as ``qemu-img map`` reports it.

Each driver answers block status for its own layer; this module walks down the chain
for ranges a layer leaves UNALLOCATED. The depth of a range is the index of the
layer that decided it (0 = top). A range past the end of a shorter backing image
is reported at the depth of the last layer that covers it, not present, zero.
Neighbouring entries merge when every flag matches and host offsets continue
(``qemu-img map``'s rule), so our JSON equals qemu-img's on the same chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import BlockImage, ExtentKind


@dataclass(frozen=True, slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    @property
    def end(self) -> int:
        return self.start + self.length

    def mergeable(self, nxt: MapEntry) -> bool:
        if (self.depth, self.present, self.zero, self.data, self.filename) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
            nxt.filename,
        ):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset

    def as_qemu_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


async def map_chain(
    image: BlockImage, offset: int = 0, length: int | None = None
) -> list[MapEntry]:
    """Merged map entries covering ``[offset, offset + length)`` of ``image``."""
    if length is None:
        length = image.size - offset
    out: list[MapEntry] = []

    def emit(entry: MapEntry) -> None:
        if out and out[-1].mergeable(entry):
            prev = out[-1]
            out[-1] = MapEntry(
                prev.start,
                prev.length + entry.length,
                prev.depth,
                prev.present,
                prev.zero,
                prev.data,
                prev.offset,
                prev.filename,
            )
        else:
            out.append(entry)

    async def walk(img: BlockImage, depth: int, start: int, end: int) -> None:
        for ext in await img.block_status(start, end - start):
            if ext.kind is ExtentKind.DATA:
                emit(
                    MapEntry(
                        ext.start,
                        ext.length,
                        depth,
                        True,
                        False,
                        True,
                        ext.host_offset,
                        img.filename,
                    )
                )
            elif ext.kind is ExtentKind.ZERO:
                emit(
                    MapEntry(
                        ext.start,
                        ext.length,
                        depth,
                        True,
                        True,
                        False,
                        ext.host_offset,
                        img.filename,
                    )
                )
            else:
                below = img.backing
                covered = ext.start
                if below is not None:
                    covered = min(ext.end, max(ext.start, below.size))
                    if covered > ext.start:
                        await walk(below, depth + 1, ext.start, covered)
                if covered < ext.end:
                    # Nothing below: zeros. A layer that reserved host space for the
                    # range (qcow2 subclusters) reports it, as QEMU does.
                    host = ext.host_offset
                    emit(
                        MapEntry(
                            covered,
                            ext.end - covered,
                            depth,
                            False,
                            True,
                            False,
                            None if host is None else host + covered - ext.start,
                            img.filename,
                        )
                    )

    if length > 0:
        await walk(image, 0, offset, offset + length)
    return out
