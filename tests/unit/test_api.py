"""The synchronous API: Image methods, the file view, the async API beside it."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

import qedkit
from qedkit import aio


def test_image_file_is_a_seekable_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 1 << 20)
    with qedkit.open(str(path)) as img, img.as_file() as f:
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.writable() and f.seekable()
        assert f.seek(1000) == 1000
        assert f.write(b"hello") == 5
        assert f.tell() == 1005
        f.seek(-5, io.SEEK_CUR)
        assert f.read(5) == b"hello"
        assert f.seek(0, io.SEEK_END) == 1 << 20
        assert f.read(10) == b""  # end of the disk
        with pytest.raises(OSError):
            f.write(b"x")  # past the end: like a full device
        f.seek(0)
        reader = io.BufferedReader(f, buffer_size=4096)
        assert reader.read(1005)[1000:] == b"hello"


def test_read_only_file_view_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 1 << 20)
    with qedkit.open(str(path), readonly=True) as img, img.as_file() as f:
        assert not f.writable()
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")


def test_sync_api_refuses_to_run_inside_an_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qedkit.create(str(path), 1 << 20)

    async def inside() -> None:
        with pytest.raises(RuntimeError, match=r"qedkit\.aio"):
            qedkit.open(str(path))
        img = await aio.open_image(str(path))
        await img.write(0, b"async")
        assert await img.read(0, 5) == b"async"
        assert next(e.data for e in await aio.map_chain(img)) is True
        await img.close()

    asyncio.run(inside())
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, 5) == b"async"
        assert repr(img).startswith("<qedkit.Image ")
        assert img.format == "qed" and img.cluster_size == 65536


@pytest.mark.parametrize("fmt", ["qed", "raw"])
def test_readinto_of_mapped_data_skips_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    path = str(tmp_path / f"disk.{fmt}")
    qedkit.create(path, 1 << 20, format=fmt, cluster_size=4096)
    with qedkit.open(path) as img:
        img.write(0, bytes(range(256)) * 64)  # 4 clusters, allocated in order
        img.write(65536, b"\x07" * 4096)
    with qedkit.open(path, readonly=True) as img:
        buf = bytearray(16384)
        img.readinto(0, buf)  # loads the L2 table
        assert buf == bytes(range(256)) * 64

        async def no_loop(*args: object) -> None:
            raise AssertionError("took the event loop")

        monkeypatch.setattr(img.engine, "readinto", no_loop)
        buf = bytearray(12288)
        assert img.readinto(4096, buf) == 12288
        assert buf == (bytes(range(256)) * 64)[4096:]
        monkeypatch.undo()
        if fmt == "qed":  # a hole and data: the general path, same bytes
            buf = bytearray(8192)
            img.readinto(61440, buf)
            assert buf == bytes(4096) + b"\x07" * 4096
