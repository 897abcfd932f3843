"""The contract every image format driver keeps (QED, raw; qcow2 later).

Modelled on QEMU's BlockDriver: a driver answers for its *own layer* only. Its
``block_status`` says, for each range, whether this layer holds data, holds zeros, or
leaves the range to the layer below (UNALLOCATED); code in engine.mapping walks the
backing chain. Reads, by contrast, are complete: a driver reads through its own
backing image.

Preconditions of every call, checked by the driver: ``0 <= offset`` and
``offset + length <= size``; any alignment (requests need none). On error the image
is left consistent, and data acknowledged before the call is intact.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidRequestError, QedError, ReadOnlyError
from ..store.base import Buffer, ByteStore
from .names import full_backing_filename

if TYPE_CHECKING:
    from ..store.file import HostMapping


class ExtentKind(enum.Enum):
    DATA = "data"  # this layer holds the bytes at host_offset
    ZERO = "zero"  # this layer says: zeros (a QED zero cluster, a hole in a raw file)
    UNALLOCATED = "unallocated"  # this layer says nothing: look below


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes with one status in one layer.

    ``host_offset`` is the byte offset in the layer's store where the run starts,
    when the bytes have a place there (DATA; ZERO holes in a raw file; space a qcow2
    layer reserved for ZERO or UNALLOCATED subclusters); else None.
    """

    start: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot, as ``qemu-img info`` lists it."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` reports, for one image of a chain.

    ``format_specific`` holds the format's own fields (QAPI names, in schema order),
    printed under "Format specific information"; empty for formats without any."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    dirty: bool = False
    format_specific: tuple[tuple[str, object], ...] = ()
    snapshots: tuple[SnapshotInfo, ...] = ()


class BlockImage(ABC):
    """An open image of some format. All I/O methods are coroutines."""

    filename: str
    format_name: str
    readonly: bool
    store: ByteStore
    backing: BlockImage | None = None

    @property
    @abstractmethod
    def size(self) -> int:
        """Guest-visible size in bytes."""

    @property
    def cluster_size(self) -> int | None:
        return None

    # ---- I/O -----------------------------------------------------------------

    @abstractmethod
    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with guest bytes from ``offset`` (the range must be in the image)."""

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The bytes, if the driver can produce them at once without waiting (a cached
        mapping over a local file); else None, and the caller uses ``readinto``. The
        NBD server's fast path for reads."""
        return None

    # Whether block status host offsets point at the guest bytes themselves, unencoded,
    # in ``self.store`` (QED, raw; not qcow2's external data files or compression).
    host_offsets_are_data = False

    def host_mapping(self) -> HostMapping | None:
        """A read-only mapping (store.file.HostMapping) of the file that this layer's
        block status host offsets point into, when the data lies there unencoded and
        the file cannot change while mapped; else None. Compare's fast path."""
        store = getattr(self, "store", None) if self.host_offsets_are_data else None
        mapping = getattr(store, "host_mapping", None)
        return mapping() if mapping is not None else None

    def readinto_now(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` at once if the driver can without waiting (as read_now);
        False (``view`` untouched or partly filled) means use ``readinto``. The
        synchronous API's fast path."""
        return False

    @abstractmethod
    async def write(self, offset: int, data: Buffer) -> None: ...

    def write_now(self, offset: int, data: Buffer) -> bool:
        """Write at once if the driver can without waiting (allocated clusters of a
        local file; QED also allocates where that needs no flush and no read);
        False (nothing written) means use ``write``. A QedError means the same (the
        caller's ``write`` then reports it; space may have leaked)."""
        return False

    def write_batch_now(self, writes: Sequence[tuple[int, Buffer]]) -> int:
        """``write_now`` for each of ``writes`` (offset, data) in turn, up to the first
        that cannot be done at once or fails: how many were done. The caller sends
        the rest, in order, to ``write``/``write_batch``. A driver may share work
        between them (QED commits a run of allocating writes as one group)."""
        done = 0
        for offset, data in writes:
            try:
                if not self.write_now(offset, data):
                    break
            except QedError:
                break
            done += 1
        return done

    async def write_batch(self, writes: Sequence[tuple[int, Buffer]]) -> list[QedError | None]:
        """Do ``writes`` (offset, data) as ``write`` would, one after the other, and
        say how each ended: None, or the error it raised (the others still run). A
        driver may share work between them (QED: consecutive allocating writes
        share one allocation and one table update). Failure guarantee: each write
        as ``write``'s."""
        out: list[QedError | None] = []
        for offset, data in writes:
            try:
                await self.write(offset, data)
            except QedError as exc:
                out.append(exc)
            else:
                out.append(None)
        return out

    @abstractmethod
    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros. ``unmap`` allows releasing host space."""

    @abstractmethod
    async def discard(self, offset: int, length: int) -> None:
        """Advisory: the range may afterwards read as zeros (never as backing data)."""

    @abstractmethod
    async def flush(self) -> None: ...

    @abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Status of ``[offset, offset+length)`` in this layer only, as sorted extents
        covering the whole range."""

    @abstractmethod
    async def resize(self, new_size: int) -> None: ...

    @abstractmethod
    async def info(self) -> ImageInfo: ...

    @abstractmethod
    async def close(self) -> None:
        """Flush, mark clean and release the store (and the backing chain)."""

    # ---- helpers for drivers -------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequestError(
                f"request [{offset}, {offset + length}) is outside the image (size {self.size})",
                filename=self.filename,
            )

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError("image is open read-only", filename=self.filename)

    async def _info(
        self,
        *,
        backing_filename: str | None = None,
        backing_format: str | None = None,
        dirty: bool = False,
        format_specific: tuple[tuple[str, object], ...] = (),
        snapshots: tuple[SnapshotInfo, ...] = (),
    ) -> ImageInfo:
        """``info()`` from what every driver knows (file, format, sizes, cluster size)
        and what the driver says: the backing name (resolved here) and the rest."""
        name = backing_filename
        return ImageInfo(
            filename=self.filename,
            format=self.format_name,
            virtual_size=self.size,
            actual_size=await self.store.allocated_bytes(),
            cluster_size=self.cluster_size,
            backing_filename=name,
            full_backing_filename=full_backing_filename(self.filename, name) if name else None,
            backing_format=backing_format if name else None,
            dirty=dirty,
            format_specific=format_specific,
            snapshots=snapshots,
        )

    def chain(self) -> list[BlockImage]:
        """This image and its backing images, top first."""
        out: list[BlockImage] = []
        img: BlockImage | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    async def __aenter__(self) -> BlockImage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
