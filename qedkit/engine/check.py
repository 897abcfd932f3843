"""Consistency check and repair of a QED image.

References: QEMU block/qed-check.c; qemu-img check's report and exit codes;
e2fsck's lost+found.

QED has no reference counts, so the only way to find allocation problems is to
scan every table. The scan marks each cluster the L1 table, the L2 tables and the
data clusters use; a cluster marked twice is a corruption (a duplicate reference),
an offset that fails the validity tests is a corruption, and an unmarked cluster
between the header and the end of the file is a leak. The scan reads through a
narrow view (``ScanSource``: geometry, header, the end of the file, the L1 table and
a reader of L2 tables), never the image itself.

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

Repair (docs/DESIGN.md, "Check and repair", has the whole story):

1. corruptions (``RepairMode.ALL``): invalid entries are cleared and flushed, then
   every cluster referenced twice gets a single owner (later references get copies
   of the bytes they pointed to). Tables are written only through the tables API
   (engine.qed.tables), new clusters come only from the allocator.
2. leaks (``LEAKS`` on an image without corruption, ``ALL`` once the corruptions
   are repaired), as ``reclaim`` says:

   * ``Reclaim.COMPACT`` (``qed check -r``): if the scan found corruption, every
     leaked cluster holding data is first saved to a lost+found file
     (engine.lostfound) and nothing is reclaimed if that fails; then the clusters
     at the end of the file move into the leaked slots (engine.qed.move, the
     defragmenter's crash-safe mover) and the file is truncated: no leak remains.
     An image with the home allocation policy keeps its layout (its leaks are
     punched, the free tail truncated).
   * ``Reclaim.TAIL`` (the open-time repair: cheap, moves nothing): only on an
     image without corruption, the trailing run of leaks is truncated and the
     others are punched (they stay counted as leaks).

NEED_CHECK is cleared once no corruption and no read error remains.
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from itertools import compress
from operator import sub

from ..errors import CorruptImageError, QedError
from ..format.geometry import Geometry
from ..format.header import Header
from ..format.tables import L2_ZERO_CLUSTER, unpack_table
from .lostfound import LostFound, Orphan, SavedRun
from .qed import FREE, Mover, QedImage

# Leaked clusters listed one by one in a report's problems (the count is ``leaks``):
# an image with a million leaks would otherwise hold ~200 MB of messages.
LEAK_PROBLEMS = 1000
# Bytes of data moves one compaction round covers with one flush pair (as defrag's
# offline batches).
COMPACT_BATCH_BYTES = 64 << 20


class RepairMode(enum.Enum):
    LEAKS = "leaks"
    ALL = "all"


class Reclaim(enum.Enum):
    """How a repair reclaims leaked clusters (see the module docstring)."""

    COMPACT = "compact"  # qed check -r: lost+found if damaged, move, truncate
    TAIL = "tail"  # open-time repair: truncate the free tail, punch the rest


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
    # What was found, in scan order; leaks only the first LEAK_PROBLEMS.
    problems: tuple[Problem, ...] = field(default=())
    # What the repair saved before reclaiming leaked clusters (None: nothing).
    lost_found: SavedRun | None = None
    # Why leaks were kept, and other remarks of the repair, for humans.
    notes: tuple[str, ...] = ()

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


# =====================================================================================
# The scan
# =====================================================================================


@dataclass(frozen=True, slots=True)
class ScanSource:
    """What the scan reads: the narrow view of an image. ``file_end``: the file size
    rounded down to whole clusters (offsets at or past it are invalid);
    ``read_table(l2_offset)``: the bytes of an L2 table as on disk, bypassing any
    cache."""

    geo: Geometry
    header: Header
    file_end: int
    l1: array[int]
    read_table: Callable[[int], Awaitable[bytes]]


async def scan_source(img: QedImage) -> ScanSource:
    """The scan's view of ``img`` as it is now."""
    size = await img.store.size()
    file_end = max(img.file_end, size - size % img.geo.cluster_size)
    return ScanSource(img.geo, img.header, file_end, img.l1_table, img.tables.read_table_bytes)


@dataclass(frozen=True, slots=True)
class _Damage:
    """An invalid entry: at file offset ``where``, holding ``value``; ``table``: an L1
    entry (the value was an L2 table's offset); ``guest``: the first guest byte the
    entry maps."""

    where: int
    value: int
    table: bool
    guest: int


class _Scan:
    def __init__(self, source: ScanSource, *, exact: bool = True) -> None:
        self.source = source
        # The quick scan fills ``used`` only: ``data`` serves the repair of
        # corruptions, which only follows an exact scan (the quick one finds none).
        self.exact = exact
        self.geo = source.geo
        self.file_end = source.file_end
        self.used = bytearray(source.file_end >> self.geo.cluster_bits)
        # Clusters some L2 entry points at, counting the tables the scan skips.
        self.data = bytearray(len(self.used) if exact else 0)
        self.allocated = 0
        self.fragmented = 0
        self.corruptions = 0
        self.check_errors = 0
        self.problems: list[Problem] = []
        # Invalid entries, for the repair: L1 indexes, and entry indexes per L2 table
        # (only tables the scan read; a duplicate table is the duplicate repair's).
        self.invalid_l1: list[int] = []
        self.invalid_l2: dict[int, list[int]] = {}
        self.damaged: list[_Damage] = []

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

    def invalid(self, where: int, message: str, damage: _Damage) -> None:
        self.corruptions += 1
        self.note("corruption", where, message)
        self.damaged.append(damage)


Checkpoint = Callable[[int, int], Awaitable[None]]


async def _scan(
    source: ScanSource, checkpoint: Checkpoint | None = None, strict: bool = False
) -> _Scan:
    """One pass over every table, counting as QEMU counts and recording the invalid
    entries. ``checkpoint(l1_index, l1_entries)`` is awaited before each L2 table.
    ``strict``: a table that cannot be read raises instead of counting as an error.

    The quick scan (``_quick_scan``) answers for an image without any problem; the
    first sign of one sends the whole image through the exact scan (``_exact_scan``),
    which finds and words every problem."""
    scan = await _quick_scan(source, checkpoint, strict)
    if scan is None:
        scan = await _exact_scan(source, checkpoint, strict)
    return scan


def _linked(l1: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The L1 entries that link an L2 table: (L1 index, table offset)."""
    return ((i, offset) for i, offset in enumerate(l1) if offset)


async def _exact_scan(source: ScanSource, checkpoint: Checkpoint | None, strict: bool) -> _Scan:
    """The scan entry by entry: every invalid entry and every cluster referenced
    twice noted with where it is; the bitmap of data clusters (``data``) filled."""
    geo = source.geo
    header = source.header
    file_end = source.file_end
    scan = _Scan(source)
    l1 = source.l1
    span = geo.l2_entries * geo.cluster_size
    scan.mark(header.l1_table_offset, geo.table_size, "the L1 table")
    for l1_index, l2_offset in _linked(l1):
        if checkpoint is not None:
            await checkpoint(l1_index, len(l1))
        where = header.l1_table_offset + 8 * l1_index
        if not geo.is_valid_table_offset(l2_offset, file_end):
            scan.invalid(
                where,
                f"L1 entry {l1_index} at {where}: invalid L2 table offset {l2_offset:#x}",
                _Damage(where, l2_offset, True, l1_index * span),
            )
            scan.invalid_l1.append(l1_index)
            continue
        if scan.mark(l2_offset, geo.table_size, f"the L2 table of L1 entry {l1_index}"):
            # Not counted (as QEMU), but its data references are noted.
            await _note_data(scan, l2_offset, strict)
            continue
        try:
            table = unpack_table(await source.read_table(l2_offset))
        except QedError as exc:
            if strict:
                raise
            scan.check_errors += 1
            scan.note("check-error", l2_offset, f"cannot read L2 table at {l2_offset:#x}: {exc}")
            continue
        _check_l2(scan, table, l2_offset, l1_index * geo.l2_entries)
    return scan


async def _quick_scan(
    source: ScanSource, checkpoint: Checkpoint | None, strict: bool
) -> _Scan | None:
    """The scan of an image with no problem, with as little work per entry as Python
    allows (a 1 TiB image can have 16M entries): None at the first sign of a
    problem, for the exact scan to find and word it.

    Per table, one call of ``_mark_clusters`` marks its data clusters in ``used``
    and counts them: the compiled loop of qedkit/_speedups.c where it was built,
    else its pure-Python twin ``_mark_clusters_py``, which works in bulk (C loops
    over the table's bytes, no Python per entry): the non-zero entries picked out
    (``filter``), every entry checked cluster-aligned at once on the columns of its
    low bytes in the table's on-disk bytes (little-endian: ``raw[k::8]`` is byte k
    of every entry; all zero but the low byte of the zero-cluster entries), then per
    data entry only the mark; the fragmented count from the differences of
    neighbours (``map(sub)``). An entry past the end of the file fails at its mark.
    At the end the checks that need every mark: a cluster marked twice (fewer marks
    in ``used`` than were made), an entry in the header (a mark below
    ``header_size``). The counts are the exact scan's whenever this returns a scan.
    A table that cannot be read raises when ``strict`` (as the exact scan would: the
    caller must not go on as if a second read had not been needed), else hands over
    to the exact scan, which counts it as a check error."""
    geo = source.geo
    header = source.header
    bits = geo.cluster_bits
    ts = geo.table_size
    scan = _Scan(source, exact=False)
    used = scan.used
    l1 = source.l1
    zero_table = bytes(geo.table_bytes)
    marks = 0
    first = header.l1_table_offset >> bits
    if any(used[first : first + ts]):  # (a file too short for its L1 table)
        return None
    used[first : first + ts] = b"\x01" * ts
    marks += ts
    for l1_index, l2_offset in _linked(l1):
        if checkpoint is not None:
            await checkpoint(l1_index, len(l1))
        if not geo.is_valid_table_offset(l2_offset, source.file_end):
            return None
        first = l2_offset >> bits
        if any(used[first : first + ts]):
            return None  # a table over another or over the L1
        used[first : first + ts] = b"\x01" * ts
        marks += ts
        try:
            raw = await source.read_table(l2_offset)
        except QedError:
            if strict:
                raise
            return None
        if raw == zero_table:
            continue
        counts = _mark_clusters(raw, used, bits)
        if counts is None:
            return None  # misaligned, past the end of the file (or marked twice)
        scan.allocated += counts[0]
        scan.fragmented += counts[1]
        marks += counts[0]
    if used.count(1) != marks or used.find(1, 0, geo.header_size) >= 0:
        return None  # a cluster referenced twice, or an entry inside the header
    return scan


async def _note_data(scan: _Scan, l2_offset: int, strict: bool) -> None:
    """Note the data references of a table the scan does not count (``strict``: a
    read error raises; otherwise the table's other reference shows it)."""
    geo = scan.geo
    try:
        table = unpack_table(await scan.source.read_table(l2_offset))
    except QedError:
        if strict:
            raise
        return
    for entry in table:
        if geo.is_valid_cluster_offset(entry, scan.file_end):
            scan.data[entry >> geo.cluster_bits] = 1


def _check_l2(scan: _Scan, table: array[int], l2_offset: int, first_guest: int) -> None:
    """Scan one L2 table (``first_guest``: the guest cluster of its entry 0)."""
    geo = scan.geo
    cs = geo.cluster_size
    file_end = scan.file_end
    header_bytes = geo.header_bytes
    last = 0
    for index, entry in enumerate(table):
        if entry <= L2_ZERO_CLUSTER:
            continue
        scan.allocated += 1
        if last and last + cs != entry:
            scan.fragmented += 1
        last = entry
        if entry % cs or entry < header_bytes or entry >= file_end:
            where = l2_offset + 8 * index
            scan.invalid(
                where,
                f"L2 entry {index} at {where}: invalid cluster offset {entry:#x}",
                _Damage(where, entry, False, (first_guest + index) * cs),
            )
            scan.invalid_l2.setdefault(l2_offset, []).append(index)
            continue
        scan.mark(entry, 1, f"L2 entry {index} of the table at {l2_offset:#x}")
        scan.data[entry >> geo.cluster_bits] = 1


_BLOCK = 4096  # bytes of table entries tested for zeros at once (512 entries)
_ZERO_BLOCK = bytes(_BLOCK)
_DENSE_PROBE = 8  # leading blocks all in use: the table is dense, no skipping


_NATIVE_LE = sys.byteorder == "little"  # the table's bytes are its entries, as they are


def _nonzero(raw: bytes, table: array[int] | memoryview) -> list[int]:
    """The non-zero entries of a table, in order. Blocks of zero entries are skipped
    with one comparison each (``filter`` costs ~7 ns an entry, zero or not): a table
    of a guest file system's extents is mostly such blocks. A table whose first
    blocks are all in use is taken whole."""
    blocks = len(raw) // _BLOCK
    if blocks <= _DENSE_PROBE:
        return list(filter(None, table))
    for k in range(_DENSE_PROBE):
        if raw[k * _BLOCK : (k + 1) * _BLOCK] == _ZERO_BLOCK:
            break
    else:
        return list(filter(None, table))
    per = _BLOCK // 8
    out: list[int] = []
    for k in range(blocks):
        if raw[k * _BLOCK : (k + 1) * _BLOCK] != _ZERO_BLOCK:
            out += filter(None, table[k * per : (k + 1) * per])
    return out


def _mark_clusters_py(raw: bytes, used: bytearray, bits: int) -> tuple[int, int] | None:
    """The quick scan's work on one table's bytes ``raw``: mark its data clusters
    in ``used``; (allocated, fragmented) or None at a misaligned entry or one past
    the end of ``used``. The pure-Python twin of qedkit/_speedups.c's
    ``mark_clusters``, in bulk (``_quick_scan``'s docstring says how). One
    difference, which the scan's final count of marks makes harmless: a cluster
    marked twice is counted here, where the compiled loop returns None."""
    n = len(raw) // 8
    zero_column = bytes(n)
    entries = _nonzero(raw, memoryview(raw).cast("Q") if _NATIVE_LE else unpack_table(raw))
    zero_clusters = entries.count(L2_ZERO_CLUSTER)
    low = raw[0::8]  # (clusters are at least 4 KiB: 12 low bits)
    if low.count(1) != zero_clusters or low.count(0) != n - zero_clusters:
        return None  # low bits set in an entry other than 1
    full, part = divmod(bits, 8)
    for k in range(1, full):
        if raw[k::8] != zero_column:
            return None
    if part and raw[full::8].translate(_low_bits_mask(part)) != zero_column:
        return None
    if zero_clusters:
        entries = [entry for entry in entries if entry != L2_ZERO_CLUSTER]
    if not entries:
        return 0, 0
    try:
        for entry in entries:
            used[entry >> bits] = 1
    except IndexError:
        return None  # past the end of the file
    step = 1 << bits
    return len(entries), len(entries) - 1 - list(map(sub, entries[1:], entries)).count(step)


@cache
def _low_bits_mask(bits: int) -> bytes:
    """translate() table keeping the low ``bits`` of a byte."""
    return bytes(b & ((1 << bits) - 1) for b in range(256))


_MarkClusters = Callable[[bytes, bytearray, int], "tuple[int, int] | None"]
_mark_clusters: _MarkClusters
try:  # the compiled twin, built wherever a C compiler was at install
    from .._speedups import mark_clusters as _mark_clusters
except ImportError:  # pragma: no cover
    _mark_clusters = _mark_clusters_py


def _leaked(scan: _Scan) -> array[int]:
    """Indexes of unreferenced clusters between the header and the end of the file
    (an array: a million leaks are 8 MB, not the 36 MB of a list of ints)."""
    used = scan.used
    start = scan.geo.header_size
    if used.find(0, start) < 0:
        return array("q")
    free = used[start:].translate(_UNUSED)
    return array("q", compress(range(start, len(used)), free))


_UNUSED = bytes([1]) + bytes(255)  # translate: unmarked clusters become 1


# =====================================================================================
# Check and repair
# =====================================================================================


@dataclass
class _Repair:
    """What a repair did, gathered on the way."""

    fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    lost_found: SavedRun | None = None
    notes: list[str] = field(default_factory=list)
    compact: bool = False  # leaks to remove by moving clusters (after the lock)


async def check_image(
    img: QedImage,
    repair: RepairMode | None = None,
    *,
    checkpoint: Checkpoint | None = None,
    strict: bool = False,
    reclaim: Reclaim = Reclaim.COMPACT,
    lost_found: LostFound | None = None,
) -> CheckReport:
    """Scan ``img`` and, with ``repair``, fix what can be fixed. Never raises for
    problems it finds; raises QedError only if the image cannot be read at all.

    Repairs (see the module docstring and docs/DESIGN.md, "Check and repair"):

    * ``ALL``: clear invalid L1/L2 entries (those of a table that is also someone's
      data only once that data has its own copy); give every duplicate reference its
      own copy of the cluster it pointed to (so each keeps the bytes it had); then
      reclaim leaks; clear NEED_CHECK when no corruption remains.
    * ``LEAKS``: reclaim leaks, only on an image without corruption.

    Leaks are reclaimed as ``reclaim`` says. With ``Reclaim.COMPACT``, when the scan
    found corruption the leaked clusters holding data go to ``lost_found`` first;
    without one, or if saving fails, no leak is reclaimed (``notes`` says why).

    The report gives the counts found by the first pass and what was repaired;
    ``check_and_repair`` adds the second pass qemu-img makes. ``strict`` makes a
    store error raise (StoreError) instead of being counted in check_errors: the
    open-time repair must not go on with an image it could not check.

    Failure guarantee: every step keeps the image consistent on disk at every
    instant, so a crash, or a store error (which raises StoreError, or ends the
    compaction with a note), leaves at worst leaks or a NEED_CHECK that the next
    open repairs, and a later ``check -r all`` finishes the job (tests/crash prove
    both at every step); a leaked cluster is overwritten only once it is saved or
    known to hold nothing.
    """
    writable = repair is not None and not img.readonly
    fix = repair is RepairMode.ALL and writable
    scan = await _scan(await scan_source(img), checkpoint, strict)
    corruptions = scan.corruptions
    leaks = _leaked(scan) if not scan.check_errors else array("q")
    leak_count = len(leaks)
    done = _Repair()
    if writable and not scan.check_errors:
        async with img.allocations_paused():
            if fix and corruptions:
                after = await _repair_corruptions(img, scan, strict, done)
                corruptions = after.corruptions
                leaks = _leaked(after) if not after.check_errors else array("q")
                done.check_errors += after.check_errors
            if reclaim is Reclaim.TAIL:
                if not scan.corruptions:
                    # Only on an image without damage: next to a corruption, a
                    # leaked cluster may be the lost target of a damaged entry; it
                    # stays for an explicit ``qed check -r``.
                    done.leaks_fixed = await _reclaim_tail(img, leaks)
            elif leaks and not corruptions and not done.check_errors:
                await _plan_reclaim(img, scan, leaks, lost_found, done)
            elif leaks and corruptions:
                done.notes.append(
                    f"{len(leaks)} leaked clusters kept: leaks are reclaimed only once no "
                    "corruption remains" + ("" if fix else " ('-r all' repairs them)")
                )
            if fix and not corruptions and not done.check_errors:
                await img.mark_clean()
        if done.compact:
            await _compact(img, leaks, done)
    for index in leaks[:LEAK_PROBLEMS] if scan.check_errors == 0 else ():
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
        corruptions_fixed=done.fixed,
        leaks=leak_count,
        leaks_fixed=done.leaks_fixed,
        check_errors=scan.check_errors + done.check_errors,
        problems=tuple(scan.problems),
        lost_found=done.lost_found,
        notes=tuple(done.notes),
    )


async def check_and_repair(
    img: QedImage, repair: RepairMode | None, *, lost_found: LostFound | None = None
) -> CheckReport:
    """``qemu-img check [-r]``'s flow: check (repairing if asked); if anything was
    repaired, check again and report that second result with the repair counts,
    what went to lost+found and the notes."""
    first = await check_image(img, repair, lost_found=lost_found)
    if repair is None or not (first.corruptions_fixed or first.leaks_fixed):
        return first
    second = await check_image(img, None)
    return replace(
        second,
        corruptions_fixed=first.corruptions_fixed,
        leaks_fixed=first.leaks_fixed,
        problems=first.problems,
        lost_found=first.lost_found,
        notes=first.notes,
    )


# ---- corruptions ------------------------------------------------------------------


async def _repair_corruptions(img: QedImage, scan: _Scan, strict: bool, done: _Repair) -> _Scan:
    """Clear invalid entries (durably) before the duplicate repair grows the file:
    judged against a longer file, an entry just past the old end would become a
    valid reference to a new copy. Tables that are also data are left to the
    duplicate repair, which clears their invalid entries once the data has its own
    copy. Returns a scan of the repaired image. Caller holds the allocation lock."""
    cleared = await _clear_invalid(img, scan, strict, done)
    if cleared:
        await img.store.flush()
        done.fixed += await _repair_duplicates(img, scan.file_end)
    img.alloc.forget_map()  # the repair changed ownership behind the map's back
    return await _scan(await scan_source(img), strict=strict)


async def _clear_invalid(img: QedImage, scan: _Scan, strict: bool, done: _Repair) -> bool:
    """Zero the invalid entries the scan found, each fixed L2 table rewritten whole,
    then the L1 (skipping a table, or the L1, whose clusters are also someone's
    data: rewriting it would change that data). Returns False if a write failed
    (counted as a check error; the rest of the repair is skipped)."""
    geo = img.geo
    tables = img.tables
    bits = geo.cluster_bits

    def also_data(offset: int) -> bool:
        first = offset >> bits
        return any(scan.data[first : first + geo.table_size])

    for l2_offset, indexes in scan.invalid_l2.items():
        if also_data(l2_offset):
            continue
        try:
            table = await tables.read_table(l2_offset)
            for index in indexes:
                table[index] = 0
            await tables.rewrite_table(l2_offset, table)
        except QedError as exc:
            if strict:
                raise
            done.check_errors += 1
            scan.note("check-error", l2_offset, f"cannot rewrite L2 table at {l2_offset:#x}: {exc}")
            return False
        done.fixed += len(indexes)
    l1_offset = img.header.l1_table_offset
    if scan.invalid_l1 and not also_data(l1_offset):
        l1 = img.l1_table
        for l1_index in scan.invalid_l1:
            l1[l1_index] = 0
        try:
            await tables.rewrite_l1()
        except QedError as exc:
            if strict:
                raise
            done.check_errors += 1
            scan.note("check-error", l1_offset, f"cannot write the L1 table: {exc}")
            return False
        done.fixed += len(scan.invalid_l1)
    return True


async def _repair_duplicates(img: QedImage, file_end: int) -> int:
    """Give every cluster one owner; returns how many references were moved or cleared.

    Metadata owns its clusters first: the L1 table, then each L2 table in L1 order
    (a table overlapping an earlier one, or the L1, is moved to new clusters). Then
    data: in L1 and L2 order, the first reference keeps a cluster and every later one
    (including one pointing into a table) gets a new cluster holding a copy of the
    bytes it pointed to, read before anything is rewritten. Invalid entries left
    (judged against ``file_end``, the file before this repair grew it) are cleared
    in the same rewrite. Order on disk: copies, flush, rewritten L2 tables, flush,
    L1, flush. New clusters come from the allocator, tables are written through the
    tables API. Caller holds the allocation lock.
    """
    geo = img.geo
    bits = geo.cluster_bits
    ts = geo.table_size
    store = img.store
    alloc = img.alloc
    tables_api = img.tables
    l1 = img.l1_table
    owned = bytearray(max(file_end, alloc.file_end) >> bits)

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
            if l2_offset:  # invalid, left by the clearing because the L1 is also data
                l1[l1_index] = 0
                l1_changed = True
                moved += 1
            continue
        table = await tables_api.read_table(l2_offset)
        if not claim(l2_offset, ts):
            l2_offset = alloc.at_end(ts)  # beyond the old end: owned by construction
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
            new = alloc.at_end(1)
            copies.append((entry, new))
            table[index] = new
            moved += 1
            rewrite.add(l1_index)
    for src, dst in copies:
        await store.write(dst, await store.read_exact(src, geo.cluster_size, "data cluster"))
    await store.flush()
    for l1_index in sorted(rewrite):
        l2_offset, table = tables[l1_index]
        await tables_api.rewrite_table(l2_offset, table)
    await store.flush()
    for l1_index in rewrite:
        if l1[l1_index] != tables[l1_index][0]:
            l1[l1_index] = tables[l1_index][0]
            l1_changed = True
    if l1_changed:
        await tables_api.rewrite_l1()
        await store.flush()
    tables_api.cache.clear()
    return moved


# ---- leaks --------------------------------------------------------------------------


async def _reclaim_tail(img: QedImage, leaks: Sequence[int]) -> int:
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
        for start, count in _runs(inner):
            await img.store.discard(start << bits, count << bits)
    if trailing:
        new_end = (end - trailing) << bits
        await img.store.flush()
        await img.store.truncate(new_end)
        await img.store.flush()
        img.alloc.truncated(new_end)
    return trailing


def _runs(indexes: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending cluster indexes as (first, count) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


async def _plan_reclaim(
    img: QedImage, scan: _Scan, leaks: Sequence[int], lost_found: LostFound | None, done: _Repair
) -> None:
    """Reclaim.COMPACT under the allocation lock: save what may be lost data (when
    the scan found corruption), then either mark the leaks for compaction or, where
    moving clusters is not wanted or not possible, punch them and cut the tail."""
    bits = img.geo.cluster_bits
    if scan.corruptions:
        orphans = await _orphans(img, scan, leaks)
        if orphans:
            if lost_found is None:
                done.notes.append(
                    f"{len(leaks)} leaked clusters kept: {len(orphans)} of them hold data "
                    "that a damaged entry may have lost, and no lost+found file was given"
                )
                return
            try:
                done.lost_found = await lost_found.save(
                    img.filename,
                    img.geo.cluster_size,
                    [p.message for p in scan.problems if p.kind == "corruption"],
                    orphans,
                    lambda offset, length: img.store.read_exact(offset, length, "leaked cluster"),
                )
            except QedError as exc:
                done.notes.append(
                    f"{len(leaks)} leaked clusters kept: {len(orphans)} of them hold data "
                    f"that a damaged entry may have lost, and saving them failed: {exc}"
                )
                return
    if img.home_allocation:
        done.leaks_fixed = await _reclaim_tail(img, leaks)
        kept = len(leaks) - done.leaks_fixed
        if kept:
            done.notes.append(
                f"{kept} leaked clusters kept as holes: the image has the home allocation "
                "policy (identity layout), whose free home slots every QED checker counts "
                "as leaks; 'qed defrag --layout packed' removes them"
            )
        return
    try:
        cmap = await img.ensure_cluster_map()
    except CorruptImageError as exc:  # not after a successful repair; to be safe
        done.notes.append(f"{len(leaks)} leaked clusters kept: {exc}")
        return
    used = len(cmap) - cmap.owner.count(FREE)
    l1_end = (img.header.l1_table_offset >> bits) + img.geo.table_size
    if l1_end > used:
        done.leaks_fixed = await _reclaim_tail(img, leaks)
        kept = len(leaks) - done.leaks_fixed
        if kept:
            done.notes.append(
                f"{kept} leaked clusters kept as holes: the L1 table lies past the space "
                "the image uses, and moving the L1 table is not implemented"
            )
        return
    done.compact = True


async def _orphans(img: QedImage, scan: _Scan, leaks: Sequence[int]) -> list[Orphan]:
    """The leaked clusters that hold data (not a hole of the file, not all zeros),
    with why each is saved."""
    geo = img.geo
    bits = geo.cluster_bits
    cs = geo.cluster_size
    store = img.store
    hints: dict[int, str] = {}
    for d in scan.damaged:
        first = d.value >> bits  # an offset with its low bits damaged: the cluster it was
        if d.table:
            for k in range(geo.table_size):
                hints.setdefault(
                    first + k,
                    f"it may be cluster {k} of the L2 table of the L1 entry at {d.where:#x} "
                    f"(guest offsets from {d.guest:#x}), which held {d.value:#x}",
                )
        else:
            hints.setdefault(
                first,
                f"it may be the data of guest offset {d.guest:#x}, whose L2 entry at "
                f"{d.where:#x} held {d.value:#x}",
            )
    found = sum(1 for p in scan.problems if p.kind == "corruption")
    zero = bytes(cs)
    orphans: list[Orphan] = []
    for start, count in _runs(leaks):
        for ext in await store.extents(start << bits, count << bits):
            if not ext.data:
                continue
            first = ext.offset >> bits
            last = (ext.offset + ext.length - 1) >> bits
            for index in range(first, last + 1):
                offset = index << bits
                if await store.read_exact(offset, cs, "leaked cluster") == zero:
                    continue
                why = f"no table references it after the repair of {found} corruptions"
                if index in hints:
                    why += "; " + hints[index]
                orphans.append(Orphan(offset, cs, why))
    return orphans


async def _compact(img: QedImage, leaks: Sequence[int], done: _Repair) -> None:
    """Remove the leaks by moving the clusters at the end of the file into them, then
    truncating (engine.qed.move; every step crash-safe). A failure keeps the image
    consistent; what was not removed stays as leaks, punched, and a note says why."""
    bits = img.geo.cluster_bits
    mover = Mover(img)
    tables = sum(1 for offset in img.l1_table if offset)
    batch = max(1, COMPACT_BATCH_BYTES >> bits)
    rounds = 4 * tables + 2 * (len(leaks) // batch) + 16
    try:
        await mover.compact(batch=batch, max_rounds=rounds)
    except QedError as exc:
        done.notes.append(f"moving clusters into the leaked ones stopped: {exc}")
        try:
            if img.cluster_map is not None:
                await mover.truncate()
                await mover.punch_free()
        except QedError:
            pass
    cmap = img.cluster_map
    if cmap is not None:
        remaining = cmap.owner.count(FREE)
    else:
        after = await _scan(await scan_source(img))
        remaining = len(_leaked(after)) if not after.check_errors else len(leaks)
    done.leaks_fixed = max(0, len(leaks) - remaining)
