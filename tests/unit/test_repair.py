"""Repair beyond QEMU's: duplicate references get their own copy, leaks are reclaimed."""

from __future__ import annotations

import struct
from pathlib import Path

import qedkit

CS = 65536
L1 = CS  # the L1 table's offset in images qedkit creates


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack("<Q", f.read(8))[0])


def poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def image_with_data(path: Path) -> int:
    """Clusters 0..3 hold patterns 1..4; returns the L2 table offset."""
    qedkit.create(str(path), 8 << 20)
    with qedkit.open(str(path)) as img:
        for i in range(4):
            img.write(i * CS, bytes([i + 1]) * CS)
    return u64(path, L1)


def test_two_entries_sharing_a_cluster_each_keep_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 5, u64(path, l2 + 8 * 1))  # cluster 5 shares cluster 1's data
    with qedkit.open(str(path), readonly=True) as img:
        report = img.check()
        assert report.corruptions == 1
        before = img.read(0, 8 * CS)
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all")
        assert (report.corruptions, report.corruptions_fixed, report.leaks) == (0, 1, 0)
        assert img.read(0, 8 * CS) == before
        img.write(5 * CS, b"\xee" * CS)  # the copies are independent now
        assert img.read(CS, CS) == bytes([2]) * CS
        assert img.check().exit_code == 0


def test_an_entry_pointing_into_the_l1_table_gets_a_copy_of_those_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 6, L1)
    with qedkit.open(str(path), readonly=True) as img:
        before = img.read(6 * CS, CS)
    with qedkit.open(str(path), auto_repair=False) as img:
        assert img.check("all").corruptions == 0
        assert img.read(6 * CS, CS) == before
        img.write(6 * CS, bytes(CS))  # must not touch the real L1 table
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, CS) == bytes([1]) * CS
        assert img.check().exit_code == 0


def test_trailing_leaks_are_truncated_and_inner_ones_punched(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 2, 0)  # cluster 2's data becomes an inner leak
    with open(path, "ab") as f:
        f.write(b"\x77" * (3 * CS))  # three trailing leaked clusters
    size = path.stat().st_size
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("leaks")
        assert (report.leaks, report.leaks_fixed) == (4, 3)
    assert path.stat().st_size == size - 3 * CS
    with qedkit.open(str(path), readonly=True) as img:
        report = img.check()
        assert report.leaks == 1  # still spanned by the file, but a hole now
        assert img.read(3 * CS, CS) == bytes([4]) * CS


def test_leaks_next_to_a_corruption_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, 1 << 40)  # damaged entry: its cluster now leaks
    size = path.stat().st_size
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all")
        assert (report.corruptions_fixed, report.leaks, report.leaks_fixed) == (1, 1, 0)
    assert path.stat().st_size == size
    with open(path, "rb") as f:
        f.seek(lost)
        assert f.read(CS) == bytes([4]) * CS  # what the entry lost is still there
