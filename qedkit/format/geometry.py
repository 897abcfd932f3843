"""Cluster geometry: limits, address translation and the offset validity tests.

References: qed_spec "Cluster size", "Table size", "Address translation";
QEMU block/qed.h (qed_check_cluster_offset, qed_check_table_offset, qed_max_image_size).

A QED file is an array of ``cluster_size`` clusters. Guest byte ``pos`` maps to::

    l1_index          = pos >> (cluster_bits + l2_bits)
    l2_index          = (pos >> cluster_bits) & (l2_entries - 1)
    offset_in_cluster = pos & (cluster_size - 1)

where ``l2_entries = table_size * cluster_size / 8`` (u64 entries per table). One L2
table maps ``l2_span = l2_entries * cluster_size`` guest bytes; the single L1 table
maps ``l2_entries * l2_span`` bytes, which is the largest possible image.

Both validity tests take ``file_end``: the file length rounded *down* to a whole
cluster, advanced by allocations (QEMU's ``file_size``). A cluster only partly inside
the file is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Limits from the spec and QEMU's QED_MIN/MAX_* (block/qed.h).
MIN_CLUSTER_SIZE = 4096  # bytes, 2**12
MAX_CLUSTER_SIZE = 64 * 1024 * 1024  # bytes, 2**26 (the code's limit; QEMU's docs say 64 KiB)
MIN_TABLE_SIZE = 1  # clusters
MAX_TABLE_SIZE = 16  # clusters
DEFAULT_CLUSTER_SIZE = 64 * 1024  # bytes, QEMU's default
DEFAULT_TABLE_SIZE = 4  # clusters, QEMU's default
SECTOR_SIZE = 512  # image_size must be a multiple of this
TABLE_ENTRY_SIZE = 8  # bytes per L1/L2 entry (u64 LE)
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def is_valid_cluster_size(cluster_size: int) -> bool:
    return is_power_of_two(cluster_size) and MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE


def is_valid_table_size(table_size: int) -> bool:
    return is_power_of_two(table_size) and MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    """The exact largest image_size: ``l2_entries**2 * cluster_size`` bytes."""
    l2_entries = table_size * cluster_size // TABLE_ENTRY_SIZE
    return l2_entries * l2_entries * cluster_size


def qemu_max_image_size(cluster_size: int, table_size: int) -> int:
    """QEMU's limit: the same product computed in u64, which wraps to 0 for large
    geometries (e.g. 2 MiB clusters with table_size 16). Images above this limit are
    valid QED but QEMU refuses to open them, so ``create`` refuses to make them."""
    return max_image_size(cluster_size, table_size) & U64_MAX


@dataclass(frozen=True, slots=True)
class Geometry:
    """Derived constants of one image; build with ``Geometry(cluster_size, table_size, ...)``."""

    cluster_size: int
    table_size: int
    header_size: int = 1
    cluster_bits: int = field(init=False)
    l2_entries: int = field(init=False)
    l2_bits: int = field(init=False)
    table_bytes: int = field(init=False)
    l2_span: int = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "cluster_bits", self.cluster_size.bit_length() - 1)
        l2_entries = self.table_size * self.cluster_size // TABLE_ENTRY_SIZE
        set_(self, "l2_entries", l2_entries)
        set_(self, "l2_bits", l2_entries.bit_length() - 1)
        set_(self, "table_bytes", self.table_size * self.cluster_size)
        set_(self, "l2_span", l2_entries * self.cluster_size)

    # ---- address translation -------------------------------------------------

    def l1_index(self, pos: int) -> int:
        return pos >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, pos: int) -> int:
        return (pos >> self.cluster_bits) & (self.l2_entries - 1)

    def offset_in_cluster(self, pos: int) -> int:
        return pos & (self.cluster_size - 1)

    def start_of_cluster(self, pos: int) -> int:
        return pos & ~(self.cluster_size - 1)

    def round_up(self, pos: int) -> int:
        """``pos`` rounded up to a whole cluster."""
        return (pos + self.cluster_size - 1) & ~(self.cluster_size - 1)

    def bytes_to_clusters(self, nbytes: int) -> int:
        """Clusters needed to hold ``nbytes`` (ceiling). QEMU divides by
        ``cluster_size - 1`` here (a bug); this is the correct count."""
        return (nbytes + self.cluster_size - 1) >> self.cluster_bits

    def translate(self, pos: int) -> tuple[int, int, int]:
        """Guest offset -> (l1_index, l2_index, offset_in_cluster)."""
        return self.l1_index(pos), self.l2_index(pos), self.offset_in_cluster(pos)

    @property
    def max_image_size(self) -> int:
        return max_image_size(self.cluster_size, self.table_size)

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size

    # ---- validity tests ------------------------------------------------------

    def is_valid_cluster_offset(self, offset: int, file_end: int) -> bool:
        """A data or table cluster offset: aligned, past the header, inside the file."""
        return (
            offset & (self.cluster_size - 1) == 0
            and offset >= self.header_bytes
            and offset < file_end
        )

    def is_valid_table_offset(self, offset: int, file_end: int) -> bool:
        """All ``table_size`` clusters of a table starting at ``offset`` are valid.

        QEMU also requires ``last > offset``, which rejects every table when
        table_size is 1 (a bug); here a one-cluster table is valid.
        """
        last = offset + (self.table_size - 1) * self.cluster_size
        return (
            self.is_valid_cluster_offset(offset, file_end)
            and self.is_valid_cluster_offset(last, file_end)
            and last <= U64_MAX
        )
