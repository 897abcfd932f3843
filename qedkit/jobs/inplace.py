"""In-place conversion of a qcow2 image to QED: the same file, its data left where it is.

References: qemu docs/interop/qcow2.txt ("Cluster mapping", "Extended L2 Entries",
"Compressed Clusters Descriptor"), docs/interop/qed_spec.txt ("Header", "Tables");
the QED design's promise of an in-place qcow2 conversion, which QEMU never shipped.

Theory of operation
-------------------
*Geometry.* The QED cluster size is the qcow2 one when it is 4 KiB..2 MiB, so every
uncompressed, fully allocated qcow2 data cluster can be pointed at as it is; smaller
qcow2 clusters (512 B..2 KiB) get 4 KiB QED clusters, and a QED cluster then reuses
its host bytes only where its qcow2 clusters happen to be one aligned, contiguous
host run (else its data is copied). When no table size fits the virtual size
(``qemu_max_image_size``; table_size 1 never, QEMU cannot open it) the cluster size
doubles, up to 2 MiB. The table size is the smallest from 2 that fits: the tables
stay small and one L2 table maps less, away from QEMU's 4 GiB block-status bug.

*Plan* (``plan``, no write): every L2 entry of the active qcow2 state, walked as runs
of one kind (engine.qcow2 ``iter_runs``), decides each QED guest cluster:

==================================================  ===============================
qcow2 guest cluster                                 QED entry
==================================================  ===============================
data, one aligned host cluster, not the header      the same host offset (reused)
zero (ZERO_PLAIN, ZERO_ALLOC, zero subclusters)     1, a zero cluster
unallocated (also with reserved host space)         0, the backing file or zeros
compressed                                          copied (inflated) to a new cluster
partly allocated subclusters, mixed kinds           copied: the guest's view, with
                                                    backing data or zeros merged in
data that is not one aligned host cluster           copied
a host cluster a second entry points at (corrupt)   the second one is copied
==================================================  ===============================

Everything is validated before the first write: the header (dirty, corrupt,
snapshots and bitmaps without ``discard_snapshots``, a size that is no multiple of
512, where the backing name can go), every entry (data clusters past the end of the
file are refused: a QED table appended there would change what they read).

*Write* (``write_tables``), past the end of the file only: the file is padded to a
whole QED cluster (at least past the last byte a compressed cluster names), then for
each L2 span its copied clusters and its L2 table, then the L1 table; one flush.
Until the header switch the file is the original qcow2: nothing it references
changed, and qcow2's refcounts say 0 for the appended clusters, which ``qemu-img
check`` accepts as clean (a refcount above the references is a leak, not 0). A
failure here cuts the file back to its old length, so it is exactly as it was.

*Switch* (``switch``): one 512-byte write of sector 0: the QED header and, when it
fits there, the backing name at 64 (else the qcow2 name stays where it is, inside
cluster 0, and the QED header points at it); flush. A sector write is atomic, so a
power loss leaves either the qcow2 image or the QED one.

*Reclaim* (``reclaim``), a QED image from now on, every step crash-safe through
engine.qed.move: the L1 table moves to cluster 1 (QEMU's layout, so that the data
area starts at ``(1 + table_size)`` clusters: defragmentation and the home policy
see the layout a created image has), then ``Mover.compact`` moves the clusters past
the used space (the new tables first, then the copied and the highest data clusters)
into the slots the qcow2 metadata, compressed data and preallocated zero clusters
left, and truncates. Every cluster is then referenced once: ``qemu-img check``
exits 0. ``Reclaim.PUNCH`` only punches those slots and cuts the free tail (no data
moves, but QED has no free list, so checkers report the slots as leaks). A crash
during the reclaim leaves a valid QED image with leaks; running the conversion again
on it resumes the reclaim.

Failure guarantee: before the switch, any error leaves the qcow2 image exactly as it
was (appended bytes are cut away again where possible; a crash leaves them as
unreferenced space); after it, a valid QED image with the same guest data.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from ..engine.chain import open_qed
from ..engine.qcow2 import Qcow2Image
from ..engine.qed import FREE, META, Mover, Planned, QedImage
from ..errors import (
    CorruptImageError,
    InvalidRequestError,
    JobError,
    QedError,
    UnsupportedFeatureError,
)
from ..format import qcow2 as q
from ..format.geometry import SECTOR_SIZE, qemu_max_image_size
from ..format.header import HEADER_SIZE_BYTES, Feature, Header, encode_backing_name
from ..format.tables import new_table, pack_table

KiB = 1 << 10
MiB = 1 << 20
MIN_QED_CLUSTER = 4 * KiB  # QED's minimum cluster size
MAX_QED_CLUSTER = 2 * MiB  # QEMU's qcow2 maximum: tables stay at most 32 MiB
TABLE_SIZES = (2, 4, 8, 16)  # never 1: QEMU cannot open table_size 1 images
WRITE_BATCH = 8 * MiB  # appended clusters and tables written per pwritev
# Compactions at most per reclaim (more than one only when a served image's guest
# allocated while the first ran).
MAX_COMPACTIONS = 8

Checkpoint = Callable[[int, int], Awaitable[None]]


async def no_checkpoint(done: int, total: int) -> None:
    return None


class Reclaim(enum.Enum):
    """What happens to the qcow2 metadata once the file is QED."""

    COMPACT = "compact"  # move clusters into the freed slots, truncate: checks clean
    PUNCH = "punch"  # punch the freed slots, cut the free tail: leaks remain


class CopyReason(enum.Enum):
    COMPRESSED = "compressed"
    SUBCLUSTERS = "subclusters"  # a partly allocated (or zero) cluster: merged view
    LAYOUT = "layout"  # data not in one aligned host cluster (or in cluster 0)
    SHARED = "shared"  # a host cluster another entry already points at


@dataclass(frozen=True, slots=True)
class QedGeometry:
    cluster_size: int
    table_size: int

    @classmethod
    def choose(cls, qcow2_cluster_size: int, size: int, filename: str) -> QedGeometry:
        """The QED geometry for a qcow2 image (see the module docstring)."""
        cs = max(qcow2_cluster_size, MIN_QED_CLUSTER)
        while cs <= MAX_QED_CLUSTER:
            for ts in TABLE_SIZES:
                if size <= qemu_max_image_size(cs, ts):
                    return cls(cs, ts)
            cs *= 2
        raise UnsupportedFeatureError(
            f"the virtual size {size} does not fit any QED geometry QEMU opens with "
            f"clusters of at most {MAX_QED_CLUSTER} bytes",
            filename=filename,
        )

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def l2_entries(self) -> int:
        return self.table_size * self.cluster_size // 8

    @property
    def l2_span(self) -> int:
        return self.l2_entries * self.cluster_size

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size


@dataclass
class PlanStats:
    """Guest clusters (QED-sized) by what the conversion does with them."""

    reused: int = 0
    copied: int = 0
    zero: int = 0
    unallocated: int = 0
    l2_tables: int = 0
    copy_reasons: dict[str, int] = field(default_factory=dict)

    def count_copy(self, reason: CopyReason) -> None:
        self.copied += 1
        self.copy_reasons[reason.value] = self.copy_reasons.get(reason.value, 0) + 1


@dataclass(frozen=True)
class ConversionPlan:
    """What ``plan`` found: the figures a dry run reports and the real run repeats."""

    filename: str
    qcow2_version: int
    qcow2_cluster_size: int
    geometry: QedGeometry
    image_size: int
    file_size: int  # the qcow2 file's length when planned
    allocated_bytes: int  # its allocated size then
    append_at: int  # where the new clusters and tables start (cluster-aligned)
    spans: tuple[int, ...]  # QED L1 indexes that get an L2 table
    stats: PlanStats
    backing_filename: str | None
    backing_raw: bool
    snapshots_discarded: int
    bitmaps_discarded: int
    # Per QED L1 index: a bitmap of the guest clusters whose data stays in place
    # (the live export writes those in place before the switch).
    reused_guest: dict[int, bytearray] = field(repr=False, default_factory=dict)
    # Reused host clusters that qcow2 metadata or compressed data also occupies (a
    # damaged image; harmless offline, refused by the live export, whose in-place
    # writes would change them before the switch).
    overlaps: int | None = 0

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

    @property
    def table_bytes(self) -> int:
        """The new L1 and L2 tables."""
        return (1 + self.stats.l2_tables) * self.geometry.table_bytes

    @property
    def bytes_to_write(self) -> int:
        """Appended before the switch: copied clusters, tables (and the header sector)."""
        return self.stats.copied * self.cluster_size + self.table_bytes + SECTOR_SIZE

    @property
    def reclaimable_bytes(self) -> int:
        """The old file's space no QED entry will use: qcow2 metadata, compressed
        data, preallocated zero and unallocated clusters, padding."""
        return self.append_at - (1 + self.stats.reused) * self.cluster_size

    def is_reused(self, guest_cluster: int) -> bool:
        span, index = divmod(guest_cluster, self.geometry.l2_entries)
        bits = self.reused_guest.get(span)
        return bits is not None and bool(bits[index >> 3] >> (index & 7) & 1)

    def as_dict(self) -> dict[str, object]:
        s = self.stats
        cs = self.cluster_size
        return {
            "filename": self.filename,
            "qcow2-version": self.qcow2_version,
            "qcow2-cluster-size": self.qcow2_cluster_size,
            "cluster-size": cs,
            "table-size": self.geometry.table_size,
            "virtual-size": self.image_size,
            "reused-clusters": s.reused,
            "reused-bytes": s.reused * cs,
            "copied-clusters": s.copied,
            "copied-bytes": s.copied * cs,
            "copied-by-reason": dict(sorted(s.copy_reasons.items())),
            "zero-clusters": s.zero,
            "unallocated-clusters": s.unallocated,
            "l2-tables": s.l2_tables,
            "table-bytes": self.table_bytes,
            "bytes-to-write": self.bytes_to_write,
            "reclaimable-bytes": self.reclaimable_bytes,
            "file-size-before": self.file_size,
            "allocated-before": self.allocated_bytes,
            "backing-filename": self.backing_filename,
            "backing-raw": self.backing_raw,
            "snapshots-discarded": self.snapshots_discarded,
            "bitmaps-discarded": self.bitmaps_discarded,
        }


@dataclass
class ReclaimStats:
    clusters_moved: int = 0
    tables_moved: int = 0  # L2 tables, and the L1 table
    truncated_bytes: int = 0
    punched_bytes: int = 0
    mode: str = Reclaim.COMPACT.value


@dataclass
class ConversionReport:
    """The real run: the plan's figures, the reclaim, what was written, the sizes."""

    plan: ConversionPlan | None  # None when an already converted image was resumed
    reclaim: ReclaimStats
    bytes_written: int  # before the switch (copies, tables, header sector)
    bytes_moved: int  # by the reclaim
    file_size_after: int
    allocated_after: int
    seconds: float
    resumed: bool = False
    file_size_before: int = 0  # a resumed run's (else the plan has it)
    allocated_before: int = 0
    filename: str = ""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.plan.as_dict()) if self.plan else {}
        if self.plan is None:
            out["filename"] = self.filename
            out["file-size-before"] = self.file_size_before
            out["allocated-before"] = self.allocated_before
        r = self.reclaim
        out.update(
            {
                "resumed": self.resumed,
                "bytes-written": self.bytes_written,
                "reclaim": r.mode,
                "clusters-moved": r.clusters_moved,
                "tables-moved": r.tables_moved,
                "bytes-moved": self.bytes_moved,
                "truncated-bytes": r.truncated_bytes,
                "punched-bytes": r.punched_bytes,
                "file-size-after": self.file_size_after,
                "allocated-after": self.allocated_after,
                "seconds": round(self.seconds, 3),
            }
        )
        return out


@dataclass
class _Span:
    """One QED L2 table being planned: its entries and the clusters to copy."""

    index: int
    table: array[int]
    copies: list[int] = field(default_factory=list)  # indexes into ``table``
    reused: bytearray | None = None


class _Bitset:
    """One bit per host cluster of the file (a second reference to one is copied)."""

    def __init__(self, bits: int) -> None:
        self.data = bytearray((bits + 7) >> 3)

    def test_and_set(self, i: int) -> bool:
        byte, bit = i >> 3, 1 << (i & 7)
        old = self.data[byte] & bit
        self.data[byte] |= bit
        return bool(old)


class InPlaceConverter:
    """Converts one qcow2 image (opened on a writable store, engine.chain
    ``open_for_conversion``) in steps: ``plan``, ``write_tables``, ``switch``,
    ``reclaim``; ``run`` does them all. See the module docstring."""

    def __init__(
        self,
        src: Qcow2Image,
        *,
        discard_snapshots: bool = False,
        reclaim: Reclaim = Reclaim.COMPACT,
    ) -> None:
        self.src = src
        self.discard_snapshots = discard_snapshots
        self.reclaim_mode = reclaim
        self.filename = src.filename
        self._plan: ConversionPlan | None = None
        self.qed: QedImage | None = None  # once switched
        self.bytes_written = 0
        self._l1_at: int | None = None  # where write_tables put the L1 table

    # ======================================================================
    # plan
    # ======================================================================

    async def plan(self, checkpoint: Checkpoint = no_checkpoint) -> ConversionPlan:
        """Validate everything and decide every cluster; writes nothing. Raises
        UnsupportedFeatureError (what the conversion refuses, naming the feature),
        CorruptImageError (an entry it cannot honour), InvalidRequestError."""
        src = self.src
        h = src.header
        geo, snapshots, bitmaps = self._check_header()
        file_size = await src.store.size()
        allocated = await src.store.allocated_bytes()
        walker = _Walker(src, geo, file_size)
        spans = walker.spans()
        total = len(spans)
        kept: list[int] = []
        reused_guest: dict[int, bytearray] = {}
        for done, s in enumerate(spans):
            span = await walker.span(s)
            if any(span.table) or span.copies:
                kept.append(s)
                walker.stats.l2_tables += 1
            if span.reused is not None:
                reused_guest[s] = span.reused
            await checkpoint(done + 1, total)
        walker.count_unallocated()
        backing = src.backing
        self._plan = ConversionPlan(
            filename=self.filename,
            qcow2_version=h.version,
            qcow2_cluster_size=h.cluster_size,
            geometry=geo,
            image_size=h.size,
            file_size=file_size,
            allocated_bytes=allocated,
            append_at=walker.append_at(),
            spans=tuple(kept),
            stats=walker.stats,
            backing_filename=src.backing_filename,
            backing_raw=backing is not None and backing.format_name == "raw",
            snapshots_discarded=snapshots,
            bitmaps_discarded=bitmaps,
            reused_guest=reused_guest,
            overlaps=await walker.overlaps(),
        )
        return self._plan

    def _check_header(self) -> tuple[QedGeometry, int, int]:
        """Refuse, in this order, what the header says cannot be converted (the
        module docstring's list); returns the QED geometry and the numbers of
        snapshots and bitmaps the conversion drops."""
        src = self.src
        h = src.header
        name = self.filename
        if h.dirty:
            raise UnsupportedFeatureError(
                "the image has the dirty bit set (lazy refcounts not written back); run "
                "'qemu-img check -r all' on it first",
                filename=name,
                field="incompatible_features",
                offset=q.FIELD_OFFSETS["incompatible_features"],
            )
        if h.corrupt:
            raise UnsupportedFeatureError(
                "the image has the corrupt bit set; repair it ('qemu-img check -r all') first",
                filename=name,
                field="incompatible_features",
                offset=q.FIELD_OFFSETS["incompatible_features"],
            )
        snapshots = h.nb_snapshots
        ext = src.meta.extensions.bitmaps
        bitmaps = ext.nb_bitmaps if ext is not None else 0
        if (snapshots or bitmaps) and not self.discard_snapshots:
            what = []
            if snapshots:
                what.append(f"{snapshots} internal snapshot{'s' if snapshots > 1 else ''}")
            if bitmaps:
                what.append(f"{bitmaps} persistent bitmap{'s' if bitmaps > 1 else ''}")
            raise UnsupportedFeatureError(
                f"the image has {' and '.join(what)}, which QED cannot hold: "
                "--discard-snapshots converts the active state and drops them",
                filename=name,
                field="nb_snapshots" if snapshots else "header_extension",
                offset=q.FIELD_OFFSETS["nb_snapshots"],
            )
        if h.size % SECTOR_SIZE:
            raise UnsupportedFeatureError(
                f"the virtual size {h.size} is not a multiple of {SECTOR_SIZE}, which QED "
                "needs (rounding it up would change the disk)",
                filename=name,
                field="size",
                offset=q.FIELD_OFFSETS["size"],
            )
        geo = QedGeometry.choose(h.cluster_size, h.size, name)
        backing_name = src.backing_filename
        if backing_name:
            raw = encode_backing_name(backing_name)
            at_64 = HEADER_SIZE_BYTES + len(raw) <= SECTOR_SIZE
            if not at_64 and h.backing_file_offset < HEADER_SIZE_BYTES:
                raise UnsupportedFeatureError(
                    f"the backing file name ({len(raw)} bytes at offset "
                    f"{h.backing_file_offset}) overlaps where the QED header goes",
                    filename=name,
                    field="backing_file_offset",
                    offset=q.FIELD_OFFSETS["backing_file_offset"],
                )
        return geo, snapshots, bitmaps

    @property
    def planned(self) -> ConversionPlan:
        if self._plan is None:
            raise JobError("the conversion has not been planned", filename=self.filename)
        return self._plan

    # ======================================================================
    # write (past the end of the file only)
    # ======================================================================

    async def write_tables(self, checkpoint: Checkpoint = no_checkpoint, *, rate: int = 0) -> int:
        """Append the copied clusters, the L2 tables and the L1 table, then flush;
        returns the L1 table's offset. ``rate`` (bytes per second, 0: no limit) paces
        the copies (a served image's clients keep the rest of the disk's bandwidth).
        The file stays the qcow2 image; on any error it is cut back to its planned
        length (failure guarantee)."""
        plan = self.planned
        store = self.src.store
        if store.readonly:
            raise InvalidRequestError(
                "the image is open read-only; an in-place conversion needs it writable",
                filename=self.filename,
            )
        size = await store.size()
        if size != plan.file_size:
            raise JobError(
                f"the file changed size since it was planned ({plan.file_size} -> {size})",
                filename=self.filename,
            )
        try:
            return await self._append(plan, checkpoint, rate)
        except BaseException:
            # the first error is the one to report
            with contextlib.suppress(Exception):
                await store.truncate(plan.file_size)
            raise

    async def _append(self, plan: ConversionPlan, checkpoint: Checkpoint, rate: int) -> int:
        src = self.src
        store = src.store
        geo = plan.geometry
        cs = geo.cluster_size
        if plan.append_at > plan.file_size:
            await store.truncate(plan.append_at)
        walker = _Walker(src, geo, plan.file_size)
        l1 = new_table(geo.l2_entries)
        cursor = plan.append_at
        pending: list[bytes | bytearray] = []
        pending_at = cursor
        pending_bytes = 0

        async def put(buf: bytes | bytearray) -> int:
            nonlocal cursor, pending_at, pending_bytes
            at = cursor
            pending.append(buf)
            pending_bytes += len(buf)
            cursor += len(buf)
            if pending_bytes >= WRITE_BATCH:
                await flush_pending()
            return at

        async def flush_pending() -> None:
            nonlocal pending, pending_at, pending_bytes
            if pending:
                await store.writev(pending_at, pending)
                self.bytes_written += pending_bytes
            pending, pending_at, pending_bytes = [], cursor, 0

        total = len(plan.spans)
        started = time.monotonic()
        copied = 0
        for done, s in enumerate(plan.spans):
            span = await walker.span(s)
            base = s * geo.l2_entries
            for index in span.copies:
                g = base + index
                buf = bytearray(cs)
                n = min(cs, plan.image_size - (g << geo.cluster_bits))
                await src.readinto(g << geo.cluster_bits, memoryview(buf)[:n])
                span.table[index] = await put(buf)
                copied += cs
                if rate:
                    ahead = copied / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                # a served image's requests get their turn between two copies
                await checkpoint(done, total + 1)
            l1[s] = await put(pack_table(span.table))
            await checkpoint(done + 1, total + 1)
        l1_at = await put(pack_table(l1))
        await flush_pending()
        await store.flush()
        walker.stats.l2_tables = len(plan.spans)
        walker.count_unallocated()
        if walker.stats != plan.stats:
            raise JobError("the image changed between planning and writing", filename=self.filename)
        self._l1_at = l1_at
        await checkpoint(total + 1, total + 1)
        return l1_at

    # ======================================================================
    # switch: the one sector that makes the file QED
    # ======================================================================

    def qed_header(self, l1_at: int) -> tuple[Header, bytes]:
        """The QED header and the sector-0 bytes that carry it."""
        plan = self.planned
        geo = plan.geometry
        features = 0
        name_offset = name_size = 0
        sector = bytearray(SECTOR_SIZE)
        if plan.backing_filename:
            raw = encode_backing_name(plan.backing_filename)
            features = Feature.BACKING_FILE
            if plan.backing_raw:
                features |= Feature.BACKING_FORMAT_NO_PROBE
            name_size = len(raw)
            if HEADER_SIZE_BYTES + name_size <= SECTOR_SIZE:
                name_offset = HEADER_SIZE_BYTES  # where QEMU puts it
                sector[name_offset : name_offset + name_size] = raw
            else:
                # Too long for the sector: the qcow2 name stays where it is (cluster
                # 0, past the QED header); its bytes inside sector 0 are kept.
                name_offset = self.src.header.backing_file_offset
                inside = raw[: max(0, SECTOR_SIZE - name_offset)]
                sector[name_offset : name_offset + len(inside)] = inside
        header = Header(
            cluster_size=geo.cluster_size,
            table_size=geo.table_size,
            header_size=1,
            features=int(features),
            compat_features=0,
            autoclear_features=0,
            l1_table_offset=l1_at,
            image_size=plan.image_size,
            backing_filename_offset=name_offset,
            backing_filename_size=name_size,
        )
        sector[:HEADER_SIZE_BYTES] = header.pack()
        return header, bytes(sector)

    async def switch(self) -> QedImage:
        """Write the QED header sector, flush, and open the file as QED (over the same
        store and backing image, which the qcow2 driver then no longer owns). If the
        write or the flush fails, the file is either image (as after a power loss:
        both are valid and hold the same data); open it again to know which."""
        l1_at = self._l1_at
        if l1_at is None:
            raise JobError("switch before the tables were written", filename=self.filename)
        src = self.src
        store = src.store
        _, sector = self.qed_header(l1_at)
        await store.write(0, sector)
        self.bytes_written += len(sector)
        await store.flush()
        header, area = await QedImage.read_header(store)
        backing = src.backing
        src.backing = None
        self.qed = await open_qed(
            store, header, area, backing=backing, readonly=False, filename=self.filename
        )
        return self.qed

    # ======================================================================
    # all steps
    # ======================================================================

    async def run(self, checkpoint: Checkpoint = no_checkpoint) -> ConversionReport:
        """Plan (if not done yet), write, switch, reclaim. Progress: planning, writing
        and reclaiming each report their own ``(done, total)``."""
        started = time.monotonic()
        plan = self._plan or await self.plan(checkpoint)
        await self.write_tables(checkpoint)
        img = await self.switch()
        return await reclaim_and_report(
            img, self.reclaim_mode, checkpoint, plan, self.bytes_written, started
        )

    async def close(self) -> None:
        """Close whichever image the file is now (and the backing chain)."""
        if self.qed is not None:
            await self.qed.close()
        else:
            await self.src.close()


async def reclaim_and_report(
    img: QedImage,
    mode: Reclaim,
    checkpoint: Checkpoint,
    plan: ConversionPlan | None,
    bytes_written: int,
    started: float,
) -> ConversionReport:
    """The last step of every conversion: ``reclaim``, then the report of a conversion
    that began at ``started`` (time.monotonic) and wrote ``bytes_written`` bytes before
    its switch."""
    stats = await reclaim(img, mode, checkpoint)
    geo = img.geo
    return ConversionReport(
        plan=plan,
        reclaim=stats,
        bytes_written=bytes_written,
        bytes_moved=stats.clusters_moved * geo.cluster_size + stats.tables_moved * geo.table_bytes,
        file_size_after=await img.store.size(),
        allocated_after=await img.store.allocated_bytes(),
        seconds=time.monotonic() - started,
    )


# ==========================================================================================
# Walking the qcow2 tables: one QED L2 span at a time
# ==========================================================================================


class _Walker:
    """Decides the QED entries of one L2 span at a time (see the module table). The
    same walk runs twice, when planning and when writing: it depends only on the
    qcow2 metadata, which nothing changes, so both give the same tables."""

    def __init__(self, src: Qcow2Image, geo: QedGeometry, file_size: int) -> None:
        self.src = src
        self.geo = geo
        self.size = src.size
        self.file_size = file_size
        self.cs = geo.cluster_size
        self.bits = geo.cluster_bits
        self.qcs = src.geo.cluster_size
        self.stats = PlanStats()
        self.compressed_end = 0
        self.no_backing = src.backing is None
        # the file rounded up to a QED cluster: every data cluster must lie below it
        self.file_end = (file_size + self.cs - 1) & ~(self.cs - 1)
        self.seen = _Bitset(self.file_end >> self.bits)
        self.compressed = _Bitset(self.file_end >> self.bits)  # touched by compressed data

    def spans(self) -> list[int]:
        """QED L1 indexes whose span holds an allocated qcow2 L2 table."""
        qspan = self.src.geo.l2_span
        out: set[int] = set()
        for i, entry in enumerate(self.src.l1_table):
            if q.l2_table_offset(entry) and i * qspan < self.size:
                lo = i * qspan
                hi = min(lo + qspan, self.size) - 1
                out.update(range(lo // self.geo.l2_span, hi // self.geo.l2_span + 1))
        return sorted(out)

    async def overlaps(self) -> int | None:
        """Reused host clusters also holding qcow2 metadata or compressed data (None
        when the metadata cannot be listed: a damaged snapshot table, say)."""
        try:
            meta = await self.src.metadata_clusters()
        except QedError:
            return None
        marks = {h >> self.bits for h in meta.all() if h < self.file_end}
        seen, compressed = self.seen.data, self.compressed.data
        count = sum(1 for i in marks if seen[i >> 3] >> (i & 7) & 1)
        both = int.from_bytes(seen, "little") & int.from_bytes(compressed, "little")
        return count + both.bit_count()

    def append_at(self) -> int:
        """Where appending starts: past the file and past every compressed cluster's
        last sector (which may reach beyond the end of the file), cluster-aligned."""
        end = max(self.file_end, self.compressed_end)
        return (end + self.cs - 1) & ~(self.cs - 1)

    def count_unallocated(self) -> None:
        """Guest clusters neither reused, copied nor zero: unallocated."""
        clusters = (self.size + self.cs - 1) >> self.bits
        s = self.stats
        s.unallocated = clusters - s.reused - s.copied - s.zero

    async def span(self, s: int) -> _Span:
        geo = self.geo
        n = geo.l2_entries
        base = s * geo.l2_span
        end = min(base + geo.l2_span, self.size)
        span = _Span(s, new_table(n))
        pending: list[_Piece] = []
        bits, cs = self.bits, self.cs
        async for run in self.src.iter_runs(base, end - base):
            self._check(run)
            pos = run.start
            while pos < run.end:
                g = pos >> bits
                cstart = g << bits
                cend = min(cstart + cs, self.size)
                if pos == cstart and run.end >= cend:
                    # whole clusters: all but a final piece
                    k = (run.end - pos) >> bits
                    if k == 0 or (run.end == self.size and (run.end - pos) & (cs - 1)):
                        k += 1
                    self._whole(span, run, g - s * n, k, pos)
                    pos = min(run.end, pos + (k << bits))
                    continue
                stop = min(run.end, cend)
                pending.append(_piece(run, pos, stop))
                pos = stop
                if pos == cend:
                    self._decide(span, g - s * n, pending)
                    pending = []
        return span

    # ---- checks ------------------------------------------------------------------------

    def _check(self, run: q.Run) -> None:
        if run.kind is q.SubclusterType.NORMAL:
            assert run.host_offset is not None
            last = (run.host_offset + run.length - 1) & ~(self.qcs - 1)
            if last >= self.file_size:
                raise CorruptImageError(
                    f"L2 entry at offset {run.entry_offset}: data cluster at "
                    f"{last:#x} lies past the end of the file ({self.file_size} "
                    "bytes); the appended QED tables would change what it reads",
                    filename=self.src.filename,
                    offset=run.entry_offset,
                    field="l2_entry",
                )
        elif run.kind is q.SubclusterType.COMPRESSED:
            desc = run.compressed
            assert desc is not None
            if desc.host_offset >= self.file_size:
                raise CorruptImageError(
                    f"L2 entry at offset {run.entry_offset}: compressed cluster at "
                    f"{desc.host_offset:#x} lies past the end of the file",
                    filename=self.src.filename,
                    offset=run.entry_offset,
                    field="l2_entry",
                )
            self.compressed_end = max(self.compressed_end, desc.host_end)
            last = min(desc.host_end, self.file_end) - 1
            for i in range(desc.host_offset >> self.bits, (last >> self.bits) + 1):
                self.compressed.test_and_set(i)

    # ---- decisions ---------------------------------------------------------------------

    def _reuse(self, span: _Span, index: int, host: int) -> None:
        """Guest cluster ``index`` of the span is one NORMAL host run from ``host``."""
        cs = self.cs
        if host & (cs - 1) or host < cs:
            self._copy(span, index, CopyReason.LAYOUT)
            return
        if self.seen.test_and_set(host >> self.bits):
            self._copy(span, index, CopyReason.SHARED)
            return
        span.table[index] = host
        if span.reused is None:
            span.reused = bytearray((self.geo.l2_entries + 7) >> 3)
        span.reused[index >> 3] |= 1 << (index & 7)
        self.stats.reused += 1

    def _copy(self, span: _Span, index: int, reason: CopyReason) -> None:
        span.copies.append(index)
        self.stats.count_copy(reason)

    def _whole(self, span: _Span, run: q.Run, index: int, k: int, pos: int) -> None:
        """``k`` whole guest clusters from ``index`` inside one run."""
        kind = run.kind
        if kind is q.SubclusterType.NORMAL:
            assert run.host_offset is not None
            host = run.host_offset + (pos - run.start)
            for i in range(k):
                self._reuse(span, index + i, host + (i << self.bits))
        elif kind.reads_zero:
            span.table[index : index + k] = array("Q", [1]) * k
            self.stats.zero += k
        elif kind is q.SubclusterType.COMPRESSED:
            for i in range(k):
                self._copy(span, index + i, CopyReason.COMPRESSED)
        # unallocated: entries stay 0

    def _decide(self, span: _Span, index: int, pieces: list[_Piece]) -> None:
        """A guest cluster made of several runs (or the piece of one)."""
        kinds = {p.kind for p in pieces}
        if all(k.reads_zero for k in kinds):
            span.table[index] = 1
            self.stats.zero += 1
            return
        if all(k.unallocated for k in kinds):
            return
        if all(k.reads_zero or k.unallocated for k in kinds) and self.no_backing:
            span.table[index] = 1  # zeros either way: say so
            self.stats.zero += 1
            return
        if q.SubclusterType.COMPRESSED in kinds:
            self._copy(span, index, CopyReason.COMPRESSED)
            return
        first, last = pieces[0].start, pieces[-1].end - 1
        qbits = self.src.geo.cluster_bits
        one_qcow2_cluster = first >> qbits == last >> qbits
        self._copy(span, index, CopyReason.SUBCLUSTERS if one_qcow2_cluster else CopyReason.LAYOUT)


@dataclass(frozen=True, slots=True)
class _Piece:
    kind: q.SubclusterType
    start: int
    end: int


def _piece(run: q.Run, start: int, end: int) -> _Piece:
    return _Piece(run.kind, start, end)


# ==========================================================================================
# Reclaim: the qcow2 leftovers become free space, then go
# ==========================================================================================


async def reclaim(
    img: QedImage, mode: Reclaim = Reclaim.COMPACT, checkpoint: Checkpoint = no_checkpoint
) -> ReclaimStats:
    """Put the L1 table at cluster 1 (QEMU's layout), then compact (or punch) the free
    space every QED checker would call leaked. Crash-safe at every step (engine.qed
    Mover); on error or a crash the image is a valid QED image with the same data,
    with leaks at worst. Also finishes an interrupted conversion."""
    stats = ReclaimStats(mode=mode.value)
    await img.ensure_cluster_map()
    await _l1_to_cluster_one(img, stats)
    mover = Mover(img)
    await checkpoint(0, 1)
    if mode is Reclaim.COMPACT:
        # A served image's guest may allocate (at the end of the file) while the
        # moves free slots below it: compact again until no free slot is left.
        for _ in range(MAX_COMPACTIONS):
            compacted = await mover.compact()
            stats.clusters_moved += compacted.clusters_moved
            stats.tables_moved += compacted.tables_moved
            stats.truncated_bytes += compacted.truncated_bytes
            if not _free_slots(img):
                break
    else:
        stats.truncated_bytes = await mover.truncate()
        stats.punched_bytes = await mover.punch_free()
    await img.flush()
    await checkpoint(1, 1)
    return stats


def _free_slots(img: QedImage) -> bool:
    """Any cluster inside the file that nothing references (a leak to checkers)."""
    cmap = img.alloc.cluster_map
    assert cmap is not None
    end = min(len(cmap.owner), img.alloc.file_end >> img.geo.cluster_bits)
    return FREE in cmap.owner[img.geo.header_size : end]


async def _l1_to_cluster_one(img: QedImage, stats: ReclaimStats) -> None:
    geo = img.geo
    bits, ts = geo.cluster_bits, geo.table_size
    target = geo.header_bytes
    window = range(target >> bits, (target >> bits) + ts)
    spill = (window.stop) << bits
    mover = Mover(img, spill=spill)
    cmap = img.alloc.cluster_map
    assert cmap is not None
    for _ in range(8):  # a live guest may allocate into the window meanwhile
        current = img.header.l1_table_offset
        if current == target:
            return
        cur = range(current >> bits, (current >> bits) + ts)
        if cur.start < window.stop and window.start < cur.stop:
            # overlapping the window but not at its start: move it out of the way first
            await mover.move_l1(img.alloc.free_run(spill, ts))
            stats.tables_moved += 1
            continue
        owners = [(i, cmap.get(i)) for i in window]
        data = [Planned(o, i << bits, None) for i, o in owners if o >= 0]
        if data:
            moved = await mover.move_data(data)
            stats.clusters_moved += len(moved)
        tables = {
            l1_index
            for l1_index, off in enumerate(img.l1_table)
            if off and (off >> bits) < window.stop and window.start < (off >> bits) + ts
        }
        for l1_index in sorted(tables):
            await mover.move_table(l1_index)
            stats.tables_moved += 1
        if all(cmap.get(i) == FREE for i in window):
            await mover.move_l1(target)
            stats.tables_moved += 1
            return
        if any(cmap.get(i) == META for i in window) and not tables:
            raise JobError(
                "metadata other than an L2 table lies where the L1 table goes",
                filename=img.filename,
            )
    raise JobError("could not free clusters 1.. for the L1 table", filename=img.filename)


# ==========================================================================================
# One file, start to end (the CLI's call)
# ==========================================================================================

# Shares of the progress each step reports into (planning, writing, reclaiming).
_PHASES = ((0, 10), (10, 85), (85, 100))


def _phase(checkpoint: Checkpoint, which: int) -> Checkpoint:
    lo, hi = _PHASES[which]

    async def report(done: int, total: int) -> None:
        await checkpoint(lo + (hi - lo) * done // max(1, total), 100)

    return report


async def convert_file(
    path: str,
    *,
    fmt: str | None = None,
    dry_run: bool = False,
    discard_snapshots: bool = False,
    reclaim_mode: Reclaim = Reclaim.COMPACT,
    checkpoint: Checkpoint = no_checkpoint,
) -> ConversionPlan | ConversionReport | None:
    """Convert the qcow2 image ``path`` to QED in place (``qed convert --in-place``).

    ``dry_run`` opens it read-only and returns the plan (None for a file that is
    QED already). A QED file (an earlier conversion interrupted after its header
    switch) gets the reclaim finished. Progress goes to ``checkpoint(done, 100)``.
    Failure guarantee: the module docstring's; a refused image is not written."""
    from ..engine.chain import open_for_conversion, open_image

    started = time.monotonic()
    if dry_run:
        img = await open_image(path, fmt=fmt, readonly=True)
        try:
            if isinstance(img, QedImage):
                return None
            if not isinstance(img, Qcow2Image):
                raise InvalidRequestError(
                    f"only qcow2 images convert in place (this is {img.format_name})",
                    filename=path,
                )
            return await InPlaceConverter(img, discard_snapshots=discard_snapshots).plan(
                _phase(checkpoint, 0)
            )
        finally:
            await img.close()
    img = await open_for_conversion(path, fmt=fmt)
    if isinstance(img, QedImage):
        try:
            size_before = await img.store.size()
            allocated_before = await img.store.allocated_bytes()
            report = await reclaim_and_report(
                img, reclaim_mode, _phase(checkpoint, 2), None, 0, started
            )
            return replace(
                report,
                resumed=True,
                file_size_before=size_before,
                allocated_before=allocated_before,
                filename=path,
            )
        finally:
            await img.close()
    if not isinstance(img, Qcow2Image):
        await img.close()
        raise InvalidRequestError(
            f"only qcow2 images convert in place (this is {img.format_name})", filename=path
        )
    converter = InPlaceConverter(img, discard_snapshots=discard_snapshots, reclaim=reclaim_mode)
    try:
        plan = await converter.plan(_phase(checkpoint, 0))
        await converter.write_tables(_phase(checkpoint, 1))
        qed = await converter.switch()
        return await reclaim_and_report(
            qed, reclaim_mode, _phase(checkpoint, 2), plan, converter.bytes_written, started
        )
    finally:
        await converter.close()
