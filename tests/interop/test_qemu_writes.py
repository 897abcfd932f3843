"""Images QEMU writes, read by qedkit.

qemu-img creates images of every geometry, qemu-io writes patterns (unaligned, across
cluster and L2-table boundaries, ``write -z`` whole and partial), qemu-img converts
raw files, builds backing chains, rebases and commits. qedkit must read every byte as
``qemu-img convert -O raw`` produces it, and ``qed check`` must find them clean.

QEMU's writes stay small (its allocating writes of >= cluster_size - 1 clusters in one
L2 table corrupt the image) and never partially overwrite a zero cluster above a backing
file (QEMU copies backing data into it); see qedoracle's docstring.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qedoracle import (
    GEOMETRIES,
    Expected,
    Judge,
    KiB,
    Layout,
    MiB,
    RawRef,
    assert_qedkit_reads,
    block_status_safe,
    l2_span,
    pattern,
)

import qedkit

pytestmark = pytest.mark.qemu


class QemuWriter:
    """qemu-io commands on one image, mirrored into an Expected disk."""

    def __init__(self, judge: Judge, path: Path, expected: Expected) -> None:
        self.judge = judge
        self.path = path
        self.expected = expected
        self.script: list[str] = []

    def write(self, off: int, n: int, byte: int) -> None:
        assert n <= 4 * MiB, "keep QEMU's allocating writes small"
        self.script.append(f"write -P {byte:#x} {off} {n}")
        self.expected.write(off, pattern(byte, n))

    def zero(self, off: int, n: int) -> None:
        self.script.append(f"write -z {off} {n}")
        self.expected.zero(off, n)

    def discard(self, off: int, n: int) -> None:
        self.script.append(f"discard {off} {n}")  # a no-op in QEMU's QED

    def run(self) -> None:
        args: list[str | os.PathLike[str]] = []
        for cmd in self.script:
            args += ["-c", cmd]
        self.judge.qemu.io(*args, self.path)
        self.script = []


def reference(judge: Judge, path: Path, expected: Expected | None, cs: int, ts: int) -> RawRef:
    """QEMU's view of the image as a raw file: ``qemu-img convert -O raw``, or where
    QEMU's block status would abort on the geometry, the expected disk once qemu-io has
    confirmed it with pattern reads."""
    size = Layout.read(path).image_size
    if block_status_safe(size, cs, ts):
        ref = judge.convert_to_raw(path, path.with_suffix(".ref.raw"))
        if expected is not None:
            for start, end in expected.windows(cs):
                assert ref.read(start, end - start) == expected.read(start, end - start)
        return ref
    assert expected is not None
    judge.assert_reads(path, expected, cluster_size=cs)
    return expected


def assert_qed_check_agrees(judge: Judge, path: Path) -> None:
    """``qed check`` is clean and its JSON equals qemu-img's."""
    judge.assert_qed_clean(path)
    judge.assert_parity("check", "--output=json", path, files=[path])


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_qemu_io_written_images_read_identically_in_qedkit(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    span = l2_span(cs, ts)
    size = span + 4 * c + 512
    img = tmp_path / "q.qed"
    judge.qemu.img(
        "create", "-q", "-f", "qed", "-o", f"cluster_size={cs},table_size={ts}", img, str(size)
    )
    exp = Expected(tmp_path / "q.expected.raw", size)
    q = QemuWriter(judge, img, exp)
    q.write(c - 100, 300, 0x11)
    q.write(3 * c + 1000, 2 * c, 0x22)
    q.write(span - 1000, 5000, 0x33)  # across the L2 boundary
    q.zero(6 * c, 2 * c)  # zero clusters
    q.zero(3 * c + 2000, c)  # unaligned: QEMU writes real zeros
    q.write(6 * c + 10, 20, 0x44)  # partial write into a zero cluster (no backing file)
    q.write(9 * c, c, 0x55)
    q.zero(9 * c, c)  # allocated: zeroed in place
    q.write(size - 300, 300, 0x66)  # the partial last cluster
    q.discard(3 * c, c)
    q.run()

    ref = reference(judge, img, exp, cs, ts)
    assert_qedkit_reads(img, ref, cluster_size=cs)
    assert_qed_check_agrees(judge, img)
    if block_status_safe(size, cs, ts):
        judge.assert_parity("map", "--output=json", img, files=[img])


@pytest.mark.parametrize(
    ("cs", "ts"),
    [
        pytest.param(4 * KiB, 2, id="c4K-t2"),
        pytest.param(4 * KiB, 16, id="c4K-t16"),
        pytest.param(64 * KiB, 4, id="c64K-t4"),
        pytest.param(1 * MiB, 8, id="c1M-t8"),
        pytest.param(2 * MiB, 2, id="c2M-t2"),
    ],
)
def test_images_qemu_converts_from_raw_read_identically(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    src = tmp_path / "src.raw"
    size = 5 * MiB + 100000  # not a multiple of 512: QEMU rounds the image up
    with open(src, "wb") as f:
        f.truncate(size)
        for off, byte, n in (
            (0, 0x10, 700),
            (MiB - 5, 0x20, 10),
            (3 * MiB, 0x30, 200 * KiB),
            (4 * MiB + 4096, 0x00, 8192),
            (size - 3, 0x40, 3),
        ):
            os.pwrite(f.fileno(), pattern(byte, n), off)
    img = tmp_path / "conv.qed"
    judge.qemu.img(
        "convert", "-f", "raw", "-O", "qed", "-o", f"cluster_size={cs},table_size={ts}", src, img
    )
    ref = judge.convert_to_raw(img, tmp_path / "conv.ref.raw")
    assert ref.size == (size + 511) // 512 * 512
    assert ref.read(0, size) == RawRef(src).read(0, size)
    assert_qedkit_reads(img, ref, cluster_size=cs)
    assert_qed_check_agrees(judge, img)
    judge.assert_parity("map", "--output=json", img, files=[img])


def _qemu_chain(judge: Judge, d: Path) -> tuple[Path, Path, Path]:
    """base.raw (shorter) <- mid.qed <- top.qed, all written by QEMU."""
    c = 64 * KiB
    base, mid, top = d / "base.raw", d / "mid.qed", d / "top.qed"
    judge.qemu.img("create", "-q", "-f", "raw", base, str(3 * c))
    judge.qemu.io("-f", "raw", "-c", f"write -P 0xb1 0 {3 * c}", base)
    judge.qemu.img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", mid, str(5 * c))
    judge.qemu.io(
        "-c",
        f"write -P 0xb2 {c + 7} 100",
        "-c",
        f"write -z {2 * c} {c}",
        "-c",
        f"write -P 0xb3 {4 * c - 10} 20",
        mid,
    )
    judge.qemu.img(
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "mid.qed",
        "-F",
        "qed",
        "-o",
        "cluster_size=4096",
        top,
        str(6 * c + 512),
    )
    # QEMU must not partially overwrite a zero cluster over a backing file (its bug 3);
    # the middle layer's zero cluster is covered by whole clusters here
    judge.qemu.io(
        "-c",
        f"write -P 0xc1 {c - 100} 200",
        "-c",
        f"write -z {3 * c} {c}",
        "-c",
        f"write -P 0xc2 {2 * c} 4096",
        "-c",
        f"write -P 0xc3 {6 * c} 512",
        top,
    )
    return base, mid, top


def test_backing_chains_qemu_builds_read_identically(judge: Judge, tmp_path: Path) -> None:
    _base, mid, top = _qemu_chain(judge, tmp_path)
    for img in (mid, top):
        ref = judge.convert_to_raw(img, img.with_suffix(".ref.raw"))
        assert_qedkit_reads(img, ref, cluster_size=4096)
        assert_qed_check_agrees(judge, img)
    assert Layout.read(mid).features == 0x05 and Layout.read(top).features == 0x01


def test_unsafe_rebase_and_backing_removal_by_qemu_are_honoured(
    judge: Judge, tmp_path: Path
) -> None:
    _base, mid, top = _qemu_chain(judge, tmp_path)
    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.write(pattern(0xEE, 6 * 64 * KiB))
    judge.qemu.img("rebase", "-u", "-b", "other.raw", "-F", "raw", mid)
    assert Layout.read(mid).features == 0x05
    ref = judge.convert_to_raw(top, tmp_path / "top.ref.raw")
    assert_qedkit_reads(top, ref, cluster_size=4096)
    with qedkit.open(str(mid), readonly=True) as img:
        assert img.read(0, 10) == pattern(0xEE, 10)  # the new backing file shows through

    judge.qemu.img("rebase", "-u", "-b", "", mid)
    lay = Layout.read(mid)
    assert lay.features == 0  # QEMU leaves offset 64 and the old name bytes behind
    ref = judge.convert_to_raw(mid, tmp_path / "mid.ref.raw")
    assert_qedkit_reads(mid, ref, cluster_size=64 * KiB)
    with qedkit.open(str(mid), readonly=True) as img:
        assert img.engine.backing is None
        assert img.read(0, 64 * KiB) == bytes(64 * KiB)
    judge.assert_parity("info", "--output=json", mid, files=[mid])
    assert_qed_check_agrees(judge, mid)


def test_safe_rebase_by_qemu_reads_identically(judge: Judge, tmp_path: Path) -> None:
    _base, _mid, top = _qemu_chain(judge, tmp_path)
    before = judge.convert_to_raw(top, tmp_path / "before.raw")
    new_base = tmp_path / "new.raw"
    with open(new_base, "wb") as f:
        f.write(pattern(0x5A, 4 * 64 * KiB))
    judge.qemu.img("rebase", "-b", "new.raw", "-F", "raw", top)
    assert Layout.read(top).features == 0x05
    after = judge.convert_to_raw(top, tmp_path / "after.raw")
    assert after.read(0, after.size) == before.read(0, before.size)  # rebase keeps the view
    assert_qedkit_reads(top, after, cluster_size=4096)
    assert_qed_check_agrees(judge, top)


def test_commit_by_qemu_reads_identically(judge: Judge, tmp_path: Path) -> None:
    _base, mid, top = _qemu_chain(judge, tmp_path)
    top_before = judge.convert_to_raw(top, tmp_path / "top.before.raw")
    judge.qemu.img("commit", "-q", top)
    # the middle layer now holds the top's data (within its size); QED has no
    # make_empty, so the top keeps its clusters and still reads the same
    mid_ref = judge.convert_to_raw(mid, tmp_path / "mid.ref.raw")
    assert mid_ref.read(0, mid_ref.size) == top_before.read(0, mid_ref.size)
    assert_qedkit_reads(mid, mid_ref, cluster_size=64 * KiB)
    assert_qedkit_reads(top, top_before, cluster_size=4096)
    assert_qed_check_agrees(judge, mid)
    assert_qed_check_agrees(judge, top)
