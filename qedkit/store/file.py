"""A local file as a byte store.

Theory of operation: every call is one or a few positional syscalls (preadv, pwritev,
fallocate, lseek SEEK_DATA/SEEK_HOLE, fdatasync) made *inline* on the calling thread,
even though the methods are ``async``. For page-cache I/O a syscall is a few
microseconds, while handing it to a thread pool costs tens (measured in bench/), and
the coroutine then completes without suspending, which lets the synchronous facade
drive the engine without an event loop round trip. The price is that a slow disk
stalls the event loop for the duration of one request; the NBD server bounds request
sizes, so a stall is bounded too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import ImageLockedError, StoreError
from .base import Buffer, ByteStore, StoreCapabilities, StoreExtent

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_IOV_MAX = 1024  # Linux UIO_MAXIOV
# O_DIRECT requests must be aligned to the logical block size (512 on this project's
# machines, 4096 on many disks): 4096 serves both.
DIRECT_ALIGN = 4096

# ---- QEMU-compatible image locking ---------------------------------------------
# QEMU (block/file-posix.c) takes shared OFD locks on single bytes of the image
# file: byte 100 + P while it holds permission P, and byte 200 + P while it does not
# let others have P. A new user first takes its own bytes, then tests the opposite
# ones: each permission it wants against the others' "unshared" bytes, and each
# permission it refuses to share against the others' "held" bytes. Permission bit
# numbers are QEMU's BLK_PERM_* (7.2 through 10.x).
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_RESIZE = 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write", PERM_RESIZE: "resize"}
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)  # Linux values
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on LP64 Linux


def _ofd_lock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    """One OFD lock call on a single byte; returns the l_type the kernel reports."""
    packed = _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    return int(_FLOCK.unpack(result)[0])


async def _offloaded(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a worker thread. Only stores told to ``offload`` get here,
    and only code that imports asyncio itself sets that: the store leaves asyncio
    out of the start-up of commands that never wait (engine.sync)."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


_libc_handle: Any = None


def _libc() -> Any:
    """libc through ctypes, for the calls the os module lacks (fallocate with flags;
    mmap, munmap and memcmp on addresses, for HostMapping).
    Imported on first use, and found as the process's own symbols (dlopen(NULL)):
    ``ctypes.util.find_library`` runs a subprocess (~10 ms), and ctypes is ~1 ms that
    most commands never need."""
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        ptr, size = ctypes.c_void_p, ctypes.c_size_t
        libc.mmap.restype = ptr
        libc.mmap.argtypes = [ptr, size, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        libc.munmap.argtypes = [ptr, size]
        libc.memcmp.argtypes = [ptr, ptr, size]
        _libc_handle = libc
    return _libc_handle


def _libc_call(name: str, *args: int) -> None:
    libc = _libc()
    if getattr(libc, name)(*args) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class HostMapping:
    """A read-only shared mapping of a whole file, so that two ranges of mapped files
    are compared in place (one memcmp) instead of being copied into buffers first.

    A mapping faults with SIGBUS when the file shrinks under it, so FileStore hands
    one out only while its locks keep every cooperating process from writing or
    resizing the file (``resize_fenced``: opened read-only without force-share).
    """

    def __init__(self, fd: int, size: int) -> None:
        import ctypes
        import mmap

        libc = _libc()
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._libc = libc
        self.address: int | None = address
        self.size = size

    def equal(self, offset: int, other: HostMapping, other_offset: int, length: int) -> bool:
        """Whether ``length`` bytes at ``offset`` here equal those at ``other_offset``
        of ``other``. Both ranges must lie inside their files (ValueError if not)."""
        if self.address is None or other.address is None:
            raise ValueError("the mapping is closed")
        if not (offset >= 0 and offset + length <= self.size) or not (
            other_offset >= 0 and other_offset + length <= other.size
        ):
            raise ValueError("range outside the mapped file")
        found = self._libc.memcmp(self.address + offset, other.address + other_offset, length)
        return int(found) == 0

    def close(self) -> None:
        if self.address is not None:
            self._libc.munmap(self.address, self.size)
            self.address = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags (os.posix_fallocate has none)."""
    _libc_call("fallocate", fd, mode, offset, length)


def _store_error(name: str, what: str, exc: OSError) -> StoreError:
    err = StoreError(f"{what}: {exc.strerror or exc}", filename=name, errno=exc.errno)
    err.__cause__ = exc
    return err


class FileStore(ByteStore):
    """A regular file (or block device) opened with ``os.open``."""

    def __init__(self, fd: int, name: str, *, writable: bool, unsafe: bool = False) -> None:
        self.fd = fd
        # unsafe: flush() does nothing (qemu-img's cache=unsafe), for scratch output
        # such as a convert target that is useless after a crash anyway.
        self.unsafe = unsafe
        # A server sets this so that the slow calls (fdatasync, which takes
        # milliseconds on a real disk, the bulk copies of defragmentation, and O_DIRECT
        # reads and writes) run on a worker thread while the event loop goes on
        # serving other requests.
        self.offload = False
        self.name = name
        self._closed = False
        # A second descriptor opened with O_DIRECT (``open(direct=True)``): aligned
        # reads and writes into aligned buffers go through it, bypassing the page
        # cache; anything else (metadata into Python's own buffers) is buffered.
        # Linux keeps the two coherent (direct I/O writes back and drops the cached
        # pages of its range).
        self.direct_fd: int | None = None
        # Whether our locks keep every cooperating process (QEMU, qedkit) from
        # resizing the file: only then may it be mapped (see host_mapping).
        self.resize_fenced = False
        st = os.fstat(fd)
        self._is_regular = stat.S_ISREG(st.st_mode)
        self._can_punch = writable and self._is_regular
        self.capabilities = StoreCapabilities(
            writable=writable,
            punch_holes=self._can_punch,
            seek_holes=self._is_regular,
        )

    @classmethod
    def open(
        cls,
        path: str,
        *,
        readonly: bool = False,
        create: bool = False,
        unsafe: bool = False,
        direct: bool = False,
    ) -> FileStore:
        """Open ``path``; with ``create`` the file is created if missing (the caller
        locks it before truncating: it may be an image someone else has open).
        ``direct`` also opens it with O_DIRECT for aligned data I/O (qemu-img's
        ``-t none``); a file system that refuses O_DIRECT is a StoreError."""
        flags = os.O_CLOEXEC | (os.O_RDONLY if readonly else os.O_RDWR)
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise _store_error(path, "cannot open", exc) from exc
        store = cls(fd, path, writable=not readonly, unsafe=unsafe)
        if direct:
            try:
                store.direct_fd = os.open(path, (flags & ~os.O_CREAT) | os.O_DIRECT)
            except OSError as exc:
                os.close(fd)
                raise _store_error(path, "cannot open for direct I/O (O_DIRECT)", exc) from exc
        return store

    def _direct(self, offset: int, length: int) -> int | None:
        """The O_DIRECT descriptor if a request of ``length`` at ``offset`` may use it."""
        fd = self.direct_fd
        if fd is None or (offset | length) % DIRECT_ALIGN or not length:
            return None
        return fd

    # ---- reads ---------------------------------------------------------------

    async def size(self) -> int:
        return self.size_now()

    def size_now(self) -> int:
        try:
            return os.fstat(self.fd).st_size if self._is_regular else os.lseek(self.fd, 0, 2)
        except OSError as exc:
            raise _store_error(self.name, "cannot stat", exc) from exc

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        view = memoryview(buf).cast("B")
        total = 0
        want = len(view)
        direct = self._direct(offset, want)
        if direct is not None:
            try:
                if self.offload:  # a direct read waits for the disk: on a thread
                    total = await _offloaded(os.preadv, direct, [view], offset)
                else:
                    total = os.preadv(direct, [view], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                    raise _store_error(
                        self.name, f"read of {want} bytes at offset {offset} failed", exc
                    ) from exc
        try:
            while total < want:
                n = os.preadv(self.fd, [view[total:]], offset + total)
                if n == 0:
                    break
                total += n
        except OSError as exc:
            raise _store_error(
                self.name, f"read of {want} bytes at offset {offset} failed", exc
            ) from exc
        return total

    def pread_now(self, offset: int, length: int) -> bytes:
        """Synchronous read for hot paths that must not create a coroutine (the NBD
        server's cached reads); short only at the end of the file."""
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise _store_error(
                self.name, f"read of {length} bytes at offset {offset} failed", exc
            ) from exc

    def preadinto_now(self, offset: int, view: memoryview) -> int:
        """Synchronous read into ``view`` (hot paths, like pread_now); returns the
        bytes read, short only at the end of the file."""
        try:
            return os.preadv(self.fd, [view], offset)
        except OSError as exc:
            raise _store_error(self.name, f"read at offset {offset} failed", exc) from exc

    def pwrite_now(self, offset: int, data: Buffer) -> None:
        """Synchronous write of ``data`` (hot paths, like pread_now)."""
        self._check_writable()
        try:
            n = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise _store_error(self.name, f"write at offset {offset} failed", exc) from exc
        if n != len(data):  # rare: finish through the general path
            view = memoryview(data)[n:]
            while view:
                try:
                    k = os.pwrite(self.fd, view, offset + n)
                except OSError as exc:
                    raise _store_error(self.name, f"write at offset {offset} failed", exc) from exc
                view = view[k:]
                n += k

    async def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise _store_error(
                self.name, f"read of {length} bytes at offset {offset} failed", exc
            ) from exc
        if len(data) < length and data:
            rest = await ByteStore.read(self, offset + len(data), length - len(data))
            return data + rest
        return data

    # ---- writes --------------------------------------------------------------

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        direct = self._direct(offset, sum(len(v) for v in views))
        if direct is not None and len(views) <= _IOV_MAX:
            try:
                if self.offload:
                    n = await _offloaded(os.pwritev, direct, views, offset)
                else:
                    n = os.pwritev(direct, views, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: an unaligned buffer
                    raise _store_error(self.name, f"write at offset {offset} failed", exc) from exc
            else:
                if n == sum(len(v) for v in views):
                    return
                views, offset = [memoryview(b"".join(views))[n:]], offset + n
        self._pwritev_buffered(offset, views)

    def pwritev_now(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Synchronous gathering write through the page cache (hot paths, like
        pwrite_now)."""
        self._check_writable()
        self._pwritev_buffered(offset, [memoryview(b).cast("B") for b in buffers if len(b)])

    def _pwritev_buffered(self, offset: int, views: list[memoryview]) -> None:
        try:
            while views:
                batch = views[:_IOV_MAX]
                want = sum(len(v) for v in batch)
                n = os.pwritev(self.fd, batch, offset)
                offset += n
                if n == want:
                    del views[: len(batch)]
                    continue
                # Short write: drop what was written and go again.
                while n:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except OSError as exc:
            raise _store_error(self.name, f"write at offset {offset} failed", exc) from exc

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self._check_writable()
        if length <= 0:
            return
        if self._is_regular:
            mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if punch else FALLOC_FL_ZERO_RANGE
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise _store_error(
                        self.name, f"zeroing {length} bytes at {offset} failed", exc
                    ) from exc
        await ByteStore.write_zeroes(self, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        if not self._can_punch or length <= 0:
            return
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _store_error(
                    self.name, f"discard of {length} bytes at {offset} failed", exc
                ) from exc

    async def copy_range(self, src: int, dst: int, length: int) -> None:
        """In-kernel copy (copy_file_range): no trip through user memory. Holes in
        the source stay holes in the destination (a punched cluster moved by defrag
        must not take disk space again)."""
        self._check_writable()
        extents = await self.extents(src, length)
        if extents and not all(e.data for e in extents):
            for ext in extents:
                at = dst + ext.offset - src
                if ext.data:
                    await self._copy_data(ext.offset, at, ext.length)
                else:
                    await self._hole(at, ext.length)
            covered = sum(e.length for e in extents)
            if covered < length:  # source past the end of the file
                await self._copy_data(src + covered, dst + covered, length - covered)
            return
        await self._copy_data(src, dst, length)

    async def _hole(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` a hole, growing the file to its end if it
        is shorter, never shrinking it. The size is looked at only here, right before
        the one write that grows it: while a copy waits on a worker thread the event
        loop goes on, and an allocating write may extend the file past this range
        (setting the size from an earlier look cut that write off: lost data). A
        one-byte write grows the file only if it is shorter, in the kernel, and the
        punch that follows keeps the size."""
        end = offset + length
        if end > self.size_now():
            self.pwrite_now(end - 1, b"\0")
        await self.write_zeroes(offset, length, punch=True)

    async def _copy_data(self, src: int, dst: int, length: int) -> None:
        done = 0
        try:
            while done < length:
                if self.offload:
                    n = await _offloaded(
                        os.copy_file_range, self.fd, self.fd, length - done, src + done, dst + done
                    )
                else:
                    n = os.copy_file_range(self.fd, self.fd, length - done, src + done, dst + done)
                if n == 0:  # source past the end of the file: the rest reads as zeros
                    await self.write_zeroes(dst + done, length - done)
                    return
                done += n
        except OSError as exc:
            if (
                exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
                and not done
            ):
                await ByteStore.copy_range(self, src, dst, length)
                return
            raise _store_error(
                self.name, f"copy of {length} bytes from {src} to {dst} failed", exc
            ) from exc

    async def flush(self) -> None:
        if not self.capabilities.writable or self.unsafe:
            return
        try:
            if self.offload:
                await _offloaded(os.fdatasync, self.fd)
            else:
                os.fdatasync(self.fd)
        except OSError as exc:
            raise _store_error(self.name, "flush failed", exc) from exc

    async def truncate(self, size: int) -> None:
        self._check_writable()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _store_error(self.name, f"truncate to {size} bytes failed", exc) from exc

    # ---- locking -------------------------------------------------------------

    def lock(self, *, write: bool, shared: bool) -> None:
        """Lock the file the way QEMU does, so QEMU and qedkit keep out each other's
        conflicting users. ``write``: hold read, write and resize and share neither
        write nor resize (one writer). Otherwise hold read and, unless ``shared``
        (qemu-img's -U), refuse to share write and resize (no writer may appear
        while we read). Raises ImageLockedError naming the permission in conflict.
        Filesystems without OFD locks are used unlocked, as QEMU does."""
        held: tuple[int, ...] = (PERM_CONSISTENT_READ,)
        unshared: tuple[int, ...] = () if shared else (PERM_WRITE, PERM_RESIZE)
        if write:
            held, unshared = (
                (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE),
                (PERM_WRITE, PERM_RESIZE),
            )
        try:
            for perm in held:
                _ofd_lock(self.fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + perm)
            for perm in unshared:
                _ofd_lock(self.fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + perm)
            conflicts = [
                perm
                for perm in held
                if _ofd_lock(self.fd, _F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + perm)
                != fcntl.F_UNLCK
            ] + [
                perm
                for perm in unshared
                if _ofd_lock(self.fd, _F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + perm)
                != fcntl.F_UNLCK
            ]
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                conflicts = [PERM_WRITE]
            elif exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return
            else:
                raise _store_error(self.name, "cannot lock", exc) from exc
        if not conflicts:
            self.resize_fenced = not write and PERM_RESIZE in unshared
            return
        self.unlock()
        name = PERM_NAMES[conflicts[0]]
        hint = "" if write or shared else "; use -U (force share) to inspect it anyway"
        raise ImageLockedError(
            f'failed to get "{name}" lock: the image is in use by another process{hint}',
            filename=self.name,
        )

    def host_mapping(self) -> HostMapping | None:
        """A read-only mapping of the whole file, or None where one is not safe: the
        file is writable, or no lock of ours fences off writers and resizers (force
        share, or a filesystem without OFD locks)."""
        if not self.resize_fenced or self.capabilities.writable or not self._is_regular:
            return None
        size = self.size_now()
        if size == 0:
            return None
        try:
            return HostMapping(self.fd, size)
        except OSError:
            return None

    def unlock(self) -> None:
        """Drop every lock byte this store holds."""
        self.resize_fenced = False
        for byte in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
            with contextlib.suppress(OSError):
                fcntl.fcntl(
                    self.fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 100, 0)
                )

    # ---- metadata ------------------------------------------------------------

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        size = self.size_now()
        end = min(offset + length, size)
        if end <= offset:
            return []
        if not self._is_regular:
            return [StoreExtent(offset, end - offset, True)]
        out: list[StoreExtent] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # no data after pos
                data = min(data, end)
                if data > pos:
                    out.append(StoreExtent(pos, data - pos, False))
                    pos = data
                    continue
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                out.append(StoreExtent(pos, hole - pos, True))
                pos = hole
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [StoreExtent(offset, end - offset, True)]
            raise _store_error(self.name, "cannot map holes", exc) from exc
        return out

    async def allocated_bytes(self) -> int:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError as exc:
            raise _store_error(self.name, "cannot stat", exc) from exc

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.direct_fd is not None:
                os.close(self.direct_fd)
            os.close(self.fd)
