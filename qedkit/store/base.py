"""The byte-store contract: what the engine needs from the thing holding an image's bytes.

A store is a flat, growable array of bytes with an async interface. The engine never
touches files directly; a local file, an in-memory buffer, an HTTP server (read-only)
or a test double that simulates crashes all look the same from above.

Contract (every implementation, checked by tests/unit/test_store_conformance.py):

* ``readinto(offset, buf)`` fills ``buf`` from ``offset`` and returns the number of
  bytes read; it is short only at the end of the store. Reading past the end is not
  an error (it returns 0).
* ``write``/``writev`` write everything or raise; they extend the store as needed.
* ``write_zeroes(offset, length, punch=)`` makes the range read as zeros; with
  ``punch=True`` it may also release the space (a hole). It never shrinks the store.
* ``discard`` is advisory: afterwards the range reads as zeros or as before.
* ``flush`` makes every completed write durable.
* ``extents`` reports which ranges hold data and which are holes (reading zeros);
  a store that cannot tell reports everything as data.
* Failures raise :class:`~qedkit.errors.StoreError` naming the store, chained from the
  underlying error, and leave data already acknowledged intact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ReadOnlyError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    """What a store can do beyond plain reads and writes."""

    writable: bool
    punch_holes: bool = False  # write_zeroes(punch=True)/discard release space
    seek_holes: bool = False  # extents() reports real holes
    flush: bool = True


@dataclass(frozen=True, slots=True)
class StoreExtent:
    """A range of a store: ``data`` False means a hole that reads as zeros."""

    offset: int
    length: int
    data: bool


class ByteStore(ABC):
    """Abstract async byte store. ``name`` is used in every error message."""

    name: str
    capabilities: StoreCapabilities

    @property
    def readonly(self) -> bool:
        return not self.capabilities.writable

    def _check_writable(self) -> None:
        if not self.capabilities.writable:
            raise ReadOnlyError("store is open read-only", filename=self.name)

    # ---- required ------------------------------------------------------------

    @abstractmethod
    async def size(self) -> int: ...

    @abstractmethod
    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int: ...

    @abstractmethod
    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None: ...

    @abstractmethod
    async def flush(self) -> None: ...

    @abstractmethod
    async def truncate(self, size: int) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # ---- with defaults -------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (short only at the end of the store)."""
        buf = bytearray(length)
        n = await self.readinto(offset, buf)
        return bytes(buf) if n == length else bytes(buf[:n])

    async def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, else a StoreError naming ``what`` and the offset."""
        data = await self.read(offset, length)
        if len(data) != length:
            from ..errors import StoreError

            raise StoreError(
                f"short read of {what} at offset {offset}: got {len(data)} of {length} bytes",
                filename=self.name,
            )
        return data

    async def write(self, offset: int, data: Buffer) -> None:
        await self.writev(offset, (data,))

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zeros (default: write zeros)."""
        self._check_writable()
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            await self.write(offset, memoryview(chunk)[:n])
            offset += n

    async def discard(self, offset: int, length: int) -> None:
        """Advisory; the default does nothing."""
        self._check_writable()

    async def copy_range(self, src: int, dst: int, length: int) -> None:
        """Copy ``length`` bytes from ``src`` to ``dst`` inside the store (the ranges
        must not overlap); short source data is copied as zeros."""
        self._check_writable()
        chunk = 1 << 20
        done = 0
        while done < length:
            n = min(chunk, length - done)
            data = await self.read(src + done, n)
            if len(data) < n:
                data += bytes(n - len(data))
            await self.write(dst + done, data)
            done += n

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        """Data/hole map of ``[offset, offset + length)`` clipped to the store size."""
        size = await self.size()
        end = min(offset + length, size)
        if end <= offset:
            return []
        return [StoreExtent(offset, end - offset, True)]

    async def allocated_bytes(self) -> int:
        """Bytes of storage in use (a file's st_blocks * 512); the size if unknown."""
        return await self.size()

    def lock(self, *, write: bool, shared: bool) -> None:  # noqa: B027 - optional hook
        """Take the advisory locks that keep a second writer out (see store.file)."""
