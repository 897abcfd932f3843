"""Change a QED image's options in place: cluster size, table size, backing format.

References: qemu-img(1) "amend" (QEMU cannot amend QED images at all); qed_spec
"Header", "Tables".

Theory of operation
-------------------
A new cluster size or table size means new tables (and, for a larger cluster size,
new data clusters). Every crash state must be the old image or the new one, so the
new image is built where the old one does not look, and one sector write switches:

1. **plan** (reads only): the new entry of every new guest cluster, from the old
   entries it covers. Where the data may stay where it is, it does: with the same
   cluster size the entries are copied; with a smaller one each old data cluster
   is a run of new ones (its offset stays aligned); with a larger one, old clusters
   that are host-contiguous from an offset aligned to the new size (and past the
   new header) become one new cluster in place. Only the rest is copied: a new
   cluster holding data gets the guest view of its range (zeros for zero clusters,
   the backing file for unallocated parts), one whose old clusters are all zero
   clusters (or, without a backing file, zero and unallocated) becomes a zero
   cluster, and an all-unallocated one stays unallocated.
2. **build**: the new L1 table right after the new header (whatever of the old
   image lay there was moved away first, with the old geometry's crash-safe moves),
   and past the end of the file (space reserved with ``alloc.at_end``, aligned to
   both cluster sizes) the new L2 tables (L1 order), then the copied data; flushed.
   Nothing in the old image points at any of it.
3. **switch**: the new 64-byte header (new geometry, the new L1's offset, the same
   size, features and backing name) in one sector write, flushed
   (QedImage.switch_header). The old tables and the data that moved are leaks now.
4. **tidy**, on the image reopened with the new geometry: Mover.compact moves the
   tables and data from the end into the free slots and truncates.

A crash before step 3 leaves the old image and leaked space past its end (which a
later compaction or ``qed check -r leaks`` reclaims); from step 3 on, the new image,
every later step being crash-safe on its own.

``backing_fmt=raw`` sets BACKING_FORMAT_NO_PROBE (the backing file is raw, never
probed), any other format clears it: one header write (QedImage.set_backing_file).

Failure guarantee: an error before the switch leaves the old image (and possibly
leaked space at the end of the file); after it, the new image.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..engine.qed import Mover, Planned, QedImage
from ..errors import InvalidRequestError
from ..format.geometry import Geometry
from ..format.header import HEADER_SIZE_BYTES, Feature, Header
from ..format.tables import L2_ZERO_CLUSTER, new_table, pack_table

Checkpoint = Callable[[int, int], Awaitable[None]]  # (steps done, steps total)


@dataclass
class AmendStats:
    old_cluster_size: int = 0
    old_table_size: int = 0
    cluster_size: int = 0
    table_size: int = 0
    clusters_kept: int = 0  # new data clusters whose data stayed where it was
    clusters_copied: int = 0
    tables_written: int = 0
    truncated_bytes: int = 0
    backing_format: str | None = None
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Copy:
    """A new guest cluster whose data is written anew (its guest view)."""

    guest: int


async def amend(
    img: QedImage,
    *,
    cluster_size: int | None = None,
    table_size: int | None = None,
    backing_format: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> tuple[QedImage, AmendStats]:
    """Amend ``img`` (open read-write); returns the image to use from now on (a new
    object on the same store when the geometry changed) and what was done."""
    started = time.monotonic()
    stats = AmendStats(
        old_cluster_size=img.geo.cluster_size,
        old_table_size=img.geo.table_size,
        cluster_size=cluster_size or img.geo.cluster_size,
        table_size=table_size or img.geo.table_size,
    )
    if backing_format is not None:
        if img.backing_filename is None:
            raise InvalidRequestError(
                "backing_fmt needs a backing file (the image has none)", filename=img.filename
            )
        await img.set_backing_file(img.backing_filename, raw=backing_format == "raw")
        stats.backing_format = backing_format
        stats.steps.append("backing format")
    if (stats.cluster_size, stats.table_size) != (img.geo.cluster_size, img.geo.table_size):
        img = await _regeometry(img, stats, checkpoint)
    stats.seconds = time.monotonic() - started
    return img, stats


async def _regeometry(img: QedImage, stats: AmendStats, checkpoint: Checkpoint | None) -> QedImage:
    cs2, ts2 = stats.cluster_size, stats.table_size
    name = img.backing_filename
    QedImage.validate_create_options(img.size, cs2, ts2, name)
    if img.header.has_backing_file and (
        img.header.backing_filename_offset + img.header.backing_filename_size > cs2
    ):
        raise InvalidRequestError(
            f"the backing file name does not fit in a header cluster of {cs2} bytes",
            filename=img.filename,
        )
    await img.flush()  # NEED_CHECK clear: the metadata on disk is complete
    if img.header.needs_check:
        raise InvalidRequestError("the image is in use (NEED_CHECK set)", filename=img.filename)
    new_geo = Geometry(cs2, ts2)
    # The new L1 goes right after the new header: its bytes must hold nothing of
    # the old image first.
    await _clear(img, new_geo.header_bytes, new_geo.header_bytes + new_geo.table_bytes)
    stats.steps.append("cleared")
    async with img.allocations_paused():
        entries, copies, kept = await _plan(img, new_geo)
        stats.clusters_kept = kept
        header = await _build(img, new_geo, entries, copies, stats, checkpoint)
    store, backing = await img.switch_header(header)
    header, area = await QedImage.read_header(store)
    new = await QedImage.open(
        store, header, area, backing=backing, readonly=False, filename=img.filename
    )
    stats.steps.append("switched")
    await new.ensure_cluster_map()
    compacted = await Mover(new).compact()
    stats.truncated_bytes = compacted.truncated_bytes
    stats.steps.append("compacted")
    return new


async def _clear(img: QedImage, start: int, end: int) -> None:
    """Move whatever of the old image lies in bytes ``[start, end)`` (the L1, L2
    tables, data clusters) past ``end``, with the old geometry's crash-safe moves
    (Mover: copy, flush, repoint, flush)."""
    cmap = await img.ensure_cluster_map()
    bits = img.geo.cluster_bits
    ts = img.geo.table_size
    mover = Mover(img, spill=end)
    first, last = start >> bits, -(-end >> bits)
    l1 = img.tables.l1_table_offset >> bits
    if l1 < last and first < l1 + ts:
        await mover.move_l1(mover.free_run(end, ts))
    for l1_index, offset in enumerate(img.l1_table):
        at = offset >> bits
        if offset and at < last and first < at + ts:
            await mover.move_table(l1_index, mover.free_run(end, ts))
    plan = [
        Planned(owner, i << bits, None)
        for i in range(first, min(last, len(cmap.owner)))
        if (owner := cmap.get(i)) >= 0
    ]
    if plan:
        moved = await mover.move_data(plan)
        if len(moved) != len(plan):  # pragma: no cover - offline: nothing changes meanwhile
            raise InvalidRequestError("the image changed during the amend", filename=img.filename)


async def _old_entries(img: QedImage) -> dict[int, int]:
    """Old guest cluster -> L2 entry, for every entry other than 0."""
    out: dict[int, int] = {}
    per = img.geo.l2_entries
    for l1_index, offset in enumerate(img.l1_table):
        if not offset:
            continue
        table = await img.get_l2(l1_index)
        assert table is not None
        base = l1_index * per
        for index, entry in enumerate(table):
            if entry:
                out[base + index] = entry
    return out


async def _plan(img: QedImage, geo: Geometry) -> tuple[dict[int, int], list[_Copy], int]:
    """New guest cluster -> entry (data entries of kept clusters, 1 for zero
    clusters; the copies get theirs when the build is laid out), the copies, and
    how many data clusters were kept in place."""
    old = await _old_entries(img)
    cs1, cs2 = img.geo.cluster_size, geo.cluster_size
    new_clusters = geo.bytes_to_clusters(img.size)
    entries: dict[int, int] = {}
    copies: list[_Copy] = []
    kept = 0
    has_backing = img.header.has_backing_file
    if cs2 <= cs1:
        m = cs1 // cs2
        for i, entry in sorted(old.items()):
            for t in range(m):
                j = i * m + t
                if j >= new_clusters:
                    break
                if entry == L2_ZERO_CLUSTER:
                    entries[j] = L2_ZERO_CLUSTER
                elif entry > L2_ZERO_CLUSTER:
                    entries[j] = entry + t * cs2  # stays aligned, past the header
                    kept += 1
        return entries, copies, kept
    k = cs2 // cs1
    for j in sorted({i // k for i in old}):
        if j >= new_clusters:
            continue
        covered = [old.get(i, 0) for i in range(j * k, (j + 1) * k)]
        if all(e <= L2_ZERO_CLUSTER for e in covered):
            if all(e == L2_ZERO_CLUSTER for e in covered) or not has_backing:
                entries[j] = L2_ZERO_CLUSTER
            else:
                copies.append(_Copy(j))
            continue
        first = covered[0]
        if (
            first > L2_ZERO_CLUSTER
            and first % cs2 == 0
            and first >= geo.header_bytes
            and all(e == first + t * cs1 for t, e in enumerate(covered))
        ):
            entries[j] = first
            kept += 1
        else:
            copies.append(_Copy(j))
    return entries, copies, kept


async def _build(
    img: QedImage,
    geo: Geometry,
    entries: dict[int, int],
    copies: list[_Copy],
    stats: AmendStats,
    checkpoint: Checkpoint | None,
) -> Header:
    """Write the new image's copies, L2 tables and L1 past the end of the file and
    flush; returns its header. Caller holds the allocation lock."""
    cs1, cs2 = img.geo.cluster_size, geo.cluster_size
    align = max(cs1, cs2)
    per = geo.l2_entries
    tables_used = sorted({j // per for j in entries} | {c.guest // per for c in copies})
    stats.tables_written = len(tables_used)
    total = (geo.table_size * len(tables_used) + len(copies)) * cs2
    l1_offset = geo.header_bytes  # cleared of the old image by _clear
    low = max(img.alloc.file_end, l1_offset + geo.table_bytes)
    start = -(-low // align) * align
    reserve = -(-(start + total - img.alloc.file_end) // cs1)  # old-geometry clusters
    at = img.alloc.at_end(max(reserve, 0))
    end = at + max(reserve, 0) * cs1
    assert end >= start + total
    await img.store.truncate(end)  # whole clusters of both sizes: zeros until written
    table_offsets = {
        l1_index: start + n * geo.table_bytes for n, l1_index in enumerate(tables_used)
    }
    data_at = start + len(tables_used) * geo.table_bytes
    steps = len(copies) + len(tables_used) + 1
    done = 0
    for n, copy in enumerate(copies):
        offset = data_at + n * cs2
        pos = copy.guest * cs2
        length = min(cs2, img.size - pos)
        data = await img.read(pos, length)
        await img.store.write(offset, data + bytes(cs2 - length))
        entries[copy.guest] = offset
        done += 1
        if checkpoint:
            await checkpoint(done, steps)
    stats.clusters_copied = len(copies)
    l1 = new_table(per)
    for l1_index in tables_used:
        table = new_table(per)
        base = l1_index * per
        for index in range(per):
            entry = entries.get(base + index, 0)
            if entry:
                table[index] = entry
        await img.store.write(table_offsets[l1_index], pack_table(table))
        l1[l1_index] = table_offsets[l1_index]
        done += 1
        if checkpoint:
            await checkpoint(done, steps)
    await img.store.write(l1_offset, pack_table(array("Q", l1)))
    await img.store.flush()
    old = img.header
    header = Header(
        cluster_size=cs2,
        table_size=geo.table_size,
        header_size=1,
        features=old.features & ~Feature.NEED_CHECK,
        compat_features=old.compat_features,
        autoclear_features=old.autoclear_features,
        l1_table_offset=l1_offset,
        image_size=old.image_size,
        backing_filename_offset=old.backing_filename_offset,
        backing_filename_size=old.backing_filename_size,
    )
    assert cs2 >= HEADER_SIZE_BYTES
    if checkpoint:
        await checkpoint(steps, steps)
    return header
