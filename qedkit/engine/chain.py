"""Opening and creating images, and resolving backing chains.

``open_image`` probes the format (unless told), opens the backing chain read-only,
and hands back the top image. Backing names are resolved against the directory of
the image that names them (not the working directory), as QEMU does; a raw backing
file recorded with BACKING_FORMAT_NO_PROBE is opened as raw without probing, and a
qcow2 image's backing file with the format its backing-format extension names. qcow2
images open read-only only (engine.qcow2). Loops
(an image that is, through any number of links, its own backing file) and chains
deeper than MAX_CHAIN_DEPTH are refused.

Failure guarantee: an open that fails has written nothing, and has closed whatever
it opened.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import (
    BackingFileError,
    InvalidRequestError,
    QedError,
    UnsupportedFeatureError,
)
from ..format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE
from ..format.header import Feature, Header
from ..format.probe import PROBE_BYTES, probe_format
from ..store.base import ByteStore
from ..store.file import FileStore
from .base import BlockImage
from .l2cache import DEFAULT_BUDGET
from .names import full_backing_filename
from .qed import QedImage

# QEMU sets no limit but runs out of stack eventually; 64 is deeper than any real
# chain and small enough to fail fast on a generated loop of distinct names.
MAX_CHAIN_DEPTH = 64

_T = TypeVar("_T")

SUPPORTED_FORMATS = ("qed", "raw", "qcow2")
CREATABLE_FORMATS = ("qed", "raw")  # qcow2 is read-only


def _check_format_name(fmt: str) -> None:
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedFeatureError(
            f"unknown image format {fmt!r} (supported: {', '.join(SUPPORTED_FORMATS)})"
        )


def _open_store(
    path: str, *, readonly: bool, unsafe: bool = False, direct: bool = False
) -> ByteStore:
    if "://" in path:  # a remote image (store.url): read-only, connected on first read
        from ..store.url import open_url
        from .sync import running_loop

        # Remote stores are asyncio through and through: in a loop-free step of
        # engine.sync.run (asyncio was not loaded before), install the loop now.
        running_loop()

        return open_url(path, readonly=readonly)
    return FileStore.open(path, readonly=readonly, unsafe=unsafe, direct=direct)


async def probe(store: ByteStore) -> str:
    return probe_format(await store.read(0, PROBE_BYTES))


async def open_qed(
    store: ByteStore,
    header: Header,
    header_area: bytes,
    *,
    backing: BlockImage | None,
    readonly: bool,
    filename: str | None = None,
    cache_budget: int = DEFAULT_BUDGET,
    repair: bool = True,
) -> QedImage:
    """Open a QED image in ``store`` over its (open) backing image; on a read-write
    open of an image with NEED_CHECK set, check and repair it first (``repair=False``
    skips that, for ``qed check`` itself). As QEMU: an image that could not be
    checked must not be written (allocations could land on clusters a damaged table
    still uses), so a store error during that repair fails the open.

    That repair is cheap and predictable (``Reclaim.TAIL``): it repairs corruptions,
    truncates leaked clusters at the end of the file and punches the others, but
    moves no cluster and writes no lost+found file; leaked clusters next to a
    corruption are left alone. ``qed check -r`` does the rest (engine.check)."""
    img = await QedImage.open(
        store,
        header,
        header_area,
        backing=backing,
        readonly=readonly,
        filename=filename,
        cache_budget=cache_budget,
    )
    if not readonly and repair and img.header.needs_check:
        from .check import Reclaim, RepairMode, check_image  # ~15 ms: only when needed

        await check_image(img, repair=RepairMode.ALL, strict=True, reclaim=Reclaim.TAIL)
    return img


async def open_image(
    path: str,
    *,
    fmt: str | None = None,
    readonly: bool = False,
    backing_chain: bool = True,
    cache_budget: int = DEFAULT_BUDGET,
    repair: bool = True,
    unsafe_no_flush: bool = False,
    force_share: bool = False,
    direct: bool = False,
    _rewrite_qcow2: bool = False,
    copy_on_read: bool = False,
    _depth: int = 0,
    _seen: frozenset[str] = frozenset(),
) -> BlockImage:
    """Open ``path`` as ``fmt`` (probed when None) with its backing chain.

    ``copy_on_read`` makes reads of clusters the image leaves to its backing chain
    copy them into it (engine.qed.io; QEMU's copy-on-read): it needs a read-write
    open (InvalidRequestError before anything is opened otherwise), and does nothing
    for an image without a backing chain (a raw image).

    ``backing_chain=False`` opens the top image alone (reads of unallocated clusters
    then return zeros); ``repair=False`` skips the open-time repair of an image with
    NEED_CHECK set (``qed check`` wants to see it unrepaired); ``unsafe_no_flush``
    turns flushes of the top image into no-ops (qemu-img's cache=unsafe); ``direct``
    reads and writes the top image's aligned data with O_DIRECT (cache=none).

    The image file is locked as QEMU locks it (store.file): a read-write open fails
    with ImageLockedError while anyone else (QEMU included) has it open, a read-only
    open fails while someone writes it, unless ``force_share``. Backing files are
    opened read-only and shared, as QEMU opens them.
    """
    if fmt is not None:
        _check_format_name(fmt)
    if copy_on_read and readonly:
        raise InvalidRequestError(
            "copy-on-read writes the image: it cannot be opened read-only", filename=path
        )
    real = path if "://" in path else os.path.realpath(path)
    if real in _seen:
        raise BackingFileError(f"backing chain loop: {path} is its own backing file")
    if _depth > MAX_CHAIN_DEPTH:
        raise BackingFileError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
    try:
        store = _open_store(path, readonly=readonly, unsafe=unsafe_no_flush, direct=direct)
    except QedError as exc:
        raise exc.with_filename(path) from exc.__cause__
    try:
        store.lock(write=not readonly, shared=force_share or _depth > 0)
        detected = await probe(store)
        if fmt is None:
            fmt = detected
            _check_format_name(fmt)
        # The drivers other than QED are imported when an image needs them (start-up).
        if fmt == "raw":
            from .raw import RawImage

            return await RawImage.open(store, filename=path)
        chain = _Chain(path, backing_chain, cache_budget, _depth, _seen | {real})
        if fmt == "qcow2":
            from .qcow2 import Qcow2Image

            meta = await Qcow2Image.read_metadata(store, readonly=readonly or _rewrite_qcow2)
            backing = await chain.open(meta.backing_filename, meta.backing_format)
            return await chain.attach(
                backing,
                Qcow2Image.open(
                    store, meta, backing=backing, filename=path, cache_budget=cache_budget
                ),
            )
        header, area = await QedImage.read_header(store)
        backing_fmt = "raw" if header.has(Feature.BACKING_FORMAT_NO_PROBE) else None
        backing = await chain.open(header.backing_filename(area), backing_fmt)
        img = await chain.attach(
            backing,
            open_qed(
                store,
                header,
                area,
                backing=backing,
                readonly=readonly,
                filename=path,
                cache_budget=cache_budget,
                repair=repair,
            ),
        )
        img.copy_on_read = copy_on_read
        return img
    except QedError as exc:
        await store.close()
        exc.with_filename(path)
        raise
    except BaseException:
        await store.close()
        raise


async def open_for_conversion(
    path: str, *, fmt: str | None = None, cache_budget: int = DEFAULT_BUDGET
) -> BlockImage:
    """Open ``path`` for an in-place conversion (jobs.inplace): read-write and locked
    as any writer is. A qcow2 image comes back as the (read-only) qcow2 driver over
    that writable store: the converter writes past the end of the file and then the
    header sector itself, the driver never writes. Any other format opens as
    ``open_image`` opens it read-write (a QED image whose conversion was interrupted
    after the header switch is resumed from there)."""
    return await open_image(
        path, fmt=fmt, readonly=False, cache_budget=cache_budget, _rewrite_qcow2=True
    )


@dataclass(frozen=True, slots=True)
class _Chain:
    """The one seam where a backing name becomes an open image, whatever the format
    of the image naming it and whatever the scheme of the name (a file, a URL)."""

    path: str  # the image that names the backing file
    enabled: bool  # backing_chain: open the chain at all
    cache_budget: int
    depth: int
    seen: frozenset[str]

    async def open(self, name: str | None, fmt: str | None) -> BlockImage | None:
        """The backing image ``name`` (resolved against ``path``) as ``fmt`` (probed
        when None), read-only; None without a name or with the chain off."""
        if not name or not self.enabled:
            return None
        try:
            return await open_image(
                full_backing_filename(self.path, name),
                fmt=fmt,
                readonly=True,
                cache_budget=self.cache_budget,
                _depth=self.depth + 1,
                _seen=self.seen,
            )
        except BackingFileError:
            raise
        except QedError as exc:
            raise BackingFileError(f"cannot open backing file: {exc}") from exc

    @staticmethod
    async def attach(backing: BlockImage | None, opening: Awaitable[_T]) -> _T:
        """Finish opening the image over ``backing``; on failure close the backing."""
        try:
            return await opening
        except BaseException:
            if backing is not None:
                await backing.close()
            raise


async def create_image(
    path: str,
    size: int | None = None,
    *,
    fmt: str = "qed",
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
    backing_file: str | None = None,
    backing_format: str | None = None,
    check_backing: bool = True,
    allocation: str = "end",
) -> int:
    """Create an empty image; returns its size.

    As in qemu-img 7.2 a backing file needs its format (``backing_format``); the
    backing file is opened to check it and, when ``size`` is None, to take its size.
    ``check_backing=False`` (qemu-img's ``-u``) skips that, and then needs ``size``.
    ``allocation="home"`` records the home allocation policy (engine.qed.alloc). Nothing
    is created when a check fails.
    """
    _check_format_name(fmt)
    if fmt not in CREATABLE_FORMATS:
        raise UnsupportedFeatureError(f"qedkit cannot create {fmt} images", filename=path)
    if allocation not in ("end", "home"):
        raise InvalidRequestError(f"unknown allocation policy {allocation!r} (end or home)")
    if backing_file is not None and fmt != "qed":
        raise InvalidRequestError(f"format {fmt} has no backing file", filename=path)
    if backing_file:
        if not backing_format:
            raise InvalidRequestError(
                "backing file specified without backing format (use -F raw or -F qed)",
                filename=path,
            )
        _check_format_name(backing_format)
        if check_backing:
            full = full_backing_filename(path, backing_file)
            try:
                backing = await open_image(full, fmt=backing_format, readonly=True)
            except QedError as exc:
                raise BackingFileError(f"cannot open backing file: {exc}", filename=path) from exc
            try:
                if size is None:
                    size = backing.size
            finally:
                await backing.close()
    if size is None:
        raise InvalidRequestError("image size is required", filename=path)
    if fmt == "qed":
        QedImage.validate_create_options(size, cluster_size, table_size, backing_file or None)
    elif size < 0:
        raise InvalidRequestError(f"invalid image size {size}", filename=path)
    try:
        store = FileStore.open(path, create=True)
    except QedError as exc:
        raise exc.with_filename(path) from exc.__cause__
    try:
        store.lock(write=True, shared=False)
        if fmt == "qed":
            await QedImage.format_store(
                store,
                size,
                cluster_size=cluster_size,
                table_size=table_size,
                backing_name=backing_file or None,
                backing_raw=backing_format == "raw",
                home_allocation=allocation == "home",
            )
        else:
            await store.truncate(0)
            await store.truncate(size)
            await store.flush()
    except QedError as exc:
        exc.with_filename(path)
        raise
    finally:
        await store.close()
    return size
