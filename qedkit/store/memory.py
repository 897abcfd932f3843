"""An in-memory byte store, for tests and for building images before writing them out."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Buffer, ByteStore, StoreCapabilities


class MemoryStore(ByteStore):
    """A growable bytearray. Holes are not tracked: everything reads as data."""

    def __init__(
        self, data: bytes | bytearray = b"", *, name: str = "<memory>", writable: bool = True
    ) -> None:
        self.data = bytearray(data)
        self.name = name
        self.capabilities = StoreCapabilities(writable=writable)
        self.flushes = 0

    async def size(self) -> int:
        return len(self.data)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        view = memoryview(buf).cast("B")
        chunk = self.data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        return len(chunk)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        for b in buffers:
            n = len(b)
            if offset > len(self.data):
                self.data.extend(bytes(offset - len(self.data)))
            self.data[offset : offset + n] = b
            offset += n

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self._check_writable()
        if punch:
            length = max(0, min(length, len(self.data) - offset))
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        self.flushes += 1

    async def truncate(self, size: int) -> None:
        self._check_writable()
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    async def close(self) -> None:
        pass
