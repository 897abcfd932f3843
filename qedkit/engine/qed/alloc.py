"""The allocator: the one owner of where clusters go in a QED file.

References: qed_spec "Cluster allocation"; QEMU block/qed.c (qed_alloc_clusters).

Theory of operation
-------------------
QED has no free list and no reference counts. QEMU allocates at ``file_end``: the
file length rounded down to a whole cluster at open, advanced by every allocation;
bytes after the last whole cluster may be overwritten. ``Allocator`` keeps that
pointer and is the only code that moves it, so every other piece of the driver (the
tables, copy-on-write, repair, defragmentation, copy-on-read) asks it for space.

Which host cluster belongs to what is known only by reading every table. Jobs that
move clusters, and the keep-defragmented policy, need that answer all the time, so
``ClusterMap.scan`` builds it once (one pass over the tables) and the allocator keeps
it current: every allocation claims its clusters, and a mover releases a slot only
once the table update that freed it is durable.

Placement policy:

* **end** (QEMU's, the default): new clusters and tables at the end of the file.
  Defragmentation packs such an image (``TargetLayout.packed``), after which
  appending keeps every new run of clusters in one host extent.
* **home** (the autoclear bit HOME_ALLOCATION, the *identity* layout): a new data
  cluster goes to its home slot (``data_start + guest_offset``) when that slot is
  free, else past the home area; new L2 tables go past the home area, never onto
  another cluster's home. The file then spans the whole virtual disk, sparsely, and
  every QED checker counts the holes as leaked clusters: that is the price of a
  layout that stays raw-like whatever order the guest writes in.

While a job lays the file out (``reserved_end``), tables placed by the home policy
go past the area it plans.

Slots inside the file may hold stale bytes: ``place_data`` says when it returned
such a slot, and the caller flushes the new data before an entry points at it.
"""

from __future__ import annotations

import bisect
import enum
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ...errors import CorruptImageError
from ...format.geometry import Geometry

FREE = -1  # no table references the cluster (a leak, a hole, space past a move)
META = -2  # header, L1 or an L2 table


@dataclass(frozen=True, slots=True)
class TableSource:
    """What a cluster-map scan reads: the narrow view of an image's tables.

    ``get_l2(l1_index)`` returns the (validated) L2 table or None; ``check_entry``
    raises CorruptImageError for an invalid data entry (index, entry, l1_index)."""

    geo: Geometry
    l1_table_offset: int
    l1: array[int]
    get_l2: Callable[[int], Awaitable[array[int] | None]]
    check_entry: Callable[[int, int, int], None]
    filename: str


class ClusterMap:
    """Owner of every host cluster up to the end of the file: FREE, META, or the index
    of the guest cluster whose data it holds. Clusters past the end are FREE."""

    def __init__(
        self,
        cluster_bits: int,
        clusters: int,
        guest_clusters: int = 0,
        filename: str | None = None,
    ) -> None:
        self.cluster_bits = cluster_bits
        self.filename = filename
        # 4 bytes per host cluster when guest cluster numbers fit (64 KiB clusters:
        # images up to 128 TiB), else 8.
        self.typecode = "i" if guest_clusters < 2**31 else "q"
        self.owner = array(self.typecode, [FREE]) * clusters

    def __len__(self) -> int:
        return len(self.owner)

    @classmethod
    async def scan(cls, source: TableSource, file_end: int, guest_clusters: int) -> ClusterMap:
        """Build the map by reading every L2 table. Raises CorruptImageError if a
        cluster has two owners (run a repair first)."""
        geo = source.geo
        bits = geo.cluster_bits
        cmap = cls(bits, file_end >> bits, guest_clusters + 1, source.filename)
        for index in range(geo.header_size):
            cmap.owner[index] = META
        cmap.claim_range(source.l1_table_offset >> bits, geo.table_size, META)
        span_clusters = geo.l2_entries
        for l1_index, l2_offset in enumerate(source.l1):
            if not l2_offset:
                continue
            table = await source.get_l2(l1_index)  # validates the L1 entry
            assert table is not None
            cmap.claim_range(l2_offset >> bits, geo.table_size, META)
            base = l1_index * span_clusters
            for index, entry in enumerate(table):
                if entry > 1:
                    if not geo.is_valid_cluster_offset(entry, file_end):
                        # Checked before claiming: one flipped high bit must not
                        # size the map for an offset far past the end of the file.
                        source.check_entry(index, entry, l1_index)
                    cmap.claim_range(entry >> bits, 1, base + index)
        return cmap

    def grow(self, clusters: int) -> None:
        if clusters > len(self.owner):
            self.owner.extend(array(self.typecode, [FREE]) * (clusters - len(self.owner)))

    def get(self, index: int) -> int:
        return self.owner[index] if index < len(self.owner) else FREE

    def is_free(self, index: int, count: int = 1) -> bool:
        owner = self.owner
        end = min(index + count, len(owner))
        return all(owner[i] == FREE for i in range(index, end))

    def claim_range(self, index: int, count: int, who: int) -> None:
        """Give ``count`` clusters from ``index`` to ``who`` (they must be free, or
        already ``who``'s)."""
        self.grow(index + count)
        owner = self.owner
        for i in range(index, index + count):
            if owner[i] != FREE and owner[i] != who:
                raise CorruptImageError(
                    f"cluster at {i << self.cluster_bits:#x} is referenced twice "
                    f"(run 'qed check -r all' first)",
                    filename=self.filename,
                    offset=i << self.cluster_bits,
                    field="cluster",
                )
            owner[i] = who

    def claim_data(self, index: int, count: int, guest_cluster: int) -> None:
        """Give clusters from ``index`` to the data of guest clusters from
        ``guest_cluster`` (one each, in order); they must be free."""
        self.grow(index + count)
        owner = self.owner
        for k in range(count):
            if owner[index + k] != FREE:
                raise CorruptImageError(
                    f"allocating the cluster at {(index + k) << self.cluster_bits:#x}, "
                    f"which is in use",
                    filename=self.filename,
                    offset=(index + k) << self.cluster_bits,
                    field="cluster",
                )
            owner[index + k] = guest_cluster + k

    def release(self, index: int, count: int = 1) -> None:
        owner = self.owner
        for i in range(index, min(index + count, len(owner))):
            owner[i] = FREE

    def free_clusters(self, start: int = 0) -> Iterator[int]:
        owner = self.owner
        for i in range(start, len(owner)):
            if owner[i] == FREE:
                yield i

    def first_free_run(self, start: int, count: int) -> int:
        """The first index >= ``start`` beginning ``count`` free clusters (the map
        is FREE past its end, so there always is one)."""
        index = start
        while not self.is_free(index, count):
            index += 1
        return index

    def last_used(self) -> int:
        """Index of the last owned cluster (-1 if none)."""
        owner = self.owner
        for i in range(len(owner) - 1, -1, -1):
            if owner[i] != FREE:
                return i
        return -1

    def cut(self, clusters: int) -> None:
        """Forget clusters from ``clusters`` on (the file was truncated there)."""
        del self.owner[clusters:]


class LayoutKind(enum.Enum):
    """Where a defragmented image puts its clusters (see TargetLayout)."""

    PACKED = "packed"
    IDENTITY = "identity"


@dataclass(frozen=True, slots=True)
class TargetLayout:
    """Where every table and data cluster of an image belongs once defragmented.

    * **packed** (the default): the L2 tables right after the L1 table, in L1 order,
      then the allocated data clusters in guest order with nothing between them.
      Every run of allocated guest clusters is one host extent, runs follow each
      other in guest order, and the file ends at its last data cluster, so the
      image is as compact as a ``qed convert`` of it and checks clean. The i-th
      allocated guest cluster's home is ``data_base + i * cluster_size``.
    * **identity**: guest cluster ``g`` at ``data_start + g * cluster_size`` (the
      homes of unallocated clusters stay free, as holes), the tables after the home
      area. Raw-like for any later write order (the home allocation policy keeps
      it), but the file spans the virtual disk and checkers call the holes leaks.

    ``end`` is where the planned area ends: moves that have nowhere better to go
    land at or after it.
    """

    kind: LayoutKind
    data_start: int
    cluster_bits: int
    tables: dict[int, int]  # l1 index -> target offset of its L2 table
    end: int
    data_base: int  # home of the first data cluster (packed) or of guest 0 (identity)
    data_end: int  # end of the data homes
    guests: array[int] = field(default_factory=lambda: array("q"))  # packed: sorted

    @classmethod
    def packed(
        cls, geo: Geometry, data_start: int, l1_indexes: Iterable[int], guests: array[int]
    ) -> TargetLayout:
        """``l1_indexes``: the tables that stay, in L1 order; ``guests``: every
        allocated guest cluster, ascending."""
        tables = {i: data_start + k * geo.table_bytes for k, i in enumerate(l1_indexes)}
        base = data_start + len(tables) * geo.table_bytes
        end = base + (len(guests) << geo.cluster_bits)
        bits = geo.cluster_bits
        return cls(LayoutKind.PACKED, data_start, bits, tables, end, base, end, guests)

    @classmethod
    def identity(
        cls, geo: Geometry, data_start: int, image_size: int, l1_indexes: Iterable[int]
    ) -> TargetLayout:
        home_end = data_start + geo.round_up(image_size)
        tables = {i: home_end + k * geo.table_bytes for k, i in enumerate(l1_indexes)}
        end = home_end + len(tables) * geo.table_bytes
        bits = geo.cluster_bits
        return cls(LayoutKind.IDENTITY, data_start, bits, tables, end, data_start, home_end)

    def home(self, guest: int) -> int | None:
        """Where data of guest cluster ``guest`` belongs (None: not in the plan, a
        cluster allocated after it was made)."""
        if self.kind is LayoutKind.IDENTITY:
            return self.data_base + (guest << self.cluster_bits)
        i = bisect.bisect_left(self.guests, guest)
        if i < len(self.guests) and self.guests[i] == guest:
            return self.data_base + (i << self.cluster_bits)
        return None

    def guest_at(self, offset: int) -> int | None:
        """The guest cluster whose home is the slot at ``offset``, if any."""
        if not self.data_base <= offset < self.data_end:
            return None
        i = (offset - self.data_base) >> self.cluster_bits
        return i if self.kind is LayoutKind.IDENTITY else self.guests[i]

    def packed_home(self, rank: int) -> int:
        """Home of the ``rank``-th allocated cluster in a packed layout."""
        return self.data_base + (rank << self.cluster_bits)


class Allocator:
    """Where new clusters go; the only writer of ``file_end`` and of the cluster map.

    ``file_end`` is a plain attribute for the hot path's sake: read it anywhere,
    change it only through these methods.
    """

    def __init__(
        self, geo: Geometry, file_end: int, *, data_start: int, image_size: int, home: bool
    ) -> None:
        self.geo = geo
        self.file_end = file_end
        self.data_start = data_start
        self.image_size = image_size
        self.home_allocation = home
        self.cluster_map: ClusterMap | None = None
        # A job laying the file out plans up to here: policy placements of tables
        # go past it (0: no job).
        self.reserved_end = 0
        self._bits = geo.cluster_bits

    # ---- the cluster map -------------------------------------------------------

    async def ensure_map(self, source: TableSource) -> ClusterMap:
        """The cluster ownership map, built by one scan of every table on first use
        and kept current from then on."""
        if self.cluster_map is None:
            self.cluster_map = await ClusterMap.scan(
                source, self.file_end, self.geo.bytes_to_clusters(self.image_size)
            )
        return self.cluster_map

    def forget_map(self) -> None:
        """Drop the map (after a failed move it may be wrong): the next user rescans."""
        self.cluster_map = None

    # ---- geometry of the policy ----------------------------------------------

    @property
    def home_end(self) -> int:
        """End of the home area: the home slot after the last guest cluster's."""
        return self.data_start + self.geo.round_up(self.image_size)

    def home_of(self, guest_cluster: int) -> int:
        return self.data_start + (guest_cluster << self._bits)

    # ---- placing ----------------------------------------------------------------

    def at_end(self, count: int) -> int:
        """Reserve ``count`` contiguous clusters at the end of the file (QEMU's rule);
        they are claimed in the map by the caller's ``claim``."""
        offset = self.file_end
        self.file_end += count << self._bits
        return offset

    async def place_data(
        self, source: TableSource, guest_cluster: int, count: int
    ) -> tuple[int, bool]:
        """Host offset for ``count`` new data clusters of guest clusters from
        ``guest_cluster``, claimed for them. The second value says whether the slots
        lie inside the file (reused space: stale bytes are possible there)."""
        bits = self._bits
        if self.home_allocation:
            cmap = await self.ensure_map(source)
            home = self.home_of(guest_cluster)
            if cmap.is_free(home >> bits, count):
                in_file = home < self.file_end
                self.file_end = max(self.file_end, home + (count << bits))
                cmap.claim_data(home >> bits, count, guest_cluster)
                return home, in_file
            # Home taken: go past the home area, never onto another cluster's home.
            old_end = self.file_end
            host = self.outside_home(count)
            cmap.claim_data(host >> bits, count, guest_cluster)
            return host, host < old_end
        return self.place_at_end(guest_cluster, count), False

    def place_at_end(self, guest_cluster: int, count: int) -> int:
        """``place_data`` under the end policy (no home allocation), which never
        waits: ``count`` new clusters at the end of the file, claimed for guest
        clusters from ``guest_cluster``."""
        host = self.at_end(count)
        if self.cluster_map is not None:
            self.cluster_map.claim_data(host >> self._bits, count, guest_cluster)
        return host

    def place_table(self) -> int:
        """Host offset for a new L2 table, claimed as metadata."""
        count = self.geo.table_size
        if self.home_allocation and self.cluster_map is not None:
            # Tables go past the home area, which stays for data (raw-like layout).
            offset = self.outside_home(count)
        else:
            offset = self.at_end(count)
        if self.cluster_map is not None:
            self.cluster_map.claim_range(offset >> self._bits, count, META)
        return offset

    def outside_home(self, count: int) -> int:
        """Reserve ``count`` free clusters at or after the end of the home area (the
        first such run; the file grows as needed). Needs the cluster map."""
        cmap = self.cluster_map
        assert cmap is not None
        start = max(self.home_end, self.reserved_end) >> self._bits
        host = cmap.first_free_run(start, count) << self._bits
        self.file_end = max(self.file_end, host + (count << self._bits))
        return host

    def free_run(self, start: int, count: int) -> int:
        """The first ``count`` free clusters at or after byte ``start`` (past the end
        of the file if need be), not claimed. Needs the cluster map."""
        cmap = self.cluster_map
        assert cmap is not None
        return cmap.first_free_run(start >> self._bits, count) << self._bits

    def claim(self, offset: int, count: int, owner: int) -> None:
        """Claim ``count`` clusters at ``offset`` for ``owner`` (a guest cluster index,
        or META for a table), growing the file if they lie past its end. Needs the
        cluster map."""
        cmap = self.cluster_map
        assert cmap is not None
        if owner == META:
            cmap.claim_range(offset >> self._bits, count, META)
        else:
            cmap.claim_data(offset >> self._bits, count, owner)
        self.file_end = max(self.file_end, offset + (count << self._bits))

    def release(self, offset: int, count: int = 1) -> None:
        """Give clusters back (their table update is durable); no-op without a map."""
        if self.cluster_map is not None:
            self.cluster_map.release(offset >> self._bits, count)

    def truncated(self, end: int) -> None:
        """The file was cut at ``end``: the pointer and the map follow."""
        self.file_end = end
        if self.cluster_map is not None:
            self.cluster_map.cut(end >> self._bits)

    def last_used_end(self) -> int:
        """End of the last owned cluster. Needs the cluster map."""
        cmap = self.cluster_map
        assert cmap is not None
        return (cmap.last_used() + 1) << self._bits
