"""L1 and L2 tables: packed little-endian u64 entries and their sentinel values.

References: qed_spec "Tables", "Zero clusters"; QEMU block/qed.h (qed_offset_is_*).

A table is ``table_size`` contiguous clusters holding ``l2_entries`` u64 entries.
In memory a table is an ``array('Q')`` so that lookups cost one index and the
on-disk bytes are one ``tobytes()`` away.

Entry values::

    L1: 0            no L2 table: the whole l2_span is unallocated
        other        file offset of an L2 table (must pass the table-offset test)
    L2: 0            unallocated: read from the backing file, or zeros
        1            zero cluster: reads zeros, never the backing file, no host space
        other        file offset of a data cluster (must pass the cluster-offset test)

``1`` is special only in L2; in L1 it is simply an invalid (unaligned) offset. The
low bits of other entries are reserved by the spec; QEMU treats any unaligned value
other than exactly 1 as invalid and so do we.
"""

from __future__ import annotations

import sys
from array import array

L1_UNALLOCATED = 0
L2_UNALLOCATED = 0
L2_ZERO_CLUSTER = 1

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def is_unallocated(entry: int) -> bool:
    return entry == L2_UNALLOCATED


def is_zero_cluster(entry: int) -> bool:
    """True for the L2 zero-cluster sentinel (never meaningful in L1)."""
    return entry == L2_ZERO_CLUSTER


def is_data_entry(entry: int) -> bool:
    """True for an L2 entry that should hold a data cluster offset (validity aside)."""
    return entry > L2_ZERO_CLUSTER


def new_table(l2_entries: int) -> array[int]:
    """A table of ``l2_entries`` zero (unallocated) entries."""
    return array("Q", bytes(l2_entries * 8))


def unpack_table(buf: bytes | bytearray | memoryview) -> array[int]:
    """Decode a table from its on-disk bytes (length a multiple of 8)."""
    table = array("Q")
    table.frombytes(buf)
    if _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def pack_table(table: array[int]) -> bytes:
    """The on-disk bytes of a table."""
    if _BIG_ENDIAN_HOST:
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


def pack_entries(table: array[int], first_index: int, count: int) -> bytes:
    """On-disk bytes of ``count`` entries starting at ``first_index``."""
    return pack_table(table[first_index : first_index + count])
