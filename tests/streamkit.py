"""Helpers of the copy-on-read and stream tests (imported as ``streamkit``; tests/ is
on sys.path): overlays in memory over a raw backing image, a backing image whose
reads wait at a gate (so that a test acts while a fill is being read), and the
status of every cluster of one layer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

from qedkit.engine.base import BlockImage, ExtentKind
from qedkit.engine.chain import open_qed
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.errors import ReadOnlyError
from qedkit.store import MemoryStore

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB  # the default cluster size
DATA, ZERO, UNALLOCATED = ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.UNALLOCATED


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def base_bytes(size: int, seed: int = 7) -> bytes:
    """Random clusters, with clusters 4-5 all zeros (written zeros, not a hole)."""
    data = bytearray(random.Random(seed).randbytes(size))
    assert size >= 6 * CS
    data[4 * CS : 6 * CS] = bytes(2 * CS)
    return bytes(data)


class Gate(BlockImage):
    """A raw backing image whose reads wait until ``opened`` is set (``reading`` is
    set while one waits): lets a test act while a fill is being read."""

    format_name = "raw"

    def __init__(self, data: bytes) -> None:
        self.inner = RawImage(MemoryStore(data, name="base.raw", writable=False), len(data))
        self.filename = "base.raw"
        self.readonly = True
        self.store = self.inner.store
        self.opened = asyncio.Event()
        self.reading = asyncio.Event()
        self.closed = False
        self.reads = 0

    @property
    def size(self) -> int:
        return self.inner.size

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self.reads += 1
        self.reading.set()
        await self.opened.wait()
        await self.inner.readinto(offset, buf)

    async def write(self, offset: int, data: Any) -> None:
        raise ReadOnlyError("read-only")

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        raise ReadOnlyError("read-only")

    async def discard(self, offset: int, length: int) -> None:
        raise ReadOnlyError("read-only")

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> Any:
        return await self.inner.block_status(offset, length)

    async def resize(self, new_size: int) -> None:
        raise ReadOnlyError("read-only")

    async def info(self) -> Any:
        return await self.inner.info()

    async def close(self) -> None:
        self.closed = True


async def overlay(
    backing: BlockImage | bytes | None,
    size: int,
    *,
    cor: bool = True,
    cluster_size: int = CS,
    table_size: int = 4,
) -> QedImage:
    """A new QED image in memory over ``backing`` (raw bytes or an image)."""
    store = MemoryStore(name="top.qed")
    await QedImage.format_store(
        store,
        size,
        cluster_size=cluster_size,
        table_size=table_size,
        backing_name="base.raw" if backing is not None else None,
        backing_raw=True,
    )
    if isinstance(backing, bytes):
        backing = RawImage(MemoryStore(backing, name="base.raw", writable=False), len(backing))
    header, area = await QedImage.read_header(store)
    img = await open_qed(store, header, area, backing=backing, readonly=False)
    img.copy_on_read = cor
    return img


async def kinds(img: QedImage) -> list[ExtentKind]:
    """This layer's status of every cluster."""
    out = []
    for pos in range(0, img.size, CS):
        (ext,) = await img.block_status(pos, min(CS, img.size - pos))
        out.append(ext.kind)
    return out
