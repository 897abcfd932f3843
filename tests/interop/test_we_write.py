"""Images qedkit writes, judged by QEMU.

For every geometry QEMU can open, qedkit writes through the Python API and through
``qed io``: unaligned writes across cluster and L2-table boundaries, whole and partial
write-zeroes, discard, growth; and over backing chains (raw shorter than the overlay,
qed, chains of three, relative names in subdirectories). A sparse raw file gets the
same bytes. QEMU then says: ``qemu-img check`` is clean, ``qemu-img compare`` finds the
image identical to the raw file, and ``qemu-io read -P`` sees every pattern.
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
    Shadow,
    l2_span,
    needs_check,
    pattern,
)

import qedkit

pytestmark = pytest.mark.qemu

# A smaller matrix for the backing-chain scenarios: one geometry per cluster-size class.
BACKING_GEOMETRIES = [
    pytest.param(4 * KiB, 8, id="c4K-t8"),
    pytest.param(64 * KiB, 4, id="c64K-t4"),
    pytest.param(1 * MiB, 2, id="c1M-t2"),
]


def assert_well_formed(path: Path, cluster_size: int) -> None:
    """What QEMU needs of a file at rest: whole clusters, NEED_CHECK clear."""
    assert os.path.getsize(path) % cluster_size == 0, "the file must end on a cluster boundary"
    assert not needs_check(path), "NEED_CHECK left set after a clean close"


def write_raw(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A sparse raw file of ``size`` bytes with ``pieces`` written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            os.pwrite(f.fileno(), data, off)


# =====================================================================================
# one image, every geometry
# =====================================================================================


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_api_writes_across_clusters_and_l2_tables_read_identically_in_qemu(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    span = l2_span(cs, ts)
    size = span + 6 * c + 1536  # a second L2 table, and a partial last cluster
    img = tmp_path / "img.qed"
    sh = Shadow.create(img, size, cluster_size=cs, table_size=ts)

    sh.write(c - 100, 300, 0x11)  # unaligned, across the boundary of clusters 0 and 1
    sh.write(3 * c + 1000, 2 * c, 0x22)  # unaligned both ends, three clusters
    sh.write(span - 1000, 5000, 0x33)  # across the boundary of the two L2 tables
    sh.write(c - 50, 100, 0x44)  # in place, inside allocated clusters
    sh.write_zeroes(8 * c, 2 * c)  # whole unallocated clusters: zero clusters
    sh.write_zeroes(3 * c + 2000, c)  # partial, inside allocated clusters
    sh.write_zeroes(11 * c + 100, 200)  # partial, unallocated (reads zero already)
    sh.write(8 * c + 10, 20, 0x55)  # partial write into a zero cluster
    sh.write(12 * c, 2 * c, 0x66)
    sh.write_zeroes(12 * c, 2 * c)  # whole allocated clusters: zeroed in place
    sh.write(14 * c + 7, 3 * c, 0x77)
    sh.discard(14 * c + 7, 3 * c)  # advisory; whole clusters 15 and 16 may read zero
    sh.write_zeroes(span - 2 * c, 4 * c)  # across the L2 boundary, partly allocated
    sh.write(span + 2 * c + 5, 3, 0x78)
    sh.write(size - 700, 700, 0x88)  # into the partial last cluster
    for off, n in ((0, 20 * c), (span - 4 * c, 8 * c), (size - 2 * c, 2 * c)):
        sh.read_check(off, n)
    sh.close()
    assert_well_formed(img, cs)
    judge.judge(img, sh.expected, cluster_size=cs, table_size=ts)

    # grow, then write into the new tail (QEMU must see zeros in between)
    sh = Shadow.reopen(img, sh.expected)
    new_size = size + 3 * c + 512
    sh.resize(new_size)
    sh.write(new_size - 100, 100, 0x99)
    sh.write(size + 5, 10, 0x9A)  # right after the old end, in the old last cluster
    sh.close()
    assert_well_formed(img, cs)
    assert Layout.read(img).image_size == new_size
    judge.judge(img, sh.expected, cluster_size=cs, table_size=ts)


def _resolve_discard(
    path: Path, expected: Expected, offset: int, length: int, cluster_size: int
) -> None:
    """After ``qed io -c discard``: each cluster of the range reads as before or as
    zeros (whole clusters only); record what qedkit made of it."""
    before = expected.read(offset, length)
    with qedkit.open(str(path), readonly=True) as img:
        after = img.read(offset, length)
    pos = offset
    while pos < offset + length:
        end = min(offset + length, (pos // cluster_size + 1) * cluster_size)
        got, old = after[pos - offset : end - offset], before[pos - offset : end - offset]
        assert got in (old, bytes(len(got))), f"discard left foreign bytes at {pos}"
        if got != old:
            assert pos % cluster_size == 0 and end % cluster_size == 0, pos
        pos = end
    expected.write(offset, after)


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_qed_io_commands_read_identically_in_qemu(
    cli_judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    """The real ``qed`` command (a subprocess) creates and writes."""
    c = cs
    span = l2_span(cs, ts)
    size = span + 2 * c + 512
    img = tmp_path / "cli.qed"
    res = cli_judge.qed(
        "create", "-f", "qed", "-o", f"cluster_size={cs},table_size={ts}", img, str(size)
    )
    assert res.returncode == 0, res.stderr
    exp = Expected(tmp_path / "cli.expected.raw", size)
    script: list[str] = []

    def write(off: int, n: int, byte: int) -> None:
        script.append(f"write -P {byte:#x} {off} {n}")
        exp.write(off, pattern(byte, n))

    def zero(off: int, n: int, unmap: bool = False) -> None:
        script.append(f"write -z {'-u ' if unmap else ''}{off} {n}")
        exp.zero(off, n)

    write(c - 1, 2, 0xA1)  # two bytes across a cluster boundary
    write(2 * c + 512, c, 0xA2)
    zero(4 * c, c)  # a zero cluster
    write(4 * c + 100, 100, 0xA3)  # partial write into it
    zero(2 * c + 1000, 100)  # partial, in place
    write(6 * c, 2 * c, 0xA4)
    zero(6 * c, 2 * c, unmap=True)  # allocated: zeros (space may be released)
    write(span - 1, 2, 0xA5)  # across the L2 boundary
    write(size - 512, 512, 0xA6)  # the last sector
    script.append(f"write -P 0xa7 {9 * c} {2 * c}")
    exp.write(9 * c, pattern(0xA7, 2 * c))
    script.append(f"read -P 0xa5 {span - 1} 2")
    script.append(f"read -P 0 {4 * c} 100")
    script.append(f"discard {9 * c + 3} {2 * c - 3}")  # last: resolved below
    args: list[str | os.PathLike[str]] = ["io"]
    for cmd in script:
        args += ["-c", cmd]
    res = cli_judge.qed(*args, img)
    assert res.returncode == 0, f"{res.stdout}{res.stderr}"
    _resolve_discard(img, exp, 9 * c + 3, 2 * c - 3, cs)

    assert_well_formed(img, cs)
    cli_judge.judge(img, exp, cluster_size=cs, table_size=ts)


# =====================================================================================
# backing chains
# =====================================================================================


@pytest.mark.parametrize(("cs", "ts"), BACKING_GEOMETRIES)
def test_overlay_on_a_shorter_raw_backing_file_reads_identically_in_qemu(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    base = tmp_path / "base.raw"
    base_size = 4 * c + c // 2 + 512  # ends inside cluster 4
    write_raw(
        base,
        base_size,
        [(0, pattern(0xB1, c + 300)), (2 * c + c // 2, pattern(0xB2, base_size - 2 * c - c // 2))],
    )
    size = 8 * c + 1024
    top = tmp_path / "top.qed"
    sh = Shadow.create(top, size, cluster_size=cs, table_size=ts, backing=base)

    sh.write(100, 50, 0x11)  # copy-on-write from the backing file on both sides
    sh.write(4 * c + 100, 10, 0x12)  # cluster cut by the backing file's end: zeros after it
    sh.write(6 * c + 3, 7, 0x13)  # past the backing file
    sh.write_zeroes(c, c)  # a zero cluster hiding backing data
    sh.write_zeroes(3 * c + 200, 100)  # partial zeroing over backing data: allocates
    sh.write(c + 10, 20, 0x14)  # partial write into the zero cluster: the rest stays zero
    sh.write_zeroes(7 * c, c)  # a zero cluster past the backing file
    sh.discard(0, c)  # an allocated cluster: old data or zeros, never backing data
    sh.close()
    assert_well_formed(top, cs)
    judge.judge(top, sh.expected, cluster_size=cs, table_size=ts)

    # grow: allowed because the backing file is shorter than the old size
    sh = Shadow.reopen(top, sh.expected)
    sh.resize(size + 2 * c)
    sh.write(size + 2 * c - 10, 10, 0x15)
    sh.close()
    judge.judge(top, sh.expected, cluster_size=cs, table_size=ts)
    assert RawRef(base).read(0, base_size) == pattern(0xB1, c + 300) + bytes(
        2 * c + c // 2 - c - 300
    ) + pattern(0xB2, base_size - 2 * c - c // 2), "the backing file was modified"


@pytest.mark.parametrize(("cs", "ts"), BACKING_GEOMETRIES)
def test_overlay_on_a_qed_backing_file_reads_identically_in_qemu(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    base_path = tmp_path / "base.qed"
    base = Shadow.create(base_path, 6 * c, cluster_size=cs, table_size=ts)
    base.write(0, 3 * c, 0xC1)
    base.write_zeroes(3 * c, c)
    base.write(4 * c + 10, 20, 0xC2)
    base.close()
    judge.judge(base_path, base.expected, cluster_size=cs, table_size=ts)

    top_path = tmp_path / "top.qed"
    top = Shadow.create(
        top_path,
        8 * c,
        cluster_size=cs,
        table_size=ts,
        backing=base_path,
        backing_expected=base.expected,
    )
    top.write(c // 2, 100, 0x21)  # copy-on-write from qed data
    top.write(3 * c + 5, 5, 0x22)  # copy-on-write from a qed zero cluster
    top.write_zeroes(c, c)  # hides backing data
    top.write_zeroes(2 * c + 100, 100)  # partial over backing data
    top.write(4 * c - 3, 6, 0x23)  # across clusters 3|4
    top.write(7 * c, 100, 0x24)  # past the backing image
    top.close()
    assert Layout.read(top_path).features & 0x05 == 0x01, "qed backing: no NO_PROBE bit"
    judge.judge(top_path, top.expected, cluster_size=cs, table_size=ts)
    judge.judge(base_path, base.expected, cluster_size=cs, table_size=ts)


@pytest.mark.parametrize(("cs", "ts"), BACKING_GEOMETRIES)
def test_chain_of_three_reads_identically_in_qemu(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    base = tmp_path / "base.raw"
    write_raw(base, 3 * c, [(0, pattern(0xD1, 3 * c))])
    mid = Shadow.create(tmp_path / "mid.qed", 5 * c, cluster_size=cs, table_size=ts, backing=base)
    mid.write(c + 1, 10, 0xD2)
    mid.write_zeroes(2 * c, c)
    mid.write(4 * c, 50, 0xD3)
    mid.close()
    top = Shadow.create(
        tmp_path / "top.qed",
        7 * c + 512,
        cluster_size=cs,
        table_size=ts,
        backing=tmp_path / "mid.qed",
        backing_expected=mid.expected,
    )
    top.write(7, 7, 0xE1)  # copy-on-write through two layers
    top.write(c + c // 2, 3, 0xE2)  # over the middle layer's data
    top.write(2 * c + 9, 9, 0xE3)  # over the middle layer's zero cluster
    top.write_zeroes(4 * c, c)
    top.write(6 * c, c + 512, 0xE4)
    top.close()
    judge.judge(tmp_path / "top.qed", top.expected, cluster_size=cs, table_size=ts)
    judge.judge(tmp_path / "mid.qed", mid.expected, cluster_size=cs, table_size=ts)


def test_relative_backing_names_resolve_against_the_image_directory(
    judge: Judge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = 64 * KiB
    sub = tmp_path / "images" / "sub"
    other = tmp_path / "images" / "other"
    sub.mkdir(parents=True)
    other.mkdir()
    write_raw(sub / "base.raw", 2 * c, [(c - 10, pattern(0xF1, 20))])
    # from a different working directory, with names relative to the images
    monkeypatch.chdir(tmp_path)
    mid = Shadow.create(
        Path("images/sub/mid.qed"), 3 * c, backing=sub / "base.raw", backing_name="base.raw"
    )
    mid.write(c + 5, 5, 0xF2)
    mid.close()
    top = Shadow.create(
        Path("images/other/top.qed"),
        4 * c,
        backing=sub / "mid.qed",
        backing_name="../sub/mid.qed",
        backing_expected=mid.expected,
    )
    top.write(2 * c - 1, 2, 0xF3)
    top.close()

    def stored_name(path: Path) -> bytes:
        lay = Layout.read(path)
        with open(path, "rb") as f:
            f.seek(lay.backing_filename_offset)
            return f.read(lay.backing_filename_size)

    assert stored_name(sub / "mid.qed") == b"base.raw"
    assert stored_name(other / "top.qed") == b"../sub/mid.qed"
    assert Layout.read(sub / "mid.qed").features == 0x05  # backing file, raw (no probe)
    # QEMU run from elsewhere, with absolute and relative paths
    judge.judge(other / "top.qed", top.expected, cluster_size=c, table_size=4)
    res = judge.qemu.img(
        "compare",
        "-f",
        "qed",
        "-F",
        "raw",
        "images/other/top.qed",
        top.expected.path.resolve(),
        cwd=tmp_path,
    )
    assert res.returncode == 0
    res = judge.qemu.img(
        "compare", "-f", "qed", "-F", "raw", "top.qed", top.expected.path.resolve(), cwd=other
    )
    assert res.returncode == 0
    judge.judge(sub / "mid.qed", mid.expected, cluster_size=c, table_size=4)


def test_raw_backing_file_that_looks_like_qed_is_read_raw(judge: Judge, tmp_path: Path) -> None:
    """NO_PROBE: a raw backing file starting with the QED magic stays raw."""
    c = 64 * KiB
    base = tmp_path / "magic.raw"
    head = b"QED\0" + (c).to_bytes(4, "little") + (4).to_bytes(4, "little")
    base.write_bytes(head + pattern(0x42, 2 * c - len(head)))
    top = tmp_path / "top.qed"
    sh = Shadow.create(top, 3 * c, backing=base)
    assert sh.image.read(0, 4) == b"QED\0"
    sh.write(c - 2, 4, 0x01)
    sh.write(5, 3, 0x02)  # copy-on-write of the magic bytes themselves
    sh.close()
    assert Layout.read(top).features == 0x05
    judge.judge(top, sh.expected, cluster_size=c, table_size=4)


def test_one_write_spanning_three_l2_tables_reads_identically_in_qemu(
    judge: Judge, tmp_path: Path
) -> None:
    cs, ts = 4 * KiB, 2  # one L2 table maps 4 MiB
    span = l2_span(cs, ts)
    img = tmp_path / "wide.qed"
    sh = Shadow.create(img, 3 * span + MiB, cluster_size=cs, table_size=ts)
    sh.write(span - 4097, 2 * span + 8194, 0x3C)  # from table 0 into table 3
    sh.write_zeroes(span - 8192, 2 * span + 16384)  # zeroing likewise: data and new entries
    sh.write(2 * span - 1, 2, 0x3D)
    sh.close()
    assert Layout.read(img).file_clusters() < 4095  # clear of QEMU's phantom leaks
    judge.judge(img, sh.expected, cluster_size=cs, table_size=ts)


def test_zero_size_image_made_by_qedkit_is_clean_in_qemu(judge: Judge, tmp_path: Path) -> None:
    img = tmp_path / "zero.qed"
    qedkit.create(str(img), 0)
    judge.assert_clean(img)
    res = judge.qemu.img("info", "--output=json", img)
    assert '"virtual-size": 0' in res.stdout
    with qedkit.open(str(img)) as sh:
        sh.resize(64 * KiB + 512)
        sh.write(64 * KiB, pattern(0x0F, 512))
    exp = Expected(tmp_path / "zero.expected.raw", 64 * KiB + 512)
    exp.write(64 * KiB, pattern(0x0F, 512))
    judge.judge(img, exp, cluster_size=64 * KiB, table_size=4)


@pytest.mark.parametrize(
    ("cs", "ts"),
    [
        pytest.param(4 * KiB, 2, id="c4K-t2"),
        pytest.param(64 * KiB, 16, id="c64K-t16"),
        pytest.param(2 * MiB, 4, id="c2M-t4"),
    ],
)
def test_qed_convert_output_reads_identically_in_qemu(
    cli_judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    """``qed convert`` (the command, in a subprocess) flattens a chain: a raw file with
    holes under a QEMU-written overlay."""
    base = tmp_path / "base.raw"
    write_raw(base, 3 * MiB, [(0, pattern(0x71, 5000)), (2 * MiB, pattern(0x72, MiB))])
    mid = tmp_path / "mid.qed"
    cli_judge.qemu.img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", mid, "5M")
    cli_judge.qemu.io(
        "-c",
        "write -P 0x73 1M 8k",
        "-c",
        "write -z 2M 64k",
        "-c",
        "write -P 0x74 4194000 1000",
        mid,
    )
    want = cli_judge.convert_to_raw(mid, tmp_path / "mid.ref.raw")
    out = tmp_path / "flat.qed"
    res = cli_judge.qed(
        "convert", "-O", "qed", "-o", f"cluster_size={cs},table_size={ts}", mid, out
    )
    assert res.returncode == 0, res.stderr
    lay = Layout.read(out)
    assert (lay.cluster_size, lay.table_size, lay.features) == (cs, ts, 0)
    cli_judge.judge(out, want, cluster_size=cs, table_size=ts)
    res = cli_judge.qed("convert", "-O", "raw", mid, tmp_path / "flat.raw")
    assert res.returncode == 0, res.stderr
    assert RawRef(tmp_path / "flat.raw").read(0, want.size) == want.read(0, want.size)
