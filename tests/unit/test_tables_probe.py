"""qedkit.format.tables (L1/L2 entries, sentinels) and qedkit.format.probe."""

from __future__ import annotations

import struct
from array import array

import pytest

from qedkit.format.probe import probe_format
from qedkit.format.tables import (
    L1_UNALLOCATED,
    L2_UNALLOCATED,
    L2_ZERO_CLUSTER,
    is_data_entry,
    is_unallocated,
    is_zero_cluster,
    new_table,
    pack_entries,
    pack_table,
    unpack_table,
)

ENTRIES = [0, 1, 0x50000, 0x60000, 2**64 - 1, 0x123]


def test_sentinels() -> None:
    assert L1_UNALLOCATED == 0
    assert L2_UNALLOCATED == 0
    assert L2_ZERO_CLUSTER == 1


def test_pack_table_is_little_endian_u64() -> None:
    assert pack_table(array("Q", ENTRIES)) == struct.pack(f"<{len(ENTRIES)}Q", *ENTRIES)


def test_unpack_table_reads_little_endian_u64() -> None:
    table = unpack_table(struct.pack(f"<{len(ENTRIES)}Q", *ENTRIES))
    assert table.typecode == "Q"
    assert list(table) == ENTRIES


def test_unpack_accepts_bytearray_and_memoryview() -> None:
    raw = struct.pack("<2Q", 1, 0x50000)
    assert list(unpack_table(bytearray(raw))) == [1, 0x50000]
    assert list(unpack_table(memoryview(raw))) == [1, 0x50000]


def test_pack_unpack_round_trip() -> None:
    table = array("Q", ENTRIES)
    assert unpack_table(pack_table(table)) == table


def test_unpack_rejects_a_length_that_is_not_whole_entries() -> None:
    with pytest.raises(ValueError):
        unpack_table(bytes(12))


def test_new_table_is_all_unallocated() -> None:
    table = new_table(32768)
    assert len(table) == 32768
    assert not any(table)
    assert pack_table(table) == bytes(32768 * 8)


def test_pack_entries_packs_a_slice() -> None:
    table = array("Q", range(100))
    assert pack_entries(table, 64, 3) == struct.pack("<3Q", 64, 65, 66)


def test_entry_kinds() -> None:
    assert is_unallocated(0) and not is_unallocated(1)
    assert is_zero_cluster(1) and not is_zero_cluster(0) and not is_zero_cluster(0x50001)
    assert is_data_entry(0x50000) and is_data_entry(2) and is_data_entry(0x50001)
    assert not is_data_entry(0) and not is_data_entry(1)


# ---- probe -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"QED\x00" + bytes(60), "qed"),
        (b"QED\x00" + b"\xff" * 508, "qed"),  # nothing but the magic is checked
        (b"QED\x00" + bytes(59), "raw"),  # QEMU needs 64 bytes for a QED probe
        (b"QED\x01" + bytes(60), "raw"),
        (b"QFI\xfb\0\0\0\x03" + bytes(56), "qcow2"),
        (b"QFI\xfb\0\0\0\x02", "qcow2"),  # QEMU's qcow2 probe needs 8 bytes, version >= 2
        (b"QFI\xfb\0\0\0\x01" + bytes(56), "qcow"),  # the old qcow format
        (b"QFI\xfb" + bytes(60), "raw"),  # version 0: neither
        (b"QFI\xfb\0\0", "raw"),
        (b"", "raw"),
        (bytes(512), "raw"),
        (b"\x00QED" + bytes(60), "raw"),
    ],
)
def test_probe_format(data: bytes, fmt: str) -> None:
    assert probe_format(data) == fmt
