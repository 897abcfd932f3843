"""qedkit and QEMU take turns writing the same file; after every turn QEMU judges it
(``qemu-img check`` clean, ``qemu-img compare`` identical) and so does ``qed check``.

QEMU's turns keep to what it does right: small requests, and no partial writes into
zero clusters of an image with a backing file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qedoracle import (
    Expected,
    Judge,
    KiB,
    MiB,
    Shadow,
    assert_qedkit_reads,
    l2_span,
    pattern,
)

import qedkit

pytestmark = pytest.mark.qemu

GEOMETRIES = [
    pytest.param(4 * KiB, 2, id="c4K-t2"),
    pytest.param(4 * KiB, 16, id="c4K-t16"),
    pytest.param(64 * KiB, 4, id="c64K-t4"),
    pytest.param(1 * MiB, 8, id="c1M-t8"),
]


class Turns:
    """One image, one Expected, two writers."""

    def __init__(self, judge: Judge, path: Path, expected: Expected, cs: int, ts: int) -> None:
        self.judge, self.path, self.expected, self.cs, self.ts = judge, path, expected, cs, ts
        self.turn = 0

    def qemu(self, *ops: tuple[str, int, int, int]) -> None:
        """ops: ("write", off, len, byte) or ("zero", off, len, 0)."""
        args: list[str | os.PathLike[str]] = []
        for kind, off, n, byte in ops:
            assert n <= 4 * MiB
            if kind == "write":
                args += ["-c", f"write -P {byte:#x} {off} {n}"]
                self.expected.write(off, pattern(byte, n))
            else:
                args += ["-c", f"write -z {off} {n}"]
                self.expected.zero(off, n)
        self.judge.qemu.io(*args, self.path)
        self.verdict("qemu")

    def ours(self) -> Shadow:
        return Shadow.reopen(self.path, self.expected)

    def done(self, sh: Shadow) -> None:
        sh.close()
        self.verdict("qedkit")

    def verdict(self, who: str) -> None:
        self.turn += 1
        self.judge.judge(self.path, self.expected, cluster_size=self.cs, table_size=self.ts)
        self.judge.assert_qed_clean(self.path)
        assert_qedkit_reads(self.path, self.expected, cluster_size=self.cs)


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_writers_alternate_on_an_image_qedkit_created(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    span = l2_span(cs, ts)
    # past the first L2 table where that stays small
    size = (span if span <= 64 * MiB else 16 * c) + 8 * c + 512
    img = tmp_path / "alt.qed"
    sh = Shadow.create(img, size, cluster_size=cs, table_size=ts)
    t = Turns(judge, img, sh.expected, cs, ts)
    sh.write(c - 10, 20, 0x01)
    sh.write_zeroes(4 * c, 2 * c)
    t.done(sh)

    t.qemu(
        ("write", c - 5, 10, 0x02),  # inside clusters qedkit allocated
        ("write", 2 * c + 100, c, 0x03),  # new clusters, unaligned
        ("zero", 6 * c, c, 0),  # a zero cluster
        ("write", 4 * c + 7, 7, 0x04),  # into qedkit's zero cluster (no backing file)
    )

    sh = t.ours()
    sh.write(2 * c + 50, 100, 0x05)  # over QEMU's clusters
    sh.write(6 * c + 1, 1, 0x06)  # into QEMU's zero cluster
    sh.write(size - 2 * c - 3, 2 * c + 3, 0x07)  # the end (a second L2 table for 4K clusters)
    sh.write_zeroes(2 * c, c)  # QEMU's allocated cluster: zeros in place
    t.done(sh)

    t.qemu(("write", size - c, 100, 0x08), ("zero", 0, c, 0), ("write", 5 * c, c, 0x09))

    sh = t.ours()
    sh.discard(5 * c, c)
    sh.resize(size + 2 * c)
    sh.write(size + c, 10, 0x0A)
    t.done(sh)

    judge.qemu.img("resize", "-f", "qed", img, str(size + 4 * c))
    t.expected.resize(size + 4 * c)
    t.qemu(("write", size + 3 * c, 512, 0x0B))
    assert t.turn == 6


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_writers_alternate_on_an_image_qemu_created_over_a_backing_file(
    judge: Judge, tmp_path: Path, cs: int, ts: int
) -> None:
    c = cs
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(5 * c + 100)
        os.pwrite(f.fileno(), pattern(0xB0, 3 * c), c)
    img = tmp_path / "alt.qed"
    size = 10 * c
    judge.qemu.img(
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        f"cluster_size={cs},table_size={ts}",
        img,
        str(size),
    )
    t = Turns(judge, img, Expected(tmp_path / "alt.expected.raw", size, base=base), cs, ts)

    t.qemu(("write", c + 10, 10, 0x01), ("zero", 3 * c, c, 0), ("write", 5 * c - 3, 6, 0x02))

    sh = t.ours()
    sh.write(3 * c + 100, 50, 0x03)  # into QEMU's zero cluster: the rest stays zero
    sh.write(2 * c - 1, 2, 0x04)  # copy-on-write from the backing file
    sh.write_zeroes(2 * c + c // 2, 10)  # partial zeroing over backing data
    sh.write_zeroes(8 * c, c)
    t.done(sh)

    t.qemu(
        ("write", 3 * c, 10, 0x05),  # over our allocation (the former zero cluster)
        ("write", 7 * c + 5, 5, 0x06),  # unaligned, past the backing file
        ("zero", 8 * c, c, 0),  # already a zero cluster
    )

    sh = t.ours()
    sh.write(9 * c, c, 0x07)
    sh.write(c, 1, 0x08)
    t.done(sh)


def test_qemu_and_qedkit_alternate_on_every_allocation_of_one_l2_table(
    judge: Judge, tmp_path: Path
) -> None:
    """Interleaved allocations: the L2 table's sectors are rewritten by both writers."""
    c = 4096
    img = tmp_path / "inter.qed"
    judge.qemu.img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", img, "6M")
    exp = Expected(tmp_path / "inter.expected.raw", 6 * MiB)
    for k in range(6):
        # entries 64 apart land in different 512-byte sectors of the L2 table
        off = k * 64 * c + 100
        judge.qemu.io("-c", f"write -P {0x10 + k:#x} {off} 10", img)
        exp.write(off, pattern(0x10 + k, 10))
        with qedkit.open(str(img)) as ours:
            ours.write(off + 32 * c, pattern(0x40 + k, 10))
            exp.write(off + 32 * c, pattern(0x40 + k, 10))
    judge.judge(img, exp, cluster_size=c, table_size=2)
    judge.assert_qed_clean(img)
    judge.assert_parity("map", "--output=json", img, files=[img])
