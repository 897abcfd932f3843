"""Where QEMU 7.2 is wrong, qedkit is held to the spec (fact sheet §2.12, §2.8).

These tests do not ask QEMU to agree with us on the buggy operation; they assert our
own expectations, and let QEMU judge only what it judges correctly (reading our
result, checking it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qedoracle import (
    Expected,
    Judge,
    KiB,
    Layout,
    MiB,
    RawRef,
    Shadow,
    needs_check,
    pattern,
    poke_u64,
)

import qedkit

pytestmark = pytest.mark.qemu


def test_partial_write_into_a_zero_cluster_over_a_backing_file_leaves_zeros(
    judge: Judge, tmp_path: Path
) -> None:
    """QEMU bug 3: QEMU fills the rest of the new cluster from the backing file."""
    c = 64 * KiB
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(0xAA, 4 * c))
    top = tmp_path / "top.qed"
    sh = Shadow.create(top, 4 * c, backing=base)
    sh.write_zeroes(0, c)  # a zero cluster (entry 1) hiding 0xAA
    sh.write(0, 4096, 0xBB)  # partial write into it
    sh.write_zeroes(2 * c, 2 * c)
    sh.write(3 * c - 100, 200, 0xCC)  # across two zero clusters
    assert sh.image.read(4096, c - 4096) == bytes(c - 4096)
    assert sh.image.read(2 * c, c - 100) == bytes(c - 100)
    assert sh.image.read(3 * c + 100, c - 100) == bytes(c - 100)
    sh.close()
    with qedkit.open(str(top), readonly=True) as img:
        assert img.read(0, 4096) == pattern(0xBB, 4096)
        assert img.read(4096, c - 4096) == bytes(c - 4096)
    # QEMU reads our result correctly (its bug is in its own write path)
    judge.qemu.io(
        "-r",
        "-c",
        "read -P 0xbb 0 4096",
        "-c",
        f"read -P 0 4096 {c - 4096}",
        "-c",
        f"read -P 0xaa {c} {c}",
        top,
    )
    judge.judge(top, sh.expected, cluster_size=c, table_size=4)


def test_table_size_1_images_open_read_write_and_check_in_qedkit(
    judge: Judge, tmp_path: Path
) -> None:
    """QEMU bug 1: it creates table_size 1 images but can never open them."""
    img = tmp_path / "t1.qed"
    judge.qemu.img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", img, "2M")
    assert Layout.read(img).table_size == 1
    exp = Expected(tmp_path / "t1.expected.raw", 2 * MiB)
    sh = Shadow(qedkit.open(str(img)), exp)
    # with 4 KiB clusters and table_size 1 an L2 table maps 512 clusters (2 MiB)
    sh.write(4000, 200, 0x11)
    sh.write_zeroes(64 * KiB, 8192)
    sh.write(64 * KiB + 5, 5, 0x12)
    sh.write(2 * MiB - 100, 100, 0x13)
    sh.close()
    assert not needs_check(img)
    with qedkit.open(str(img), readonly=True) as ro:
        assert ro.read(0, 2 * MiB) == exp.read(0, 2 * MiB)
        report = ro.check()
    assert report.exit_code == 0 and report.corruptions == 0 and report.leaks == 0
    res = judge.qed("check", "--output=json", img)
    assert res.returncode == 0, res.stdout + res.stderr
    lay = Layout.read(img)
    refs = lay.references()
    assert all(n == 1 for n in refs.values())
    assert set(refs) == set(range(1, lay.file_clusters()))
    # a bigger one, with writes across the boundaries of its L2 tables
    big = tmp_path / "t1big.qed"
    judge.qemu.img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", big, "64M")
    with qedkit.open(str(big)) as rw:
        for k in range(5):
            rw.write(k * 2 * MiB + MiB - 1, pattern(0x20 + k, MiB + 2))  # across L2 tables
    with qedkit.open(str(big), readonly=True) as ro:
        for k in range(5):
            assert ro.read(k * 2 * MiB + MiB - 1, MiB + 2) == pattern(0x20 + k, MiB + 2)
        assert ro.read(0, MiB - 1) == bytes(MiB - 1)
        assert ro.check().exit_code == 0
    assert (
        json.loads(judge.qed("check", "--output=json", big).stdout)["allocated-clusters"] == 5 * 258
    )


def test_no_phantom_leaks_on_a_4k_cluster_file_with_more_than_4095_clusters(
    judge: Judge, tmp_path: Path
) -> None:
    """QEMU bug 2a: its check divides by cluster_size - 1 and reports leaks that are
    not there once the file holds >= 4095 clusters of 4 KiB."""
    img = tmp_path / "big4k.qed"
    size = 20 * MiB
    sh = Shadow.create(img, size, cluster_size=4096, table_size=4)
    sh.write(0, 17 * MiB, 0x5C)  # one request; qedkit has no bug 2b
    sh.write(19 * MiB + 7, 4096, 0x5D)
    sh.close()
    lay = Layout.read(img)
    assert lay.file_clusters() > 4095

    # QEMU: a leak that is not there (rc 3)
    rc, report = judge.check_json(img)
    assert rc == 3 and report.get("leaks", 0) >= 1, report
    assert "corruptions" not in report
    # qed check: clean
    res = judge.qed("check", "--output=json", img)
    assert res.returncode == 0, res.stdout + res.stderr
    ours = json.loads(res.stdout)
    assert "leaks" not in ours and "corruptions" not in ours
    assert ours["allocated-clusters"] == report["allocated-clusters"]
    # proof, without qedkit: every cluster past the header is referenced exactly once
    refs = lay.references()
    assert all(n == 1 for n in refs.values()), "a cluster is referenced twice"
    assert set(refs) == set(range(lay.header_size, lay.file_clusters())), (
        "some cluster is not referenced: a real leak"
    )
    # and the data is right (compare and reads do not use the buggy division)
    judge.assert_compare(img, sh.expected)


def test_growing_over_a_longer_backing_file_hides_the_backing_data(
    judge: Judge, tmp_path: Path
) -> None:
    """QEMU refuses this resize; qedkit grows and zeroes the new range so the backing
    file's data past the old size never shows through."""
    c = 64 * KiB
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(0xAB, 2 * MiB))
    top = tmp_path / "top.qed"
    old = MiB + 3 * 512  # ends inside a cluster
    sh = Shadow.create(top, old, backing=base)
    sh.write(old - 1000, 10, 0x01)  # allocate the partial last cluster
    sh.resize(2 * MiB)
    assert sh.image.read(old, 2 * MiB - old) == bytes(2 * MiB - old)
    assert sh.image.read(0, 100) == pattern(0xAB, 100)
    sh.close()
    with qedkit.open(str(top), readonly=True) as img:
        assert img.size == 2 * MiB
        assert img.read(old, 2 * MiB - old) == bytes(2 * MiB - old)
        assert img.read(old - 990, 990) == pattern(0xAB, 990)
    # QEMU reads it as we do
    judge.judge(top, sh.expected, cluster_size=c, table_size=4)
    judge.qemu.io("-r", "-c", f"read -P 0 {old} {2 * MiB - old}", top)

    # the same when the old size is cluster-aligned and nothing was allocated
    top2 = tmp_path / "top2.qed"
    sh2 = Shadow.create(top2, MiB, backing=base)
    sh2.resize(MiB + 5 * c + 512)
    sh2.close()
    judge.judge(top2, sh2.expected, cluster_size=c, table_size=4)
    assert RawRef(base).read(0, 2 * MiB) == pattern(0xAB, 2 * MiB)


def test_repair_leaks_only_does_not_touch_corruptions(judge: Judge, tmp_path: Path) -> None:
    """QEMU's ``check -r leaks`` repairs corruptions too (it has a single fix flag);
    qedkit's ``-r leaks`` leaves them, on purpose, and ``-r all`` repairs them."""
    img = tmp_path / "bad.qed"
    judge.qemu.img("create", "-q", "-f", "qed", img, "4M")
    judge.qemu.io("-c", "write -P 0x61 0 192k", img)
    lay = Layout.read(img)
    poke_u64(img, lay.l2_entry_offset(0, 1), (lay.file_clusters() + 3) * lay.cluster_size)
    before = img.read_bytes()
    res = judge.qed("check", "-r", "leaks", "--output=json", img)
    assert res.returncode == 2, res.stdout + res.stderr
    assert json.loads(res.stdout)["corruptions"] == 1
    assert img.read_bytes() == before
    res = judge.qed("check", "-r", "all", "--output=json", img)
    report = json.loads(res.stdout)
    assert report["corruptions-fixed"] == 1
    # The cluster the bad entry pointed at leaked: saved to lost+found, then removed.
    assert report["lost-and-found"]["clusters"] == 1 and report["leaks-fixed"] == 1
    assert res.returncode == 0
    judge.assert_clean(img)
    judge.qemu.io(
        "-r",
        "-c",
        "read -P 0x61 0 64k",
        "-c",
        "read -P 0 64k 64k",
        "-c",
        "read -P 0x61 128k 64k",
        img,
    )


def test_qedkit_maps_geometries_where_qemu_block_status_overflows(
    judge: Judge, tmp_path: Path
) -> None:
    """QEMU 7.2 aborts in block status (map/compare/convert) when one run inside an L2
    table reaches 4 GiB: 64 KiB clusters with table_size 16 map 8 GiB per table.
    qedkit's map is exact there; QEMU judges the data through reads and check."""
    c = 64 * KiB
    img = tmp_path / "wide.qed"
    size = 10 * (1 << 30)
    sh = Shadow.create(img, size, cluster_size=c, table_size=16)
    sh.write(0, 4096, 0x71)
    sh.write(9 * (1 << 30) + 5, 10, 0x72)
    sh.write_zeroes(5 * (1 << 30), 2 * c)
    entries = [(e.start, e.length, e.present, e.zero, e.data) for e in sh.image.map()]
    sh.close()
    G = 1 << 30
    assert entries == [
        (0, c, True, False, True),
        (c, 5 * G - c, False, True, False),
        (5 * G, 2 * c, True, True, False),
        (5 * G + 2 * c, 4 * G - 2 * c, False, True, False),
        (9 * G, c, True, False, True),
        (9 * G + c, G - c, False, True, False),
    ]
    judge.judge(
        img, sh.expected, cluster_size=c, table_size=16, extra_ranges=[(5 * G - c, 5 * G + 3 * c)]
    )
