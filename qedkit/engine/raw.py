"""The raw format: guest offset == store offset, size == store size.

Used as a backing image and as a convert source or target. Holes in the store
(SEEK_HOLE) are reported as ZERO extents with a host offset, as QEMU's file driver
reports them (present, zero, not data).
"""

from __future__ import annotations

from ..errors import InvalidRequestError
from ..store.base import Buffer, ByteStore
from .base import BlockImage, Extent, ExtentKind, ImageInfo


class RawImage(BlockImage):
    format_name = "raw"
    host_offsets_are_data = True

    def __init__(self, store: ByteStore, size: int, *, filename: str | None = None) -> None:
        self.store = store
        self.filename = filename or store.name
        self.readonly = store.readonly
        self._size = size
        self.backing = None

    @classmethod
    async def open(cls, store: ByteStore, *, filename: str | None = None) -> RawImage:
        return cls(store, await store.size(), filename=filename)

    @property
    def size(self) -> int:
        return self._size

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self._check_range(offset, len(buf))
        view = memoryview(buf).cast("B")
        n = await self.store.readinto(offset, view)
        if n < len(view):  # the file shrank under us: what is gone reads as zeros
            view[n:] = bytes(len(view) - n)

    def read_now(self, offset: int, length: int) -> bytes | None:
        pread = getattr(self.store, "pread_now", None)
        if pread is None or length <= 0 or offset < 0 or offset + length > self._size:
            return None
        data: bytes = pread(offset, length)
        return data if len(data) == length else None

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        preadinto = getattr(self.store, "preadinto_now", None)
        n = len(view)
        if preadinto is None or n <= 0 or offset < 0 or offset + n > self._size:
            return False
        return bool(preadinto(offset, view) == n)

    def write_now(self, offset: int, data: Buffer) -> bool:
        pwrite = getattr(self.store, "pwrite_now", None)
        if pwrite is None or self.readonly or offset < 0 or offset + len(data) > self._size:
            return False
        pwrite(offset, data)
        return True

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        await self.store.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        await self.store.write_zeroes(offset, length, punch=unmap)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        await self.store.discard(offset, length)

    async def flush(self) -> None:
        if not self.readonly:
            await self.store.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        out = []
        for ext in await self.store.extents(offset, length):
            kind = ExtentKind.DATA if ext.data else ExtentKind.ZERO
            out.append(Extent(ext.offset, ext.length, kind, ext.offset))
        covered = out[-1].end if out else offset
        if covered < offset + length:  # store shorter than the image: zeros
            out.append(Extent(covered, offset + length - covered, ExtentKind.ZERO, covered))
        return out

    async def resize(self, new_size: int) -> None:
        self._check_writable()
        if new_size < 0:
            raise InvalidRequestError(f"invalid size {new_size}", filename=self.filename)
        await self.store.truncate(new_size)
        self._size = new_size

    async def info(self) -> ImageInfo:
        return await self._info()

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            await self.store.close()
