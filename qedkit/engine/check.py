"""Consistency check and repair of a QED image.

References: QEMU block/qed-check.c; qemu-img check's report and exit codes.

QED has no reference counts, so the only way to find allocation problems is to
scan every table. The scan marks each cluster the L1 table, the L2 tables and the
data clusters use; a cluster marked twice is a corruption (a duplicate reference),
an offset that fails the validity tests is a corruption, and an unmarked cluster
between the header and the end of the file is a leak.

Counting follows QEMU exactly, so reports are comparable with ``qemu-img check``:

* allocated / fragmented clusters count every L2 entry other than 0 and 1, before
  validity; an entry is fragmented when it does not follow the previous allocated
  entry of the same table by one cluster;
* an L2 table whose clusters were already marked is counted and not scanned;
* leaks are counted only when every table could be read;
* total clusters = ceil(image_size / cluster_size).

Differences from QEMU, on purpose: the cluster count uses the correct division
(QEMU divides by cluster_size - 1 and reports phantom leaks on files larger than
about (cluster_size - 1) clusters), and ``RepairMode.LEAKS`` does not touch
corruptions (QEMU's ``-r leaks`` repairs them too).

Repair (``RepairMode.ALL``) first gives every cluster referenced twice a single
owner (later references get copies), then zeroes invalid L1 and L2 entries, writing
each fixed table whole, then clears NEED_CHECK if no corruption and no read error
remains. Duplicates go first so that clearing the "entries" of a cluster that is
both a table and someone's data never zeroes that data.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from ..errors import QedError
from ..format.tables import L2_ZERO_CLUSTER, pack_table, unpack_table
from .qed import QedImage


class RepairMode(enum.Enum):
    LEAKS = "leaks"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding, for humans: what and where."""

    kind: str  # "corruption", "leak", "check-error"
    offset: int
    message: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    filename: str
    format: str
    total_clusters: int
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    corruptions: int = 0
    corruptions_fixed: int = 0
    leaks: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    problems: tuple[Problem, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 incomplete, 2 corruptions remain, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _Scan:
    def __init__(self, img: QedImage, file_end: int, fix: bool) -> None:
        self.img = img
        self.geo = img.geo
        self.file_end = file_end
        self.fix = fix
        self.used = bytearray(file_end >> self.geo.cluster_bits)
        # Clusters some L2 entry points at, counting the tables the scan skips.
        self.data = bytearray(len(self.used))
        self.allocated = 0
        self.fragmented = 0
        self.corruptions = 0
        self.fixed = 0
        self.check_errors = 0
        self.problems: list[Problem] = []

    def note(self, kind: str, offset: int, message: str) -> None:
        self.problems.append(Problem(kind, offset, message))

    def mark(self, offset: int, count: int, what: str) -> int:
        """Mark ``count`` clusters from ``offset`` used; returns how many were already."""
        first = offset >> self.geo.cluster_bits
        dups = 0
        for index in range(first, first + count):
            if self.used[index]:
                dups += 1
                self.note(
                    "corruption",
                    index << self.geo.cluster_bits,
                    f"cluster at {index << self.geo.cluster_bits:#x} is referenced again by {what}",
                )
            self.used[index] = 1
        self.corruptions += dups
        return dups

    def invalid(self, where: int, message: str) -> None:
        if self.fix:
            self.fixed += 1
            self.note("corruption", where, message + " (repaired: entry cleared)")
        else:
            self.corruptions += 1
            self.note("corruption", where, message)


Checkpoint = Callable[[int, int], Awaitable[None]]


async def _scan(
    img: QedImage,
    fix: bool,
    checkpoint: Checkpoint | None = None,
    strict: bool = False,
    data_refs: bytearray | None = None,
) -> _Scan:
    """One pass over every table, counting as QEMU counts; with ``fix``, invalid
    entries are cleared (each fixed table rewritten whole, then the L1), except in a
    table that ``data_refs`` (an earlier scan's ``data``) says is also someone's data:
    rewriting it would change that data, so _repair_duplicates clears those.
    ``checkpoint(l1_index, l1_entries)`` is awaited before each L2 table. ``strict``:
    a table that cannot be read or written raises instead of counting as an error."""
    geo = img.geo
    header = img.header
    file_size = await img.store.size()
    file_end = max(img.file_end, file_size - file_size % geo.cluster_size)
    scan = _Scan(img, file_end, fix)
    l1 = img.l1_table
    l1_fixed = False

    def also_data(offset: int) -> bool:
        if data_refs is None:
            return False
        first = offset >> geo.cluster_bits
        return any(data_refs[first : first + geo.table_size])

    l1_also_data = fix and also_data(header.l1_table_offset)
    scan.mark(header.l1_table_offset, geo.table_size, "the L1 table")
    for l1_index in range(len(l1)):
        l2_offset = l1[l1_index]
        if l2_offset == 0:
            continue
        if checkpoint is not None:
            await checkpoint(l1_index, len(l1))
        where = header.l1_table_offset + 8 * l1_index
        if not geo.is_valid_table_offset(l2_offset, file_end):
            if l1_also_data:
                continue  # not rewritten in place
            scan.invalid(
                where, f"L1 entry {l1_index} at {where}: invalid L2 table offset {l2_offset:#x}"
            )
            if fix:
                l1[l1_index] = 0
                l1_fixed = True
            continue
        if scan.mark(l2_offset, geo.table_size, f"the L2 table of L1 entry {l1_index}"):
            if not fix:  # not counted (as QEMU), but its data references are noted
                await _note_data(scan, l2_offset, strict)
            continue
        try:
            table = unpack_table(await img.store.read_exact(l2_offset, geo.table_bytes, "L2 table"))
        except QedError as exc:
            if strict:
                raise
            scan.check_errors += 1
            scan.note("check-error", l2_offset, f"cannot read L2 table at {l2_offset:#x}: {exc}")
            continue
        if fix and also_data(l2_offset):
            continue  # not rewritten in place
        if _check_l2(scan, table, l2_offset) and fix:
            try:
                await img.store.write(l2_offset, pack_table(table))
            except QedError as exc:
                if strict:
                    raise
                scan.check_errors += 1
                scan.note(
                    "check-error", l2_offset, f"cannot write L2 table at {l2_offset:#x}: {exc}"
                )
                continue
            img.cache.forget(l2_offset)
    if l1_fixed:
        try:
            await img.store.write(header.l1_table_offset, pack_table(l1))
        except QedError as exc:
            if strict:
                raise
            scan.check_errors += 1
            scan.note("check-error", header.l1_table_offset, f"cannot write the L1 table: {exc}")
    return scan


async def _note_data(scan: _Scan, l2_offset: int, strict: bool) -> None:
    """Note the data references of a table the scan does not count (``strict``: a
    read error raises; otherwise the table's other reference shows it)."""
    geo = scan.geo
    try:
        table = unpack_table(
            await scan.img.store.read_exact(l2_offset, geo.table_bytes, "L2 table")
        )
    except QedError:
        if strict:
            raise
        return
    for entry in table:
        if geo.is_valid_cluster_offset(entry, scan.file_end):
            scan.data[entry >> geo.cluster_bits] = 1


def _leaked(scan: _Scan) -> list[int]:
    """Indexes of unreferenced clusters between the header and the end of the file."""
    used = scan.used
    return [i for i in range(scan.geo.header_size, len(used)) if not used[i]]


async def check_image(
    img: QedImage,
    repair: RepairMode | None = None,
    *,
    checkpoint: Checkpoint | None = None,
    strict: bool = False,
) -> CheckReport:
    """Scan ``img`` and, with ``repair``, fix what can be fixed. Never raises for
    problems it finds; raises QedError only if the image cannot be read at all.

    Repairs (see docs/DESIGN.md, "Check and repair"):

    * ``ALL``: clear invalid L1/L2 entries (those of a table that is also someone's
      data only once that data has its own copy); give every duplicate reference its
      own copy of the cluster it pointed to (so each keeps the bytes it had); reclaim
      leaks as below; clear NEED_CHECK when no corruption remains.
    * ``LEAKS``: truncate leaked clusters at the end of the file (counted as
      leaks-fixed) and punch holes in the others (they keep being counted as leaks,
      by any QED checker, since the file still spans them). Leaks are reclaimed only
      when the scan found no corruption at all, fixed or not: next to a corruption,
      a leaked cluster may hold the data a damaged entry lost.

    The report gives the counts found by the first pass and what was repaired;
    ``check_and_repair`` adds the second pass qemu-img makes. ``strict`` makes a
    store error raise (StoreError) instead of being counted in check_errors: the
    open-time repair must not go on with an image it could not check.
    """
    writable = repair is not None and not img.readonly
    fix = repair is RepairMode.ALL and writable
    scan = await _scan(img, False, checkpoint, strict)
    corruptions = scan.corruptions
    fixed = 0
    leaks = _leaked(scan) if not scan.check_errors else []
    leak_count = len(leaks)
    leaks_fixed = 0
    if writable and not scan.check_errors:
        async with img.allocations_paused():
            if fix and corruptions:
                # Invalid entries are cleared (durably) before the duplicate repair
                # grows the file: judged against a longer file, an entry just past
                # the old end would become a valid reference to a new copy. Tables
                # that are also data are left to the duplicate repair, which clears
                # their invalid entries once the data has its own copy.
                fixed += (await _scan(img, True, strict=strict, data_refs=scan.data)).fixed
                await img.store.flush()
                fixed += await _repair_duplicates(img, scan.file_end)
                after = await _scan(img, False, strict=strict)
                corruptions = after.corruptions
                leaks = _leaked(after) if not after.check_errors else []
            if not scan.corruptions:
                # Only on an image without damage: next to a corruption, a leaked
                # cluster may be the lost target of a damaged entry; it stays until
                # a later check finds the image otherwise clean.
                leaks_fixed = await _reclaim_leaks(img, leaks)
            if fix and not corruptions:
                await img.mark_clean()
    for index in leaks if scan.check_errors == 0 else []:
        scan.note(
            "leak",
            index << img.geo.cluster_bits,
            f"cluster at {index << img.geo.cluster_bits:#x} is not referenced",
        )
    return CheckReport(
        filename=img.filename,
        format="qed",
        total_clusters=img.geo.bytes_to_clusters(img.header.image_size),
        allocated_clusters=scan.allocated,
        fragmented_clusters=scan.fragmented,
        corruptions=corruptions if fix else scan.corruptions,
        corruptions_fixed=fixed,
        leaks=leak_count,
        leaks_fixed=leaks_fixed,
        check_errors=scan.check_errors,
        problems=tuple(scan.problems),
    )


async def _repair_duplicates(img: QedImage, file_end: int) -> int:
    """Give every cluster one owner; returns how many references were moved or cleared.

    Metadata owns its clusters first: the L1 table, then each L2 table in L1 order
    (a table overlapping an earlier one, or the L1, is moved to new clusters). Then
    data: in L1 and L2 order, the first reference keeps a cluster and every later one
    (including one pointing into a table) gets a new cluster holding a copy of the
    bytes it pointed to, read before anything is rewritten. Invalid entries left
    (judged against ``file_end``, the file before this repair grew it) are cleared
    in the same rewrite. Order on disk: copies, flush, rewritten L2 tables, flush,
    L1, flush. Caller holds the allocation lock.
    """
    geo = img.geo
    bits = geo.cluster_bits
    ts = geo.table_size
    store = img.store
    l1 = img.l1_table
    owned = bytearray(max(file_end, img.file_end) >> bits)

    def claim(offset: int, count: int) -> bool:
        first = offset >> bits
        if any(owned[first : first + count]):
            return False
        owned[first : first + count] = b"\x01" * count
        return True

    claim(img.header.l1_table_offset, ts)
    moved = 0
    tables: dict[int, tuple[int, array[int]]] = {}  # l1 index -> (offset to write, table)
    rewrite: set[int] = set()
    l1_changed = False
    for l1_index, l2_offset in enumerate(l1):
        if not geo.is_valid_table_offset(l2_offset, file_end):
            if l2_offset:  # invalid, left by the scan because the L1 is also data
                l1[l1_index] = 0
                l1_changed = True
                moved += 1
            continue
        table = unpack_table(await store.read_exact(l2_offset, geo.table_bytes, "L2 table"))
        if not claim(l2_offset, ts):
            l2_offset = img.alloc.at_end(ts)  # beyond the old end: owned by construction
            moved += 1
            rewrite.add(l1_index)
        tables[l1_index] = (l2_offset, table)
    copies: list[tuple[int, int]] = []  # (from, to)
    for l1_index, (_, table) in tables.items():
        for index, entry in enumerate(table):
            if entry <= L2_ZERO_CLUSTER:
                continue
            if not geo.is_valid_cluster_offset(entry, file_end):
                table[index] = 0
                moved += 1
                rewrite.add(l1_index)
                continue
            if claim(entry, 1):
                continue  # the first owner
            new = img.alloc.at_end(1)
            copies.append((entry, new))
            table[index] = new
            moved += 1
            rewrite.add(l1_index)
    for src, dst in copies:
        await store.write(dst, await store.read_exact(src, geo.cluster_size, "data cluster"))
    await store.flush()
    for l1_index in sorted(rewrite):
        l2_offset, table = tables[l1_index]
        await store.write(l2_offset, pack_table(table))
    await store.flush()
    for l1_index in rewrite:
        if l1[l1_index] != tables[l1_index][0]:
            l1[l1_index] = tables[l1_index][0]
            l1_changed = True
    if l1_changed:
        await store.write(img.header.l1_table_offset, pack_table(l1))
        await store.flush()
    img.cache.clear()
    return moved


async def _reclaim_leaks(img: QedImage, leaks: list[int]) -> int:
    """Truncate the trailing run of leaked clusters (returns how many) and punch holes
    in the leaked clusters before it. Caller holds the allocation lock."""
    if not leaks:
        return 0
    bits = img.geo.cluster_bits
    end = img.file_end >> bits
    trailing = 0
    while trailing < len(leaks) and leaks[-1 - trailing] == end - 1 - trailing:
        trailing += 1
    inner = leaks[: len(leaks) - trailing]
    if img.store.capabilities.punch_holes:
        start = prev = -2
        for index in [*inner, -1]:
            if index != prev + 1:
                if start >= 0:
                    await img.store.discard(start << bits, (prev - start + 1) << bits)
                start = index
            prev = index
    if trailing:
        new_end = (end - trailing) << bits
        await img.store.flush()
        await img.store.truncate(new_end)
        await img.store.flush()
        img.alloc.truncated(new_end)
    return trailing


def _check_l2(scan: _Scan, table: array[int], l2_offset: int) -> bool:
    """Scan one L2 table; returns True if an entry was cleared (fix mode)."""
    geo = scan.geo
    cs = geo.cluster_size
    file_end = scan.file_end
    header_bytes = geo.header_bytes
    last = 0
    changed = False
    for index, entry in enumerate(table):
        if entry <= L2_ZERO_CLUSTER:
            continue
        scan.allocated += 1
        if last and last + cs != entry:
            scan.fragmented += 1
        last = entry
        if entry % cs or entry < header_bytes or entry >= file_end:
            where = l2_offset + 8 * index
            scan.invalid(where, f"L2 entry {index} at {where}: invalid cluster offset {entry:#x}")
            if scan.fix:
                table[index] = 0
                changed = True
            continue
        scan.mark(entry, 1, f"L2 entry {index} of the table at {l2_offset:#x}")
        scan.data[entry >> geo.cluster_bits] = 1
    return changed


async def check_and_repair(img: QedImage, repair: RepairMode | None) -> CheckReport:
    """``qemu-img check [-r]``'s flow: check (repairing if asked); if anything was
    repaired, check again and report that second result with the repair counts."""
    first = await check_image(img, repair)
    if repair is None or not (first.corruptions_fixed or first.leaks_fixed):
        return first
    second = await check_image(img, None)
    return replace(
        second,
        corruptions_fixed=first.corruptions_fixed,
        leaks_fixed=first.leaks_fixed,
        problems=first.problems,
    )
