"""Repair beyond QEMU's: duplicate references get their own copy, leaked clusters are
removed by moving clusters into them, and what a damaged entry may have lost is saved
to a lost+found archive first (docs/DESIGN.md, "Check and repair")."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import qedkit
from qedkit.aio import LostFoundTar, RepairMode
from qedkit.cli.main import main as qed_main
from qedkit.engine.check import check_and_repair
from qedkit.engine.lostfound import Orphan, lost_found_path
from qedkit.engine.qed import QedImage
from qedkit.errors import StoreError

CS = 65536
L1 = CS  # the L1 table's offset in images qedkit creates
L2 = 0x60000  # the L2 table of image_with_data (data cluster 0 is at 0x50000)
END = 0xD0000  # its file size: data clusters 1..3 at 0xa0000, 0xb0000, 0xc0000
NEED_CHECK = 0x02
FIXED_TIME = 1796217300.0  # 2026-12-02 13:15:00 UTC
RUN = "20261202T131500Z"


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack("<Q", f.read(8))[0])


def poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def read_at(path: Path, offset: int, length: int = CS) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def set_need_check(path: Path) -> None:
    poke(path, 16, u64(path, 16) | NEED_CHECK)


def image_with_data(path: Path) -> int:
    """Clusters 0..3 hold patterns 1..4; returns the L2 table offset."""
    qedkit.create(str(path), 8 << 20)
    with qedkit.open(str(path)) as img:
        for i in range(4):
            img.write(i * CS, bytes([i + 1]) * CS)
    assert u64(path, L1) == L2 and path.stat().st_size == END
    return L2


def fixed_lost_found(image: Path) -> LostFoundTar:
    return LostFoundTar(lost_found_path(str(image)), clock=lambda: FIXED_TIME)


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


# ---- duplicates ---------------------------------------------------------------------


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
        assert report.lost_found is None  # nothing was orphaned
        assert img.read(0, 8 * CS) == before
        img.write(5 * CS, b"\xee" * CS)  # the copies are independent now
        assert img.read(CS, CS) == bytes([2]) * CS
        assert img.check().exit_code == 0
    assert not Path(lost_found_path(str(path))).exists()


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


def test_a_duplicate_that_orphans_a_cluster_saves_it(tmp_path: Path) -> None:
    """Entry 3 changed to point at cluster 1's data: its own cluster is orphaned, and
    it is the only place its bytes still exist."""
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    orphan = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, u64(path, l2 + 8 * 1))
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=fixed_lost_found(path))
        assert (report.corruptions_fixed, report.leaks, report.leaks_fixed) == (1, 1, 1)
        assert img.read(3 * CS, CS) == bytes([2]) * CS  # what it pointed to: a copy
        assert img.check().exit_code == 0
    saved = members(Path(lost_found_path(str(path))))
    assert saved[f"{RUN}/cluster-{orphan:#010x}.bin"] == bytes([4]) * CS


# ---- leaks of an image without corruption ---------------------------------------------


def test_inner_and_trailing_leaks_of_a_clean_image_are_moved_away(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 2, 0)  # cluster 2's data becomes an inner leak
    with open(path, "ab") as f:
        f.write(b"\x77" * (3 * CS))  # three trailing leaked clusters
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("leaks")
        assert (report.leaks, report.leaks_fixed, report.lost_found) == (4, 4, None)
        assert img.check().exit_code == 0
        assert img.read(0, 4 * CS) == b"".join(
            bytes([b]) * CS for b in (1, 2, 0, 4)
        )  # cluster 2 was unreferenced: it reads zeros, as before the repair
    assert path.stat().st_size == END - CS
    assert not Path(lost_found_path(str(path))).exists()  # no corruption: nothing saved


def test_open_time_repair_truncates_the_tail_punches_the_rest_and_moves_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    inner = u64(path, l2 + 8 * 2)
    poke(path, l2 + 8 * 2, 0)
    with open(path, "ab") as f:
        f.write(b"\x77" * (3 * CS))
    set_need_check(path)
    with qedkit.open(str(path)) as img:  # the open-time repair
        report = img.check()
        assert (report.corruptions, report.leaks) == (0, 1)  # the inner one stays
        assert img.read(3 * CS, CS) == bytes([4]) * CS
    assert path.stat().st_size == END
    assert read_at(path, inner) == bytes(CS)  # punched
    assert not Path(lost_found_path(str(path))).exists()


def test_open_time_repair_of_a_damaged_image_keeps_the_orphan_and_saves_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, 1 << 40)
    set_need_check(path)
    with qedkit.open(str(path)) as img:
        report = img.check()
        assert (report.corruptions, report.leaks) == (0, 1)
    assert path.stat().st_size == END
    assert read_at(path, lost) == bytes([4]) * CS  # for a later 'qed check -r all'
    assert not Path(lost_found_path(str(path))).exists()


# ---- lost+found -------------------------------------------------------------------------


def test_a_leak_next_to_a_corruption_is_saved_then_reclaimed(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, lost + 512)  # unaligned: its cluster now leaks
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=fixed_lost_found(path))
        assert (report.corruptions_fixed, report.leaks, report.leaks_fixed) == (1, 1, 1)
        saved = report.lost_found
        assert saved is not None
        assert (saved.filename, saved.run) == (lost_found_path(str(path)), RUN)
        assert (saved.clusters, saved.bytes) == (1, CS)
        assert report.notes == ()
        assert img.check().exit_code == 0
        assert img.read(3 * CS, CS) == bytes(CS)  # the entry was cleared
    assert path.stat().st_size == END - CS
    got = members(Path(saved.filename))
    member = f"{RUN}/cluster-{lost:#010x}.bin"
    assert set(got) == {member, f"{RUN}/index.json"}
    assert got[member] == bytes([4]) * CS
    index = json.loads(got[f"{RUN}/index.json"])
    assert index["image"] == str(path) and index["run"] == RUN and index["cluster-size"] == CS
    assert len(index["found"]) == 1 and "invalid cluster offset" in index["found"][0]
    [entry] = index["clusters"]
    assert (entry["member"], entry["offset"], entry["size"]) == (member, lost, CS)
    assert f"guest offset {3 * CS:#x}" in entry["why"]  # the unaligned entry's cluster


def test_each_run_is_appended_under_its_own_name(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    first = u64(path, l2 + 8 * 1)
    poke(path, l2 + 8 * 1, 1 << 40)
    with qedkit.open(str(path), auto_repair=False) as img:
        img.check("all", lost_found=fixed_lost_found(path))
    second = u64(path, l2 + 8 * 3)  # the compaction may have moved it
    poke(path, l2 + 8 * 3, 1 << 41)
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=fixed_lost_found(path))
        assert report.lost_found is not None and report.lost_found.run == RUN + "-2"
    got = members(Path(lost_found_path(str(path))))
    assert got[f"{RUN}/cluster-{first:#010x}.bin"] == bytes([2]) * CS
    assert got[f"{RUN}-2/cluster-{second:#010x}.bin"] == bytes([4]) * CS
    assert len(got) == 4


def test_orphans_that_read_zero_or_are_holes_are_not_saved(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    with qedkit.open(str(path)) as img:
        img.write(CS, bytes(CS))  # real zeros in an allocated cluster
        img.discard(2 * CS, CS)  # a punched cluster, still referenced
    poke(path, l2 + 8 * 1, 1 << 40)
    poke(path, l2 + 8 * 2, 1 << 41)
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=fixed_lost_found(path))
        assert (report.corruptions_fixed, report.leaks_fixed, report.lost_found) == (2, 2, None)
        assert img.check().exit_code == 0
    assert not Path(lost_found_path(str(path))).exists()


def test_without_a_lost_found_the_leaks_next_to_a_corruption_are_kept(tmp_path: Path) -> None:
    """The engine call without a lost+found: nothing that may be lost data is reclaimed."""
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 3, 1 << 40)
    with qedkit.open(str(path), auto_repair=False) as img:
        assert isinstance(img.engine, QedImage)
        report = asyncio.run(check_and_repair(img.engine, RepairMode.ALL))
        assert (report.corruptions, report.corruptions_fixed, report.leaks) == (0, 1, 1)
        assert report.leaks_fixed == 0 and report.exit_code == 3
        assert "no lost+found file was given" in report.notes[0]
    assert path.stat().st_size == END


def test_a_lost_found_that_cannot_be_written_keeps_the_leaks(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, 1 << 40)
    nowhere = LostFoundTar(str(tmp_path / "no-such-directory" / "x.tar"))
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=nowhere)
        assert (report.corruptions_fixed, report.leaks, report.leaks_fixed) == (1, 1, 0)
        assert report.lost_found is None
        [note] = report.notes
        assert "saving them failed" in note and "No such file or directory" in note
        assert "no-such-directory" in note
        assert img.check().exit_code == 3
    assert path.stat().st_size == END
    assert read_at(path, lost) == bytes([4]) * CS


def test_a_file_that_is_not_a_tar_archive_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    l2 = image_with_data(path)
    poke(path, l2 + 8 * 3, 1 << 40)
    junk = Path(lost_found_path(str(path)))
    junk.write_bytes(b"not a tar archive\n" * 100)
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all")
        assert report.leaks_fixed == 0 and "not a tar archive" in report.notes[0]
    assert junk.read_bytes() == b"not a tar archive\n" * 100
    assert path.stat().st_size == END


def test_a_failed_run_leaves_the_archive_as_it_was(tmp_path: Path) -> None:
    archive = tmp_path / "x.lost+found.tar"
    lf = LostFoundTar(str(archive), clock=lambda: FIXED_TIME)

    async def read(offset: int, length: int) -> bytes:
        if offset >= 3 * CS:
            raise StoreError("read failed", filename="img.qed", errno=errno.EIO)
        return bytes([offset // CS + 1]) * length

    orphans = [Orphan(k * CS, CS, "test") for k in range(4)]
    asyncio.run(lf.save("img.qed", CS, [], orphans[:2], read))
    before = archive.read_bytes()
    with pytest.raises(StoreError) as info:
        asyncio.run(lf.save("img.qed", CS, [], orphans, read))
    assert info.value.filename == str(archive) and "read failed" in str(info.value)
    assert archive.read_bytes() == before
    assert sorted(members(archive)) == [f"{RUN}/cluster-{k * CS:#010x}.bin" for k in (0, 1)] + [
        f"{RUN}/index.json"
    ]
    # A failed first run leaves no file at all.
    other = tmp_path / "y.tar"
    with pytest.raises(StoreError):
        asyncio.run(LostFoundTar(str(other)).save("img.qed", CS, [], orphans, read))
    assert not other.exists()


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Root ignores permission bits: run the block with the effective uid of nobody
    (restored after it). As another user, permissions apply anyway."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def qed_here(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``qed ARGS`` through the CLI's main in this process (so that ``as_nobody``
    applies to it)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = qed_main(list(args))
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory outside pytest's (root-only) tree, which nobody can traverse."""
    with tempfile.TemporaryDirectory(prefix="qedkit-ro-") as d:
        os.chmod(d, 0o755)
        try:
            yield Path(d)
        finally:
            os.chmod(d, 0o755)


def test_qed_check_in_a_read_only_directory_keeps_the_leak_and_says_why(world_dir: Path) -> None:
    """The real thing: the image is writable, its directory is not."""
    path = world_dir / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, 1 << 40)
    os.chmod(path, 0o666)
    os.chmod(world_dir, 0o555)
    with as_nobody():
        rc, out, err = qed_here("check", "-r", "all", "--output=json", "a.qed", cwd=world_dir)
    assert rc == 3, out + err
    report = json.loads(out)
    assert report["corruptions-fixed"] == 1 and report["leaks"] == 1
    assert "lost-and-found" not in report and "leaks-fixed" not in report
    [note] = report["notes"]
    assert "a.qed.lost+found.tar" in note and "Permission denied" in note
    assert path.stat().st_size == END
    assert read_at(path, lost) == bytes([4]) * CS
    assert not (world_dir / "a.qed.lost+found.tar").exists()
    with as_nobody():
        rc, out, err = qed_here("check", "-r", "all", "a.qed", cwd=world_dir)
    # No corruption is left: this run finds a plain leak and removes it, saving nothing.
    assert rc == 0, out + err
    assert "Saved" not in out and err == ""


def test_a_full_file_system_keeps_the_leak(small_fs: Path) -> None:
    path = small_fs / "a.qed"
    l2 = image_with_data(path)
    lost = u64(path, l2 + 8 * 3)
    poke(path, l2 + 8 * 3, 1 << 40)
    try:
        with open(small_fs / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all")
        assert (report.corruptions_fixed, report.leaks_fixed) == (1, 0)
        assert "No space left on device" in report.notes[0]
    assert read_at(path, lost) == bytes([4]) * CS
    assert not Path(lost_found_path(str(path))).exists()


# ---- the home allocation policy (identity layout) ---------------------------------------


def test_an_identity_layout_keeps_its_holes_and_saves_orphans_in_place(tmp_path: Path) -> None:
    """Holes between home slots are leaks to every QED checker; -r keeps the layout
    (no cluster moves), and an orphan is saved, then punched where it is."""
    path = tmp_path / "home.qed"
    qedkit.create(str(path), 4 << 20, allocation="home")
    with qedkit.open(str(path)) as img:
        for k in (0, 5, 9, 20):
            img.write(k * CS, bytes([k + 1]) * CS)
        data_start = 5 * CS  # header + L1
        before = img.read(0, img.size)
    size = path.stat().st_size
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all")
        assert report.exit_code == 3 and report.leaks_fixed == 0
        assert "home allocation policy" in report.notes[0]
        assert img.read(0, img.size) == before
    assert path.stat().st_size == size
    # Damage the entry of guest cluster 9 (at home): saved, then punched in place.
    table = u64(path, L1)
    assert u64(path, table + 8 * 9) == data_start + 9 * CS
    poke(path, table + 8 * 9, 1 << 40)
    with qedkit.open(str(path), auto_repair=False) as img:
        report = img.check("all", lost_found=fixed_lost_found(path))
        assert report.corruptions_fixed == 1 and report.exit_code == 3
        assert report.lost_found is not None and report.lost_found.clusters == 1
        assert img.read(9 * CS, CS) == bytes(CS)
        assert img.read(5 * CS, CS) == bytes([6]) * CS
    got = members(Path(lost_found_path(str(path))))
    assert got[f"{RUN}/cluster-{data_start + 9 * CS:#010x}.bin"] == bytes([10]) * CS
    assert read_at(path, data_start + 9 * CS) == bytes(CS)  # punched, not moved into
    assert path.stat().st_size == size
