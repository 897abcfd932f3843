"""How large a QED (or raw) image holding a given content would be: ``qed measure``,
which qemu-img cannot do for QED.

References: qemu-img(1) "measure"; QEMU block/qcow2.c (qcow2_measure) for the two
figures' meaning.

Theory of operation
-------------------
Two figures, as ``qemu-img measure`` prints them for qcow2:

* ``required``: the file a conversion of the image would write: the header
  cluster, the L1 table, one L2 table for every L2 span that holds data, and one
  cluster for every target cluster the data touches. The data is what the source
  chain's map (engine.mapping) says may be non-zero: present and not zero. Nothing
  is read, so clusters that hold written zeros count (``qed convert`` detects them
  and skips them): ``required`` is never smaller than the converted file, and equal
  to it when the source has no allocated zeros.
* ``fully-allocated``: the file once every guest cluster is written: header, L1,
  every L2 table, every cluster.

``--size N`` measures an empty image of N bytes (rounded up to 512, as ``qemu-img
create`` rounds): required is the header and the L1 table. A raw target needs its
virtual size in both figures (as qemu-img says: raw measures do not count holes).

Failure guarantee: only reads; a geometry QEMU could not open is refused
(InvalidRequestError) before anything is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.base import BlockImage
from ..engine.mapping import map_chain
from ..engine.qed import QedImage
from ..format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, SECTOR_SIZE, Geometry


@dataclass(frozen=True, slots=True)
class Measurement:
    required: int
    fully_allocated: int

    def pairs(self) -> list[tuple[str, object]]:
        """QAPI's BlockMeasureInfo fields, in schema order."""
        return [("required", self.required), ("fully-allocated", self.fully_allocated)]


def _round_size(size: int) -> int:
    return -(-size // SECTOR_SIZE) * SECTOR_SIZE


def _count(ranges: list[tuple[int, int]], unit_bits: int) -> int:
    """Distinct ``1 << unit_bits`` units touched by sorted byte ranges."""
    count = 0
    last = -1  # the last unit counted
    for start, end in ranges:
        first = start >> unit_bits
        stop = (end - 1) >> unit_bits
        first = max(first, last + 1)
        if stop >= first:
            count += stop - first + 1
            last = stop
    return count


def qed_measure(
    size: int,
    data: list[tuple[int, int]],
    *,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
) -> Measurement:
    """The two figures for a QED image of ``size`` bytes whose data lies in the
    sorted guest ranges ``data`` ([start, end) pairs)."""
    size = _round_size(size)
    QedImage.validate_create_options(size, cluster_size, table_size, None)
    geo = Geometry(cluster_size, table_size)
    span_bits = geo.cluster_bits + geo.l2_bits
    base = geo.header_bytes + geo.table_bytes
    data_clusters = _count(data, geo.cluster_bits)
    tables = _count(data, span_bits)
    required = base + tables * geo.table_bytes + data_clusters * cluster_size
    all_tables = (size + geo.l2_span - 1) // geo.l2_span
    fully = base + all_tables * geo.table_bytes + geo.bytes_to_clusters(size) * cluster_size
    return Measurement(required, fully)


async def data_ranges(img: BlockImage) -> list[tuple[int, int]]:
    """Guest ranges of ``img`` (through its chain) that may hold non-zero bytes."""
    return [(e.start, e.end) for e in await map_chain(img) if e.present and not e.zero]


async def measure_image(
    img: BlockImage,
    *,
    fmt: str = "qed",
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
) -> Measurement:
    """What a conversion of ``img`` (its chain flattened) to ``fmt`` needs."""
    if fmt == "raw":
        return measure_size(img.size, fmt="raw")
    ranges = await data_ranges(img)
    return qed_measure(img.size, ranges, cluster_size=cluster_size, table_size=table_size)


def measure_size(
    size: int,
    *,
    fmt: str = "qed",
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
) -> Measurement:
    """What a new empty image of ``size`` bytes needs, and needs once full."""
    if fmt == "raw":
        return Measurement(size, size)
    return qed_measure(size, [], cluster_size=cluster_size, table_size=table_size)
