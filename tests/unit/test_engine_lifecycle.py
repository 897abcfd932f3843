"""Engine behaviour: need-check lifecycle, read-only opens, cache budget, backing chains."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

import qedkit
from qedkit import aio
from qedkit.engine.qed import QedImage
from qedkit.errors import (
    BackingFileError,
    ImageLockedError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from qedkit.format.header import Feature

NEED_CHECK = int(Feature.NEED_CHECK)


def features(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(16)
        return int(struct.unpack("<Q", f.read(8))[0])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_need_check_is_set_by_the_first_allocating_write_and_cleared_by_flush(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 << 20)
    with qedkit.open(str(path)) as img:
        assert features(path) & NEED_CHECK == 0
        img.write(0, b"x" * 100)
        assert features(path) & NEED_CHECK
        img.write(0, b"y" * 100)  # in place: nothing changes
        assert features(path) & NEED_CHECK
        img.flush()
        assert features(path) & NEED_CHECK == 0
        img.write_zeroes(1 << 20, 65536)  # zero clusters are metadata too
        assert features(path) & NEED_CHECK
    assert features(path) & NEED_CHECK == 0


def test_need_check_is_never_set_with_a_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"b" * (1 << 20))
    path = tmp_path / "ov.qed"
    qedkit.create(str(path), backing_file="base.raw", backing_format="raw")
    with qedkit.open(str(path)) as img:
        img.write(4096, b"x" * 10)
        assert features(path) & NEED_CHECK == 0
        assert img.read(4090, 20) == b"b" * 6 + b"x" * 10 + b"b" * 4


def test_read_only_open_never_writes_even_a_dirty_image(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 << 20)
    img = qedkit.open(str(path))
    img.write(0, b"data")
    run_close_without_clean(img)  # a crash: the flag stays set
    assert features(path) & NEED_CHECK
    before = sha(path)
    with qedkit.open(str(path), readonly=True) as ro:
        assert ro.read(0, 4) == b"data"
        assert ro.info().dirty
        with pytest.raises(ReadOnlyError):
            ro.write(0, b"no")
    assert sha(path) == before


def test_a_writer_keeps_other_users_out_until_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 << 20)
    with qedkit.open(str(path)) as writer:
        writer.write(0, b"w")
        with pytest.raises(ImageLockedError, match='"write" lock'):
            qedkit.open(str(path))
        with pytest.raises(ImageLockedError, match="-U"):
            qedkit.open(str(path), readonly=True)
        with qedkit.open(str(path), readonly=True, force_share=True) as peek:
            assert peek.read(0, 1) == b"w"
    with qedkit.open(str(path), readonly=True) as r1, qedkit.open(str(path), readonly=True) as r2:
        assert r1.read(0, 1) == r2.read(0, 1) == b"w"  # readers share
        with pytest.raises(ImageLockedError):
            qedkit.open(str(path))


def run_close_without_clean(img: qedkit.Image) -> None:
    """Drop an image as a crash would (no flush, no clean mark)."""
    engine = img.engine
    assert isinstance(engine, QedImage)
    os.close(engine.store.fd)  # type: ignore[attr-defined]


def test_read_write_open_of_a_dirty_image_repairs_it_first(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 4 << 20)
    img = qedkit.open(str(path))
    img.write(0, b"data")
    run_close_without_clean(img)
    # Corrupt an L2 entry to point past the end of the file.
    with open(path, "r+b") as f:
        f.seek(65536)
        l2 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l2 + 8)
        f.write(struct.pack("<Q", 1 << 40))
    with qedkit.open(str(path)) as rw:
        assert rw.read(65536, 4) == bytes(4)  # the invalid entry was cleared
        assert rw.check().corruptions == 0
    assert features(path) & NEED_CHECK == 0


def test_a_one_tebibyte_image_opens_in_a_few_mebibytes(tmp_path: Path) -> None:
    path = tmp_path / "big.qed"
    qedkit.create(str(path), 1 << 40)
    tracemalloc.start()
    with qedkit.open(str(path)) as img:
        for i in range(0, 1 << 40, 1 << 36):  # touch 16 L2 tables
            img.write(i, b"z")
            assert img.read(i, 1) == b"z"
        _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_backing_loop_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qed", tmp_path / "b.qed"
    qedkit.create(str(a), 1 << 20)
    qedkit.create(str(b), 1 << 20, backing_file="a.qed", backing_format="qed")

    async def relink() -> None:
        img = await aio.open_image(str(a), backing_chain=False)
        assert isinstance(img, QedImage)
        await img.set_backing_file("b.qed")
        await img.close()

    asyncio.run(relink())
    with pytest.raises(BackingFileError, match="loop"):
        qedkit.open(str(b))


def test_relative_backing_names_resolve_against_the_image_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "base.raw").write_bytes(b"B" * 4096)
    qedkit.create(str(sub / "ov.qed"), backing_file="../base.raw", backing_format="raw")
    monkeypatch.chdir("/")
    with qedkit.open(str(sub / "ov.qed"), readonly=True) as img:
        assert img.read(0, 4) == b"BBBB"
        assert img.info().full_backing_filename == str(sub / "../base.raw")


def test_a_damaged_qcow2_backing_file_is_a_backing_file_error(tmp_path: Path) -> None:
    # The qcow2 magic with version 0: QEMU probes it as raw, and refuses it as qcow2.
    (tmp_path / "fake.qcow2").write_bytes(b"QFI\xfb" + bytes(4092))
    with pytest.raises(BackingFileError, match="unsupported qcow2 version 0"):
        qedkit.create(str(tmp_path / "o.qed"), backing_file="fake.qcow2", backing_format="qcow2")
    with pytest.raises(UnsupportedFeatureError, match="unsupported qcow2 version 0"):
        qedkit.open(str(tmp_path / "fake.qcow2"), readonly=True, format="qcow2")
    # A probed backing file that turns out to be qcow2 with a bad header:
    (tmp_path / "fake.qcow2").write_bytes(b"QFI\xfb\0\0\0\x03" + bytes(4088))
    qedkit.create(str(tmp_path / "q.qed"), 1 << 20)
    with open(tmp_path / "q.qed", "r+b") as f:  # point q.qed at the qcow2 file, probed
        f.seek(64)
        f.write(b"fake.qcow2")
        f.seek(16)
        f.write(struct.pack("<Q", int(Feature.BACKING_FILE)))
        f.seek(56)
        f.write(struct.pack("<II", 64, 10))
    with pytest.raises(BackingFileError, match="invalid qcow2 cluster_bits 0"):
        qedkit.open(str(tmp_path / "q.qed"), readonly=True)


def test_resize_grow_hides_a_longer_backing_file(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"B" * (3 << 20))
    path = tmp_path / "ov.qed"
    qedkit.create(str(path), 1 << 20, backing_file="base.raw", backing_format="raw")
    with qedkit.open(str(path)) as img:
        img.resize((2 << 20) + 512)
        assert img.read(0, 1 << 20) == b"B" * (1 << 20)
        assert img.read(1 << 20, (1 << 20) + 512) == bytes((1 << 20) + 512)
        with pytest.raises(UnsupportedFeatureError, match="shrinking"):
            img.resize(1 << 20)
    with qedkit.open(str(path)) as img:
        assert img.size == (2 << 20) + 512
        assert img.check().corruptions == 0


def test_many_requests_in_flight_read_back_what_they_wrote(tmp_path: Path) -> None:
    path = tmp_path / "c.qed"
    qedkit.create(str(path), 64 << 20, cluster_size=4096, table_size=2)

    async def main() -> None:
        img = await aio.open_image(str(path))
        writes = [img.write(i * 12345, bytes([i % 251 + 1]) * 7000) for i in range(200)]
        await asyncio.gather(*writes[::2])
        await asyncio.gather(*writes[1::2])
        for i in range(199):  # later writes overlap earlier ones by 7000 - 12345 < 0: none
            data = await img.read(i * 12345, 7000)
            assert data == bytes([i % 251 + 1]) * 7000
        report = await aio.check_image(img)  # type: ignore[arg-type]
        assert (report.corruptions, report.leaks) == (0, 0)
        await img.close()

    asyncio.run(main())
