"""Every byte store keeps the contract in qedkit/store/base.py.

``StoreContract`` holds the tests; each store implementation subclasses it with a
``make`` factory, so a new store gets the whole suite by adding four lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qedkit.errors import ReadOnlyError, StoreError
from qedkit.store import ByteStore, FileStore, MemoryStore

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class StoreContract:
    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        raise NotImplementedError

    def test_read_returns_what_was_written_and_short_reads_only_at_the_end(
        self, tmp_path: Path
    ) -> None:
        store = self.make(tmp_path)

        async def go() -> None:
            await store.write(0, b"hello")
            await store.writev(5, [b" ", memoryview(b"world")])
            assert await store.size() == 11
            assert await store.read(0, 11) == b"hello world"
            assert await store.read(6, 100) == b"world"
            assert await store.read(50, 10) == b""
            buf = bytearray(4)
            assert await store.readinto(7, buf) == 4
            assert bytes(buf) == b"orld"
            await store.close()

        run(go())

    def test_writes_past_the_end_extend_with_zeros(self, tmp_path: Path) -> None:
        store = self.make(tmp_path, b"ab")

        async def go() -> None:
            await store.write(10, b"z")
            assert await store.read(0, 11) == b"ab" + bytes(8) + b"z"
            await store.close()

        run(go())

    def test_write_zeroes_and_discard(self, tmp_path: Path) -> None:
        store = self.make(tmp_path, b"\xff" * 65536)

        async def go() -> None:
            await store.write_zeroes(4096, 4096)
            assert await store.read(4096, 4096) == bytes(4096)
            await store.write_zeroes(16384, 8192, punch=True)
            assert await store.read(16384, 8192) == bytes(8192)
            assert await store.size() == 65536
            await store.discard(32768, 4096)
            data = await store.read(32768, 4096)
            assert data in (bytes(4096), b"\xff" * 4096)
            assert await store.read(0, 4096) == b"\xff" * 4096
            await store.close()

        run(go())

    def test_truncate_flush_and_extents_cover_the_range(self, tmp_path: Path) -> None:
        store = self.make(tmp_path, b"x" * 8192)

        async def go() -> None:
            await store.truncate(1 << 20)
            await store.flush()
            assert await store.size() == 1 << 20
            extents = await store.extents(0, 2 << 20)
            assert extents[0].offset == 0
            assert sum(e.length for e in extents) == 1 << 20
            assert extents[0].data
            await store.truncate(100)
            assert await store.read(0, 200) == b"x" * 100
            await store.close()

        run(go())

    def test_read_only_store_refuses_writes(self, tmp_path: Path) -> None:
        store = self.make(tmp_path, b"abc", writable=False)

        async def go() -> None:
            with pytest.raises(ReadOnlyError):
                await store.write(0, b"x")
            with pytest.raises(ReadOnlyError):
                await store.write_zeroes(0, 1)
            assert await store.read(0, 3) == b"abc"
            await store.close()

        run(go())


class TestMemoryStore(StoreContract):
    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        return MemoryStore(data, writable=writable)


class TestFileStore(StoreContract):
    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        path = tmp_path / "store.bin"
        path.write_bytes(data)
        return FileStore.open(str(path), readonly=not writable)

    def test_holes_are_reported_as_holes(self, tmp_path: Path) -> None:
        store = self.make(tmp_path)

        async def go() -> None:
            await store.truncate(1 << 20)
            await store.write(512 << 10, b"d" * 4096)
            extents = await store.extents(0, 1 << 20)
            data = [e for e in extents if e.data]
            assert len(data) == 1 and data[0].offset <= 512 << 10 < data[0].offset + data[0].length
            await store.close()

        run(go())

    def test_open_errors_name_the_file(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "missing")
        with pytest.raises(StoreError, match="No such file") as info:
            FileStore.open(missing)
        assert str(info.value).startswith(missing + ": ")
