"""Every byte store keeps the contract in qedkit/store/base.py.

``ReadStoreContract`` holds the tests of the read side, which every store passes,
read-only remote stores included; ``StoreContract`` adds those of writable stores.
Each store implementation subclasses one with a factory (``make_readonly`` or
``make``), so a new store gets the whole suite by adding four lines.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from remotekit import FaultyHttpServer, MemorySource, NbdThreadServer

from qedkit.errors import ReadOnlyError, StoreError
from qedkit.store import ByteStore, FileStore, MemoryStore
from qedkit.store.remote import RemoteOptions, RemoteStore
from qedkit.store.url import open_url

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class ReadStoreContract:
    """The read side of the contract, for every store."""

    def make_readonly(self, tmp_path: Path, data: bytes) -> ByteStore:
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _teardown(self) -> Iterator[None]:
        """``self.later(fn)``: run ``fn`` after the test (servers a factory started)."""
        self._finalizers: list[Callable[[], None]] = []
        yield
        for fn in reversed(self._finalizers):
            fn()

    def later(self, fn: Callable[[], None]) -> None:
        self._finalizers.append(fn)

    def test_reads_return_the_data_and_are_short_only_at_the_end(self, tmp_path: Path) -> None:
        data = bytes(random.Random(3).randbytes(3 * 65536 + 123))
        store = self.make_readonly(tmp_path, data)

        async def go() -> None:
            assert await store.size() == len(data)
            assert await store.read(0, len(data)) == data
            assert await store.read(65530, 20) == data[65530:65550]
            assert await store.read(len(data) - 10, 100) == data[-10:]
            assert await store.read(len(data), 10) == b""
            assert await store.read(len(data) + 5000, 10) == b""
            buf = bytearray(7)
            assert await store.readinto(1000, buf) == 7
            assert bytes(buf) == data[1000:1007]
            view = memoryview(bytearray(10))
            assert await store.readinto(len(data) - 4, view) == 4
            assert bytes(view[:4]) == data[-4:]
            await store.close()

        run(go())

    def test_concurrent_reads_each_get_their_own_bytes(self, tmp_path: Path) -> None:
        data = bytes(random.Random(4).randbytes(1 << 20))
        store = self.make_readonly(tmp_path, data)
        rng = random.Random(5)
        ranges = [(rng.randrange(len(data)), rng.randrange(1, 200000)) for _ in range(40)]

        async def go() -> None:
            results = await asyncio.gather(*(store.read(o, n) for o, n in ranges))
            for (o, n), got in zip(ranges, results, strict=True):
                assert got == data[o : o + n], (o, n)
            await store.close()

        run(go())

    def test_read_exact_names_the_store_on_a_short_read(self, tmp_path: Path) -> None:
        store = self.make_readonly(tmp_path, b"abcdef")

        async def go() -> None:
            assert await store.read_exact(1, 3, "header") == b"bcd"
            with pytest.raises(StoreError, match="short read of header at offset 4") as info:
                await store.read_exact(4, 8, "header")
            assert info.value.filename == store.name
            await store.close()

        run(go())

    def test_extents_cover_the_store(self, tmp_path: Path) -> None:
        store = self.make_readonly(tmp_path, b"x" * 10000)

        async def go() -> None:
            extents = await store.extents(0, 1 << 20)
            assert extents[0].offset == 0
            assert sum(e.length for e in extents) == 10000
            assert await store.extents(20000, 10) == []
            await store.close()

        run(go())

    def test_read_only_store_refuses_writes(self, tmp_path: Path) -> None:
        store = self.make_readonly(tmp_path, b"abc")

        async def go() -> None:
            assert store.readonly
            with pytest.raises(ReadOnlyError):
                await store.write(0, b"x")
            with pytest.raises(ReadOnlyError):
                await store.writev(0, [b"x", b"y"])
            with pytest.raises(ReadOnlyError):
                await store.write_zeroes(0, 1)
            with pytest.raises(ReadOnlyError):
                await store.truncate(1)
            with pytest.raises(ReadOnlyError):
                await store.copy_range(0, 1, 1)
            await store.flush()  # nothing to flush is not an error
            assert await store.read(0, 3) == b"abc"
            await store.close()

        run(go())


class StoreContract(ReadStoreContract):
    """Writable stores: the read side, and writes."""

    def make(self, tmp_path: Path, data: bytes = b"", *, writable: bool = True) -> ByteStore:
        raise NotImplementedError

    def make_readonly(self, tmp_path: Path, data: bytes) -> ByteStore:
        return self.make(tmp_path, data, writable=False)

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

    def test_copy_range_with_a_hole_never_cuts_what_grew_the_file_meanwhile(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A copy whose source ends in a hole, to a destination past the end of the
        file, grows the file by a hole. While the data part is copied (on a worker
        thread in a server) the event loop goes on, and an allocating write may put a
        cluster further out: the copy must not set the size it saw before and cut
        that cluster off (the online defragmentation lost guest data that way)."""
        cs = 65536
        store = self.make(tmp_path)
        assert isinstance(store, FileStore)
        store.offload = True
        far, payload = 8 * cs, b"\xab" * cs
        copy = store._copy_data

        async def copy_while_a_write_extends_the_file(src: int, dst: int, length: int) -> None:
            await copy(src, dst, length)
            store.pwrite_now(far, payload)  # what another coroutine did meanwhile

        async def go() -> None:
            await store.write(0, b"d" * 4096)
            await store.truncate(cs)  # cluster 0: 4 KiB of data, then a hole
            monkeypatch.setattr(store, "_copy_data", copy_while_a_write_extends_the_file)
            await store.copy_range(0, 2 * cs, cs)
            assert await store.read(far, cs) == payload
            assert await store.size() == far + cs
            assert await store.read(2 * cs, cs) == b"d" * 4096 + bytes(cs - 4096)
            await store.close()

        run(go())

    def test_open_errors_name_the_file(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "missing")
        with pytest.raises(StoreError, match="No such file") as info:
            FileStore.open(missing)
        assert str(info.value).startswith(missing + ": ")


# ---- read-only remote stores ------------------------------------------------------------

# Small blocks and a small cache, so that the contract's reads cross blocks, the
# cache evicts and readahead starts.
SMALL = RemoteOptions(block_size=4096, cache_bytes=64 * 1024, readahead_min=8192)


class TestRemoteStoreOverAFetchFunction(ReadStoreContract):
    def make_readonly(self, tmp_path: Path, data: bytes) -> ByteStore:
        return RemoteStore(MemorySource(data, piece=4096), SMALL)


class TestHttpStore(ReadStoreContract):
    def make_readonly(self, tmp_path: Path, data: bytes) -> ByteStore:
        server = FaultyHttpServer(data).start()
        self.later(server.stop)
        return open_url(server.url, options=SMALL)


class TestNbdStore(ReadStoreContract):
    def make_readonly(self, tmp_path: Path, data: bytes) -> ByteStore:
        server = NbdThreadServer(data, tmp_path / "nbd.sock").start()
        self.later(server.stop)
        return open_url(server.url, options=SMALL)
