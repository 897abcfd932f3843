"""Convert an image (and its backing chain, flattened) into a new image.

Theory of operation: the source's chain map says which guest ranges can hold
anything but zeros; only those are read, in chunks of up to CHUNK bytes into one
page-aligned buffer (see machine notes: unaligned buffers copy 5x slower). Each
chunk is cut at the target's granularity (a QED target's cluster, 64 KiB for raw);
pieces that are all zeros are skipped and runs of non-zero pieces are written with
one call each. The target starts out reading zeros everywhere (a new QED image, or a
raw file truncated to size), so skipping is exact: holes and zero runs in the
source cost no space and no writes in the target.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.base import BlockImage
from ..engine.chain import create_image, open_image
from ..engine.mapping import map_chain
from ..engine.sync import close_thread_loop, run
from ..format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE

# Bytes per read. 2 MiB measured fastest here: 4 MiB chunks cost 50% more system time
# in the page-cache writes (1.2 s vs 0.75 s for 1.4 GB); 1 MiB adds per-call costs.
CHUNK = 2 * 1024 * 1024
# Buffers in flight: the reader runs up to BUFFERS - 1 chunks ahead of the writer so
# that neither waits for the other when their speeds vary from chunk to chunk.
BUFFERS = 4
RAW_GRANULARITY = 64 * 1024  # zero detection unit for raw targets

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True, slots=True)
class ConvertStats:
    virtual_size: int
    bytes_read: int
    bytes_written: int


def _zero_runs(buf: mmap.mmap, length: int, unit: int, zeros: bytes) -> list[tuple[int, int]]:
    """Runs (start, end) of ``buf[:length]`` that are *not* all zeros, in ``unit`` steps."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        end = min(pos + unit, length)
        # find() of an all-zero needle over exactly its own length is a memcmp
        # (30 GB/s here; memoryview == bytes is 100x slower).
        if buf.find(zeros[: end - pos], pos, end) == pos:
            pos = end
            continue
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((pos, end))
        pos = end
    return runs


def _buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer, backed by huge pages where the kernel allows: copies
    between the page cache and huge pages take half the system time (measured:
    0.47 s vs 0.90 s for 1.4 GB of 2 MiB pwritev)."""
    buf = mmap.mmap(-1, size)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return buf


def _write_runs(dst: BlockImage, view: memoryview, pos: int, runs: list[tuple[int, int]]) -> int:
    """Worker thread: write the non-zero runs of one chunk; returns bytes written."""
    written = 0
    for start, end in runs:
        run(dst.write(pos + start, view[start:end]))
        written += end - start
    return written


def copy_image(
    src: BlockImage, dst: BlockImage, *, progress: Progress | None = None
) -> ConvertStats:
    """Copy every guest byte of ``src`` that may be non-zero into ``dst`` (which must
    read zeros everywhere and be at least as large).

    A blocking call built from threads, not a coroutine: chunks rotate through
    BUFFERS buffers, this thread reads and scans them while a worker thread writes
    the previous ones (the syscalls release the GIL), and the two hand buffers over
    through plain futures, which costs far less per chunk than an event loop
    round trip. Each image is used by one thread only: ``src`` by the caller's,
    ``dst`` by the worker until the copy ends. From asyncio code, run it with
    ``asyncio.to_thread``.
    """
    unit = max(dst.cluster_size or RAW_GRANULARITY, 4096)
    zeros = bytes(unit)
    total = src.size
    done = read = written = 0
    bufs = [_buffer(CHUNK) for _ in range(BUFFERS)]
    views = [memoryview(b) for b in bufs]
    pending: list[concurrent.futures.Future[int] | None] = [None] * BUFFERS
    turn = 0
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qed-convert")
    try:
        for entry in run(map_chain(src)):
            if entry.zero or not entry.present:
                done += entry.length
                if progress:
                    progress(done, total)
                continue
            pos = entry.start
            while pos < entry.end:
                n = min(CHUNK, entry.end - pos)
                # Cut chunks at unit boundaries so pieces map to whole target clusters.
                if pos + n < entry.end and (pos + n) % unit:
                    n -= (pos + n) % unit
                previous = pending[turn]
                if previous is not None:
                    pending[turn] = None
                    written += previous.result()
                run(src.readinto(pos, views[turn][:n]))
                read += n
                runs = _zero_runs(bufs[turn], n, unit, zeros)
                if runs:
                    pending[turn] = pool.submit(_write_runs, dst, views[turn], pos, runs)
                turn = (turn + 1) % BUFFERS
                pos += n
                done += n
                if progress:
                    progress(done, total)
        for i in range(BUFFERS):  # oldest first
            fut = pending[(turn + i) % BUFFERS]
            pending[(turn + i) % BUFFERS] = None
            if fut is not None:
                written += fut.result()
    finally:
        for fut in pending:
            if fut is not None:
                fut.cancel()
        pool.submit(close_thread_loop)
        pool.shutdown(wait=True)
        for view, buf in zip(views, bufs, strict=True):
            # After a failed write, the traceback may still hold slices of a buffer:
            # then the garbage collector unmaps it later.
            with contextlib.suppress(BufferError):
                view.release()
                buf.close()
    return ConvertStats(total, read, written)


def convert(
    src_path: str,
    dst_path: str,
    *,
    src_format: str | None = None,
    dst_format: str = "qed",
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
    flush: bool = False,
    force_share: bool = False,
    copy_on_read: bool = False,
    progress: Progress | None = None,
) -> ConvertStats:
    """Convert ``src_path`` (with its backing chain) to a new image at ``dst_path``.

    ``flush=False`` is qemu-img convert's default cache mode ("unsafe"): the target
    is written through the page cache and not synced; ``flush=True`` syncs it before
    returning. The target is created (or overwritten) only after the source opened.
    ``copy_on_read`` opens the source read-write with copy-on-read: the clusters the
    copy reads from its backing chain are copied into it as well. Blocking (see
    copy_image).
    """
    src = run(
        open_image(
            src_path,
            fmt=src_format,
            readonly=not copy_on_read,
            force_share=force_share,
            copy_on_read=copy_on_read,
        )
    )
    try:
        run(
            create_image(
                dst_path,
                src.size,
                fmt=dst_format,
                cluster_size=cluster_size,
                table_size=table_size,
            )
        )
        dst = run(open_image(dst_path, fmt=dst_format, unsafe_no_flush=not flush))
        try:
            return copy_image(src, dst, progress=progress)
        finally:
            run(dst.close())
    finally:
        run(src.close())
