"""The lost+found file: leaked clusters saved before a repair reclaims their space.

References: e2fsck's lost+found directory; POSIX ustar/pax archives (Python's
tarfile).

Theory of operation
-------------------
When a check finds corruption, a cluster that nothing references once the damage is
repaired may hold exactly what a damaged entry lost: the data of an L2 entry whose
offset was damaged, the L2 table of a damaged L1 entry, the original data of an
entry that was changed to point at another cluster. ``qed check -r`` saves every
such cluster that holds data (not a hole of the file, not all zeros) before it
reclaims the space, so that a person can look at the bytes with ordinary tools
(``tar tvf``, ``tar xf``, ``hexdump``, ``dd`` back into the guest).

The file is a tar archive beside the image, ``IMAGE.lost+found.tar`` (mode 0600 when
it is created: it holds guest data). Each repair appends one *run*, a directory
named after the time of the repair in UTC (``20261202T131500Z``; ``-2``, ``-3`` ...
when that name is taken):

    RUN/cluster-0x00050000.bin   the bytes of one cluster, named by its host offset
    RUN/index.json               written last: the image, the run, the cluster size,
                                 what the check found, and for every member its
                                 host offset, size and why it was saved

Failure guarantee: ``save`` returns only once every member is durable (the archive
fsynced, and its directory too when the archive is new); only then may the caller
reuse the clusters. If anything fails (a read-only directory, ENOSPC, a file of that
name that is not a tar archive, a read of the image), the archive is put back as it
was (a new one is removed, an old one cut back to its earlier runs) and StoreError
is raised, naming the lost+found file; the caller then reclaims nothing.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import io
import json
import os
import tarfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import QedError, StoreError

SUFFIX = ".lost+found.tar"

Reader = Callable[[int, int], Awaitable[bytes]]  # (host offset, length) -> bytes


@dataclass(frozen=True, slots=True)
class Orphan:
    """A cluster to save: ``length`` bytes at host ``offset``, and why."""

    offset: int
    length: int
    why: str


@dataclass(frozen=True, slots=True)
class SavedRun:
    """What one repair saved: ``clusters`` members of ``bytes`` bytes in all, under
    the directory ``run`` of the archive ``filename``."""

    filename: str
    run: str
    clusters: int
    bytes: int


class LostFound(ABC):
    """Where a repair saves clusters before it reclaims them."""

    filename: str

    @abstractmethod
    async def save(
        self,
        image: str,
        cluster_size: int,
        found: Sequence[str],
        orphans: Sequence[Orphan],
        read: Reader,
    ) -> SavedRun:
        """Save ``orphans`` of ``image`` (their bytes come from ``read``), with
        ``found`` (what the check found) in the index. Durable when it returns;
        raises StoreError (and keeps nothing of this run) otherwise."""


def lost_found_path(image_filename: str) -> str:
    """The lost+found archive of an image: beside it, ``IMAGE.lost+found.tar``."""
    return image_filename + SUFFIX


class LostFoundTar(LostFound):
    """The tar archive ``filename`` (see the module docstring). ``clock`` gives the
    time of a run (seconds since the epoch; tests fix it)."""

    def __init__(self, filename: str, *, clock: Callable[[], float] = time.time) -> None:
        self.filename = filename
        self.clock = clock

    @classmethod
    def beside(cls, image_filename: str) -> LostFoundTar:
        return cls(lost_found_path(image_filename))

    def _error(self, what: str, exc: OSError | QedError) -> StoreError:
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            code = exc.errno
        else:
            reason = str(exc)
            code = getattr(exc, "errno", None)
        return StoreError(f"{what}: {reason}", filename=self.filename, errno=code)

    async def save(
        self,
        image: str,
        cluster_size: int,
        found: Sequence[str],
        orphans: Sequence[Orphan],
        read: Reader,
    ) -> SavedRun:
        with self._appending() as tar:
            now = self.clock()
            run = _new_run_name(tar, now)
            entries = []
            total = 0
            for orphan in orphans:
                data = await read(orphan.offset, orphan.length)
                member = f"{run}/cluster-{orphan.offset:#010x}.bin"
                _add(tar, member, data, now)
                entries.append(
                    {
                        "member": member,
                        "offset": orphan.offset,
                        "size": len(data),
                        "why": orphan.why,
                    }
                )
                total += len(data)
            index = {
                "image": image,
                "run": run,
                "cluster-size": cluster_size,
                "found": list(found),
                "clusters": entries,
            }
            _add(tar, f"{run}/index.json", json.dumps(index, indent=2).encode() + b"\n", now)
            return SavedRun(self.filename, run, len(entries), total)

    @contextlib.contextmanager
    def _appending(self) -> Iterator[tarfile.TarFile]:
        """The archive, opened (created when missing) for one run to be appended;
        closed and made durable when the block ends, put back as it was (``_undo``)
        when it raises."""
        path = self.filename
        created = False
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error("cannot open the lost+found file", exc) from exc
        # Unbuffered: every write reaches the file (or fails) inside the try below,
        # none is left for the close to fail on after an undo.
        with os.fdopen(fd, "r+b", buffering=0) as f:
            old_size = os.fstat(fd).st_size
            try:
                # Not a context manager: closing writes the end-of-archive blocks,
                # which only a complete run may do (a failed one is undone instead).
                tar = tarfile.open(fileobj=f, mode="a" if old_size else "w")  # noqa: SIM115
            except tarfile.TarError as exc:
                raise StoreError(
                    f"the lost+found file is not a tar archive ({exc}); move it away",
                    filename=path,
                ) from exc
            start = tar.offset
            try:
                yield tar
                tar.close()
                os.fsync(fd)
                if created:
                    _fsync_directory(path)
            except BaseException as exc:
                self._undo(fd, created, start, old_size)
                if isinstance(exc, OSError | QedError):
                    raise self._error("cannot save leaked clusters", exc) from exc
                raise

    def _undo(self, fd: int, created: bool, start: int, old: int) -> None:
        """Put the archive back as it was: a new one removed; an old one cut back to
        where this run began, then padded with zeros to its old length (the bytes
        there were the end-of-archive blocks, zeros)."""
        if created:
            with contextlib.suppress(OSError):
                os.unlink(self.filename)
            return
        try:
            os.ftruncate(fd, start)
            os.ftruncate(fd, old)
            os.fsync(fd)
        except OSError:
            pass  # the saved error is the one to report


def _new_run_name(tar: tarfile.TarFile, now: float) -> str:
    """The run's directory: the UTC time, with ``-2``, ``-3`` ... if the archive has it."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    taken = {name.split("/", 1)[0] for name in tar.getnames()}
    run, n = base, 1
    while run in taken:
        n += 1
        run = f"{base}-{n}"
    return run


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _fsync_directory(path: str) -> None:
    """Make a new file's directory entry durable (a crash must not lose the file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno_codes.EINVAL, errno_codes.EROFS):
            raise
    finally:
        os.close(fd)
