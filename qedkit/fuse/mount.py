"""A FUSE file system holding one file: the guest disk of an image.

References: libfuse's high-level API (fuse.h: the operations, fuse_main and its
signal handling); the mfusepy binding (ctypes, libfuse 3).

Theory of operation
-------------------
The image is opened and used on one asyncio event loop running in its own thread
(``EngineThread``), exactly as ``qed serve`` uses it: the same driver, the same
allocation lock and policy (``--allocation home`` records the home policy), the
same need-check handling, flushes on a worker thread (``FileStore.offload``).
libfuse calls the operations on its own threads (the multi-threaded loop); each
operation hands its request to the engine loop (``asyncio.run_coroutine_threadsafe``)
and waits for it, so requests from many processes are in flight together and are
serialized by the engine where they must be (allocations), not here.

The mount shows the root directory holding one regular file of the image's size.
Reads past the end are short; writes past the end fail with ENOSPC (the disk does
not grow); ``truncate`` to another size fails with EPERM; ``fsync`` flushes the
image (what was written before is durable); ``fallocate`` with PUNCH_HOLE or
ZERO_RANGE zeroes the range (punching whole allocated clusters, as ``qed io write
-z -u`` does), which is what ``mkfs`` and ``fstrim``-like tools use. A read-only
mount refuses opens for writing (EROFS).

Unmounting (``fusermount3 -u``, or SIGTERM/SIGINT/SIGHUP, which libfuse turns into a
clean exit of its loop and an unmount) ends with ``destroy``: the image is flushed
and closed (NEED_CHECK cleared), then the engine loop stops.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import mfusepy  # type: ignore[import-untyped]

from ..engine.base import BlockImage
from ..errors import QedError

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class EngineThread:
    """An asyncio loop on a thread of its own, running engine coroutines for callers
    on other threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="qed-engine", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine loop and wait for its result (or error)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def _oserror(exc: QedError) -> mfusepy.FuseOSError:
    code = getattr(exc, "errno", None) or errno.EIO
    return mfusepy.FuseOSError(code)


class DiskFileSystem(mfusepy.Operations):  # type: ignore[misc]
    """The operations of a mount holding ``name``, the guest disk of ``image``."""

    use_ns = True

    def __init__(self, image: BlockImage, engine: EngineThread, name: str) -> None:
        self.image = image
        self.engine = engine
        self.name = name
        self.path = "/" + name
        self.readonly = image.readonly
        self.closed = False
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
        self._uid, self._gid = os.getuid(), os.getgid()

    # ---- names and attributes ---------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        base = {"st_uid": self._uid, "st_gid": self._gid, **self._times}
        if path == "/":
            return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != self.path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        mode = 0o444 if self.readonly else 0o644
        size = self.image.size
        return {
            **base,
            "st_mode": stat.S_IFREG | mode,
            "st_nlink": 1,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": self.image.cluster_size or 65536,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", self.name]

    def statfs(self, path: str) -> dict[str, int]:
        size = self.image.size
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": size // 4096, "f_namemax": 255}

    # ---- opening ----------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if path != self.path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if self.readonly and flags & (os.O_WRONLY | os.O_RDWR):
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if path != self.path:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if length != self.image.size:
            raise mfusepy.FuseOSError(errno.EPERM)  # the disk has a fixed size
        return 0

    # ---- I/O ----------------------------------------------------------------------

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        end = min(offset + size, self.image.size)
        if offset >= end:
            return b""
        try:
            return self.engine.call(self.image.read(offset, end - offset))
        except QedError as exc:
            raise _oserror(exc) from exc

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self.readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset + len(data) > self.image.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        try:
            self.engine.call(self.image.write(offset, data))
        except QedError as exc:
            raise _oserror(exc) from exc
        return len(data)

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        if self.readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        end = offset + size
        if end > self.image.size:
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
                end = self.image.size  # KEEP_SIZE: the part past the end is nothing
            else:
                raise mfusepy.FuseOSError(errno.ENOSPC)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        if offset < end and mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            unmap = bool(mode & FALLOC_FL_PUNCH_HOLE)
            try:
                self.engine.call(self.image.write_zeroes(offset, end - offset, unmap=unmap))
            except QedError as exc:
                raise _oserror(exc) from exc
        return 0  # mode 0 inside the disk: the space is there already, as far as it can be

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        try:
            self.engine.call(self.image.flush())
        except QedError as exc:
            raise _oserror(exc) from exc
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() does not sync (as for a local file); fsync does

    def release(self, path: str, fh: int) -> int:
        return 0

    # ---- unmount ------------------------------------------------------------------

    def destroy(self, path: str) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the image, then stop the engine loop (once)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.engine.call(self.image.close())
        finally:
            self.engine.stop()


def mount(
    image: BlockImage,
    engine: EngineThread,
    mountpoint: str,
    *,
    name: str,
    debug: bool = False,
) -> None:
    """Serve ``image`` (opened on ``engine``'s loop) at ``mountpoint`` until it is
    unmounted; the image is closed when this returns."""
    fs = DiskFileSystem(image, engine, name)
    try:
        mfusepy.FUSE(
            fs,
            mountpoint,
            foreground=True,
            debug=debug,
            ro=image.readonly,
            fsname=f"qed:{image.filename}",
            subtype="qed",
            default_permissions=True,
        )
    except RuntimeError:
        # libfuse returns non-zero when a signal ended its loop; it unmounted and
        # called destroy all the same, which is the clean exit asked for.
        if not fs.closed:
            raise
    finally:
        fs.close()
