"""The synchronous Python API: ``qedkit.open``, ``qedkit.create`` and ``Image``.

::

    import qedkit

    qedkit.create("disk.qed", 10 * 2**30)
    with qedkit.open("disk.qed") as img:
        img.write(0, b"hello")
        assert img.read(0, 5) == b"hello"
        for entry in img.map():
            print(entry.start, entry.length, entry.data)
        with img.as_file() as f:       # an io.RawIOBase
            f.seek(4096)
            f.read(512)

Every method runs the asynchronous engine (``qedkit.aio``) to completion; see
engine.sync for why that costs almost nothing for local files. An ``Image`` belongs
to the thread that opened it.
"""

from __future__ import annotations

import io
from types import TracebackType

from .engine.base import BlockImage, Extent, ImageInfo
from .engine.chain import create_image, open_image
from .engine.check import CheckReport, RepairMode, check_image
from .engine.l2cache import DEFAULT_BUDGET
from .engine.lostfound import LostFound, LostFoundTar
from .engine.mapping import MapEntry, map_chain
from .engine.qed import QedImage
from .engine.sync import run
from .errors import UnsupportedFeatureError
from .format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE
from .store.base import Buffer as _Buffer


class Image:
    """An open image (QED, raw, or qcow2 read-only) with its backing chain."""

    def __init__(self, engine: BlockImage) -> None:
        self.engine = engine

    # ---- properties ----------------------------------------------------------

    @property
    def filename(self) -> str:
        return self.engine.filename

    @property
    def format(self) -> str:
        return self.engine.format_name

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def readonly(self) -> bool:
        return self.engine.readonly

    @property
    def cluster_size(self) -> int | None:
        return self.engine.cluster_size

    # ---- I/O -----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes from ``offset`` (the range must lie in the image)."""
        return run(self.engine.read(offset, length))

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns ``len(buf)``."""
        view = memoryview(buf).cast("B")
        if not self.engine.readinto_now(offset, view):  # no event loop round trip
            run(self.engine.readinto(offset, view))
        return len(view)

    def write(self, offset: int, data: _Buffer) -> None:
        run(self.engine.write(offset, data))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        run(self.engine.write_zeroes(offset, length, unmap=unmap))

    def discard(self, offset: int, length: int) -> None:
        run(self.engine.discard(offset, length))

    def flush(self) -> None:
        run(self.engine.flush())

    def resize(self, new_size: int) -> None:
        run(self.engine.resize(new_size))

    # ---- metadata ------------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """This layer's status (data / zero / unallocated) of a range."""
        if length is None:
            length = self.size - offset
        return run(self.engine.block_status(offset, length))

    def map(self, offset: int = 0, length: int | None = None) -> list[MapEntry]:
        """The whole chain's map, entries as ``qemu-img map --output=json`` has them."""
        return run(map_chain(self.engine, offset, length))

    def info(self) -> ImageInfo:
        return run(self.engine.info())

    def chain_info(self) -> list[ImageInfo]:
        """``info`` of this image and each backing image, top first."""
        return [run(img.info()) for img in self.engine.chain()]

    def check(
        self, repair: RepairMode | str | None = None, *, lost_found: LostFound | None = None
    ) -> CheckReport:
        """Check (and with ``repair`` = "leaks" or "all", repair) a QED image, as
        ``qed check [-r]`` does: a repair removes leaked clusters by moving clusters
        into them, and when the check found corruption, leaked clusters holding data
        are saved first to ``lost_found`` (default: ``FILE.lost+found.tar`` beside
        the image; see engine.lostfound). The report names what was saved."""
        if not isinstance(self.engine, QedImage):
            raise UnsupportedFeatureError(
                f"format {self.format} has no consistency check", filename=self.filename
            )
        mode = RepairMode(repair) if isinstance(repair, str) else repair
        if lost_found is None and mode is not None:
            lost_found = LostFoundTar.beside(self.filename)
        return run(check_image(self.engine, mode, lost_found=lost_found))

    # ---- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Flush, mark the image clean and close it (and its backing chain)."""
        run(self.engine.close())

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def as_file(self) -> ImageFile:
        """A file-like view (io.RawIOBase) of the guest disk; closing it does not close
        the image. Wrap it in io.BufferedReader for small reads."""
        return ImageFile(self)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<qedkit.Image {self.filename!r} {self.format} {self.size} bytes {mode}>"


class ImageFile(io.RawIOBase):
    """The guest disk of an open image as a seekable raw file."""

    def __init__(self, image: Image) -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._image.readonly

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._image.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buf: _Buffer) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._image.size - self._pos))
        if n:
            self._image.readinto(self._pos, view[:n])
            self._pos += n
        return n

    def write(self, data: _Buffer) -> int:  # type: ignore[override]
        if self._image.readonly:
            raise io.UnsupportedOperation("image is open read-only")
        view = memoryview(data).cast("B")
        n = max(0, min(len(view), self._image.size - self._pos))
        if n < len(view):
            raise OSError(28, "write past the end of the image")  # ENOSPC, like a device
        self._image.write(self._pos, view)
        self._pos += n
        return n

    def flush(self) -> None:
        if not self.closed and not self._image.readonly:
            self._image.flush()


def open(
    path: str,
    *,
    readonly: bool = False,
    format: str | None = None,
    backing_chain: bool = True,
    cache_budget: int = DEFAULT_BUDGET,
    auto_repair: bool = True,
    force_share: bool = False,
    copy_on_read: bool = False,
) -> Image:
    """Open an image; ``format`` is probed when None. A read-write open of an image
    whose NEED_CHECK flag is set repairs it first (unless ``auto_repair=False``);
    a read-only open never writes. ``backing_chain=False`` leaves the backing file
    closed (unallocated clusters then read as zeros). The file is locked as QEMU
    locks images (ImageLockedError while another process writes it, or while anyone
    has it open when opening for writing); ``force_share=True`` reads it anyway, like
    qemu-img's -U. ``copy_on_read=True`` (a read-write open; qemu-io's -C) copies
    every cluster a read takes from the backing chain into the image: whole
    clusters, all-zero ones as zero clusters (docs/DESIGN.md, copy-on-read)."""
    return Image(
        run(
            open_image(
                path,
                fmt=format,
                readonly=readonly,
                backing_chain=backing_chain,
                cache_budget=cache_budget,
                repair=auto_repair,
                force_share=force_share,
                copy_on_read=copy_on_read,
            )
        )
    )


def create(
    path: str,
    size: int | None = None,
    *,
    format: str = "qed",
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
    backing_file: str | None = None,
    backing_format: str | None = None,
    allocation: str = "end",
) -> int:
    """Create an empty image and return its size (taken from the backing file when
    ``size`` is None). ``backing_file`` is relative to the new image's directory.
    ``allocation="home"`` makes new clusters go to their home positions, so the image
    stays laid out like a raw file (docs/DESIGN.md, defragmentation)."""
    return run(
        create_image(
            path,
            size,
            fmt=format,
            cluster_size=cluster_size,
            table_size=table_size,
            backing_file=backing_file,
            backing_format=backing_format,
            allocation=allocation,
        )
    )
