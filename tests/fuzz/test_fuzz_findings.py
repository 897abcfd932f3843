"""Deterministic reproductions of what the fuzzer found, each asserting the correct
behaviour (see test_fuzz_images.py for the fuzzer itself).

1. A backing file name containing a NUL byte (e.g. ``backing_filename_offset`` 0,
   so the "name" starts with the magic ``QED\\0``) made ``open_image`` raise
   ``ValueError: embedded null byte`` from ``os.path.realpath``: a non-QedError
   escaping the library, and a traceback from ``qed map`` / ``qed convert`` /
   ``qed info --backing-chain`` / ``qed io``.
2. ``check -r all`` leaves a corruption behind when an L2 table's first cluster is
   also referenced as a data cluster by an earlier table and the later table holds
   an invalid entry: the scan skips a table whose clusters were already marked (as
   QEMU does, for the counts), so that table's invalid entries are never cleared, and
   the duplicate repair then runs with an invalid entry left (its precondition).
   A second ``check -r all`` fixes it; one must be enough.
3. ``check -r all`` destroys guest data that read correctly: when an L1 entry points
   at data clusters as if they were an L2 table, the data bytes are "invalid
   entries", and the first pass clears them by rewriting the "table", i.e. zeroing
   the data clusters in place, before the duplicate repair gives the two users
   their own clusters. The same runs at every read-write open of such an image
   with NEED_CHECK set.
4. With the home allocation policy (autoclear bit), the first allocating write
   builds the cluster map (engine.qed.alloc.ClusterMap.scan), which sizes its array
   from the raw L1 and L2 entries before any of them is validated: one entry far
   past the end of the file (a flipped high bit) makes it allocate an array of
   (offset / cluster size) entries: MemoryError, not a QedError, for a huge
   offset, and for offsets of a few TiB gigabytes of memory filled before
   ``get_l2`` would have rejected the entry.
5. ``check -r all`` changes guest data that an L2 entry reads from the L1 table
   itself: clearing an invalid L1 entry rewrote the L1 in place before the
   duplicate repair gave that data reference its own copy.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from qedtest import run

import qedkit
from qedkit.errors import QedError
from qedkit.format.header import FIELD_OFFSETS, Feature
from qedkit.format.tables import unpack_table

KiB, MiB = 1 << 10, 1 << 20


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))


# ---- 1. NUL byte in the backing file name ----------------------------------------------


@pytest.fixture
def nul_backing_name(tmp_path: Path) -> Path:
    """An image whose BACKING_FILE bit is set and whose name is the first 8 header
    bytes, ``QED\\0`` and the cluster size: it holds a NUL byte."""
    path = tmp_path / "nul.qed"
    qedkit.create(str(path), 1 * MiB, cluster_size=4096, table_size=2)
    _patch(path, FIELD_OFFSETS["features"], "<Q", int(Feature.BACKING_FILE))
    _patch(path, FIELD_OFFSETS["backing_filename_offset"], "<II", 0, 8)
    return path


def test_backing_name_with_nul_byte_raises_a_qed_error(nul_backing_name: Path) -> None:
    with pytest.raises(QedError):
        qedkit.open(str(nul_backing_name), readonly=True).close()


@pytest.mark.parametrize(
    "command",
    [
        ["map"],
        ["info", "--backing-chain"],
        ["io", "-r", "-c", "read 0 4k"],
        ["convert", "-O", "raw"],
    ],
    ids=["map", "info-backing-chain", "io", "convert"],
)
def test_backing_name_with_nul_byte_is_a_clean_cli_error(
    nul_backing_name: Path, command: list[str]
) -> None:
    argv = [sys.executable, "-m", "qedkit", *command, str(nul_backing_name)]
    if command[0] == "convert":
        argv.append(str(nul_backing_name.with_suffix(".raw")))
    result = run(argv, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stderr.startswith("qed: "), result.stderr


# ---- 2. one check -r all is not enough ----------------------------------------------------


def _two_tables(path: Path, *writes: tuple[int, bytes]) -> list[int]:
    """An 8 MiB image with 4 KiB clusters and 4 MiB per L2 table, ``writes`` made;
    returns its L1 table's entries (the L1 table is at 4096, two clusters long)."""
    qedkit.create(str(path), 8 * MiB, cluster_size=4096, table_size=2)
    with qedkit.open(str(path)) as img:
        for offset, data in writes:
            img.write(offset, data)
    with path.open("rb") as f:
        f.seek(4096)
        return unpack_table(f.read(8192))


def test_one_repair_clears_invalid_entries_of_a_table_also_used_as_data(tmp_path: Path) -> None:
    path = tmp_path / "dup.qed"
    table_a, table_b = _two_tables(path, (0, b"\x11" * 4096), (4 * MiB, b"\x22" * 4096))[:2]
    # Table A's entry 1 points at table B's first cluster (a duplicate reference, found
    # first as data), and table B's entry 1 is invalid (2).
    _patch(path, table_a + 8, "<Q", table_b)
    _patch(path, table_b + 8, "<Q", 2)

    with qedkit.open(str(path), auto_repair=False) as img:
        img.check("all")
    with qedkit.open(str(path), readonly=True) as img:
        report = img.check()
    assert report.corruptions == 0, [p.message for p in report.problems]


# ---- 3. check -r all zeroes data that an L1 entry also points at ------------------------


def test_repair_keeps_data_that_an_l1_entry_also_points_at(tmp_path: Path) -> None:
    path = tmp_path / "l1-at-data.qed"
    l1 = _two_tables(path, (4 * MiB, b"\x22" * 8192))  # two data clusters in the second span
    data = path.read_bytes()
    first_data = unpack_table(data[l1[1] : l1[1] + 8192])[0]
    # L1 entry 0 points at those two data clusters as if they were an L2 table.
    _patch(path, 4096, "<Q", first_data)
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(4 * MiB, 8192) == b"\x22" * 8192  # reads fine before the repair

    with qedkit.open(str(path), auto_repair=False) as img:
        img.check("all")
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(4 * MiB, 8192) == b"\x22" * 8192, "check -r all destroyed guest data"
        assert img.check().corruptions == 0


# ---- 5. check -r all changes data an L2 entry reads from the L1 table ----------------------


def test_repair_keeps_data_that_an_l2_entry_reads_from_the_l1_table(tmp_path: Path) -> None:
    path = tmp_path / "l2-at-l1.qed"
    l1 = _two_tables(path, (0, b"\x11" * 4096), (4 * MiB, b"\x22" * 4096))
    _patch(path, 4096, "<Q", l1[0] | 1)  # L1 entry 0: unaligned, invalid
    _patch(path, l1[1], "<Q", 4096)  # guest 4 MiB now reads the L1 table's first cluster
    with qedkit.open(str(path), readonly=True) as img:
        before = img.read(4 * MiB, 4096)
    assert before[:8] == (l1[0] | 1).to_bytes(8, "little")

    with qedkit.open(str(path), auto_repair=False) as img:
        img.check("all")
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(4 * MiB, 4096) == before, "check -r all changed guest data"
        assert img.check().corruptions == 0


# ---- 4. the home allocation policy trusts invalid entries ----------------------------------


@pytest.mark.parametrize("where", ["l1", "l2"])
def test_home_allocation_rejects_an_invalid_entry_past_the_end(tmp_path: Path, where: str) -> None:
    path = tmp_path / "home.qed"
    try:
        qedkit.create(
            str(path),
            8 * MiB,
            cluster_size=4096,
            table_size=2,
            allocation="home",  # type: ignore[call-arg]
        )
    except TypeError:
        pytest.skip("this qedkit has no home allocation policy")
    with qedkit.open(str(path)) as img:
        img.write(0, b"\x11" * 4096)
    l1 = unpack_table(path.read_bytes()[4096 : 4096 + 8192])
    if where == "l1":  # an unused L1 entry: an L2 table far past the end of the file
        _patch(path, 4096 + 8, "<Q", 1 << 60)
    else:  # an unused L2 entry of the first table: a data cluster far past the end
        _patch(path, l1[0] + 8 * 100, "<Q", 1 << 60)

    with pytest.raises(QedError), qedkit.open(str(path)) as img:
        img.write(64 * KiB, b"\x22" * 4096)  # an allocating write builds the cluster map
