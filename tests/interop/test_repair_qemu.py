"""``qed check -r all`` leaves an image ``qemu-img check`` calls clean, and keeps what
the damage orphaned in lost+found (docs/DESIGN.md, "Check and repair").

Each test starts from an image QEMU made (``qemu-img create``, data written by
``qemu-io``), takes the guest view with ``qemu-img convert -O raw`` *before* the
damage, pokes one damage into the file (with ``struct`` alone), runs ONE ``qed check
-r all``, and then asks QEMU: ``qemu-img check`` exits 0, and the guest view after
the repair equals the one before, range by range, except the ranges each test names
as lost; the lost+found archive holds exactly the bytes the damage orphaned.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from qedoracle import Judge, KiB, Layout, MiB, poke_u64, read_u64

import qedkit

pytestmark = pytest.mark.qemu

C = 64 * KiB  # QEMU's default cluster size
SIZE = 8 * MiB
# What qemu-io writes: (guest offset, length, pattern byte); a zero cluster at 2 MiB.
WRITES = [(0, C, 0x11), (C, C, 0x12), (2 * C, C, 0x13), (MiB, C, 0x22), (4 * MiB, 2 * C, 0x33)]
VICTIM = 1  # the guest cluster whose L2 entry is damaged


def _make(judge: Judge, path: Path, backing: Path | None = None) -> None:
    args = ["create", "-q", "-f", "qed"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "raw"]
    judge.qemu.img(*args, path, str(SIZE))
    cmds: list[str] = []
    for off, length, byte in WRITES:
        cmds += ["-c", f"write -P {byte:#x} {off} {length}"]
    judge.qemu.io(*cmds, "-c", f"write -z {2 * MiB} {C}", path)


def _guest(judge: Judge, path: Path, out: Path) -> bytes:
    judge.qemu.img("convert", "-f", "qed", "-O", "raw", path, out)
    return out.read_bytes()


def _repair(judge: Judge, path: Path) -> dict[str, Any]:
    """ONE ``qed check -r all``; it must leave an image qemu-img calls clean."""
    r = judge.qed("check", "-r", "all", "--output=json", path)
    assert r.returncode == 0, r.stdout + r.stderr
    judge.assert_clean(path)
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def _assert_same_except(after: bytes, before: bytes, lost: list[tuple[int, int]]) -> None:
    """Every range outside ``lost`` ([start, end) pairs) reads as before."""
    assert len(after) == len(before)
    pos = 0
    for start, end in [*sorted(lost), (len(before), len(before))]:
        if after[pos:start] != before[pos:start]:
            bad = next(i for i in range(pos, start) if after[i] != before[i])
            raise AssertionError(f"guest byte {bad:#x} changed outside the lost ranges {lost}")
        pos = max(pos, end)


def _lost_found(path: Path) -> dict[int, bytes]:
    """Host offset -> bytes of every cluster in the image's lost+found archive."""
    archive = Path(f"{path}.lost+found.tar")
    out: dict[int, bytes] = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            data = f.read()
            if m.name.endswith("/index.json"):
                index = json.loads(data)
                assert index["image"] == str(path) and index["cluster-size"] == C
                for entry in index["clusters"]:
                    assert entry["size"] == C and entry["why"]
                continue
            offset = int(m.name.rsplit("cluster-", 1)[1].removesuffix(".bin"), 16)
            out[offset] = data
    return out


def _entry(lay: Layout, guest_cluster: int) -> int:
    return lay.l2_entry_offset(0, guest_cluster)


# Damages of the victim's L2 entry: (name, new value from (layout, old value)).
DAMAGES = {
    "l2-entry-past-eof": lambda lay, old: (lay.file_clusters() + 4) * C,
    "l2-entry-unaligned": lambda lay, old: old + 512,
    "l2-entry-points-into-the-l1-table": lambda lay, old: lay.l1_table_offset + C,
    "duplicate-reference": lambda lay, old: read_u64(lay.path, _entry(lay, 0)),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_one_repair_of_a_damaged_entry_ends_clean_with_the_orphan_saved(
    judge: Judge, tmp_path: Path, damage: str
) -> None:
    img = tmp_path / "img.qed"
    _make(judge, img)
    before = _guest(judge, img, tmp_path / "before.raw")
    lay = Layout.read(img)
    at = _entry(lay, VICTIM)
    orphan = read_u64(img, at)
    poke_u64(img, at, DAMAGES[damage](lay, orphan))
    assert judge.qemu.img("check", img, check=False).returncode == 2

    report = _repair(judge, img)
    assert report["corruptions-fixed"] >= 1 and report["leaks-fixed"] == 1
    assert report["lost-and-found"]["clusters"] == 1
    after = _guest(judge, img, tmp_path / "after.raw")
    # Lost: the victim's cluster. Its entry was cleared (it reads zeros) or, for a
    # duplicate and a pointer into the L1 table, got its own copy of what it pointed
    # at (guest cluster 0's data; the L1 table's second cluster, all zeros here).
    lost = (VICTIM * C, (VICTIM + 1) * C)
    _assert_same_except(after, before, [lost])
    expect = before[:C] if damage == "duplicate-reference" else bytes(C)
    assert after[lost[0] : lost[1]] == expect
    # The victim's bytes are in lost+found, and nothing else is.
    assert _lost_found(img) == {orphan: before[lost[0] : lost[1]]}


def test_duplicates_and_a_plain_leak_together(judge: Judge, tmp_path: Path) -> None:
    """Two entries changed to share clusters (each orphans its own cluster) and a
    cluster of junk appended: all three go to lost+found, then the image is clean."""
    img = tmp_path / "img.qed"
    _make(judge, img)
    before = _guest(judge, img, tmp_path / "before.raw")
    lay = Layout.read(img)
    orphan_1 = read_u64(img, _entry(lay, 1))
    orphan_2 = read_u64(img, _entry(lay, 2))
    poke_u64(img, _entry(lay, 1), read_u64(img, _entry(lay, 0)))
    poke_u64(img, _entry(lay, 2), read_u64(img, _entry(lay, 0)))
    junk_at = lay.file_clusters() * C
    with open(img, "ab") as f:
        f.write(bytes([0xEE]) * C)
    q = judge.qemu.img("check", img, check=False)
    assert q.returncode == 2 and "3 leaked clusters" in q.stdout, q.stdout

    report = _repair(judge, img)
    assert report["corruptions-fixed"] == 2 and report["leaks-fixed"] == 3
    after = _guest(judge, img, tmp_path / "after.raw")
    lost = [(C, 2 * C), (2 * C, 3 * C)]  # both now hold a copy of guest cluster 0
    _assert_same_except(after, before, lost)
    assert after[C : 3 * C] == before[:C] * 2
    assert _lost_found(img) == {
        orphan_1: before[C : 2 * C],
        orphan_2: before[2 * C : 3 * C],
        junk_at: bytes([0xEE]) * C,
    }


def test_a_damaged_entry_over_a_backing_file(judge: Judge, tmp_path: Path) -> None:
    """The cleared entry shows the backing file again (that range is lost: it reads
    the backing file's bytes); the orphan is in lost+found."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (SIZE // 256))
    img = tmp_path / "img.qed"
    _make(judge, img, backing=base)
    before = _guest(judge, img, tmp_path / "before.raw")
    lay = Layout.read(img)
    at = _entry(lay, VICTIM)
    orphan = read_u64(img, at)
    poke_u64(img, at, (lay.file_clusters() + 4) * C)

    report = _repair(judge, img)
    assert report["lost-and-found"]["clusters"] == 1
    after = _guest(judge, img, tmp_path / "after.raw")
    lost = (VICTIM * C, (VICTIM + 1) * C)
    _assert_same_except(after, before, [lost])
    assert after[lost[0] : lost[1]] == base.read_bytes()[lost[0] : lost[1]]
    assert _lost_found(img) == {orphan: before[lost[0] : lost[1]]}
    assert judge.qemu.img("info", "--output=json", img).stdout.count('"backing-filename"') == 1


def test_a_clean_image_with_inner_leaks_ends_clean_with_r_leaks(
    judge: Judge, tmp_path: Path
) -> None:
    """Junk clusters written by qemu-io whose entries are then cleared: plain leaks on
    an image without corruption. ``-r leaks`` removes them and saves nothing."""
    img = tmp_path / "img.qed"
    _make(judge, img)
    judge.qemu.io("-c", f"write -P 0x99 {3 * MiB} {3 * C}", img)
    lay = Layout.read(img)
    for k in range(3):
        poke_u64(img, _entry(lay, 3 * MiB // C + k), 0)
    size = img.stat().st_size
    rc = judge.qemu.img("check", img, check=False)
    assert rc.returncode == 3 and "3 leaked clusters" in rc.stdout, rc.stdout
    before = _guest(judge, img, tmp_path / "before.raw")

    r = judge.qed("check", "-r", "leaks", "--output=json", img)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["leaks-fixed"] == 3 and "lost-and-found" not in report
    judge.assert_clean(img)
    assert img.stat().st_size == size - 3 * C
    assert _guest(judge, img, tmp_path / "after.raw") == before
    assert not Path(f"{img}.lost+found.tar").exists()


def test_an_identity_layout_keeps_its_layout(judge: Judge, tmp_path: Path) -> None:
    """The home allocation policy puts each cluster at data start + its guest offset;
    the free home slots between them are leaks to qemu-img. ``-r all`` keeps that
    layout (moving clusters into those slots would undo it): exit 3, a note saying
    why, nothing moved, and qemu-img still finds leaks only."""
    img = tmp_path / "home.qed"
    qedkit.create(str(img), SIZE, allocation="home")
    with qedkit.open(str(img)) as q:
        for off, length, byte in WRITES:
            q.write(off, bytes([byte]) * length)
    before = _guest(judge, img, tmp_path / "before.raw")
    layout_before = judge.qemu.img("map", "--output=json", img).stdout
    r = judge.qed("check", "-r", "all", "--output=json", img)
    assert r.returncode == 3, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert "home allocation policy" in report["notes"][0]
    assert judge.qemu.img("check", img, check=False).returncode == 3
    assert judge.qemu.img("map", "--output=json", img).stdout == layout_before
    assert _guest(judge, img, tmp_path / "after.raw") == before
