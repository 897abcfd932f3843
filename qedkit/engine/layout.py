"""Where things are in a QED file: cluster ownership, home positions, free slots.

QED keeps no allocation map: which host cluster belongs to what is known only by
reading every table (as the check does). Defragmentation and the home allocation
policy need it all the time, so ``ClusterMap.scan`` builds it once and the engine
keeps it current: every allocation claims its clusters, every move releases the
slot it left, once that release is durable.

Home position: guest cluster ``g`` is at home when it sits at
``data_start + g * cluster_size``, where ``data_start`` is the end of the header and
the L1 table. An image whose data clusters all sit at home lays its guest disk out
like a raw file, so a sequential guest read is a sequential host read.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import CorruptImageError

if TYPE_CHECKING:
    from .qed import QedImage

FREE = -1  # no table references the cluster (a leak, a hole, space past a move)
META = -2  # header, L1 or an L2 table


def data_start(img: QedImage) -> int:
    """The fixed start of the data area: past the header and the L1 table."""
    geo = img.geo
    end = max(geo.header_bytes, img.header.l1_table_offset + geo.table_bytes)
    return geo.round_up(end)


class ClusterMap:
    """Owner of every host cluster up to the end of the file: FREE, META, or the index
    of the guest cluster whose data it holds. Clusters past the end are FREE."""

    def __init__(self, cluster_bits: int, clusters: int, guest_clusters: int = 0) -> None:
        self.cluster_bits = cluster_bits
        # 4 bytes per host cluster when guest cluster numbers fit (64 KiB clusters:
        # images up to 128 TiB), else 8.
        self.typecode = "i" if guest_clusters < 2**31 else "q"
        self.owner = array(self.typecode, [FREE]) * clusters

    def __len__(self) -> int:
        return len(self.owner)

    @classmethod
    async def scan(cls, img: QedImage) -> ClusterMap:
        """Build the map of ``img`` by reading every L2 table. Raises
        CorruptImageError if a cluster has two owners (run a repair first)."""
        geo = img.geo
        bits = geo.cluster_bits
        cmap = cls(bits, img.file_end >> bits, geo.bytes_to_clusters(img.size) + 1)
        for index in range(geo.header_size):
            cmap.owner[index] = META
        cmap.claim_range(img.header.l1_table_offset >> bits, geo.table_size, META, img)
        span_clusters = geo.l2_entries
        for l1_index, l2_offset in enumerate(img.l1_table):
            if not l2_offset:
                continue
            table = await img.get_l2(l1_index)  # validates the L1 entry
            assert table is not None
            cmap.claim_range(l2_offset >> bits, geo.table_size, META, img)
            base = l1_index * span_clusters
            for index, entry in enumerate(table):
                if entry > 1:
                    if not geo.is_valid_cluster_offset(entry, img.file_end):
                        # Checked before claiming: one flipped high bit must not
                        # size the map for an offset far past the end of the file.
                        img._check_data_run(entry, entry, l1_index, index, index)
                    cmap.claim_range(entry >> bits, 1, base + index, img)
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

    def claim_range(self, index: int, count: int, who: int, img: QedImage | None = None) -> None:
        """Give ``count`` clusters from ``index`` to ``who`` (they must be free)."""
        self.grow(index + count)
        owner = self.owner
        for i in range(index, index + count):
            if owner[i] != FREE and owner[i] != who:
                name = img.filename if img is not None else None
                raise CorruptImageError(
                    f"cluster at {i << self.cluster_bits:#x} is referenced twice "
                    f"(run 'qed check -r all' first)",
                    filename=name,
                    offset=i << self.cluster_bits,
                    field="cluster",
                )
            owner[i] = who

    def claim_data(self, index: int, count: int, guest_cluster: int) -> None:
        """Give clusters from ``index`` to the data of guest clusters from
        ``guest_cluster`` (one each, in order)."""
        self.grow(index + count)
        owner = self.owner
        for k in range(count):
            if owner[index + k] != FREE:
                raise CorruptImageError(
                    f"allocating the cluster at {(index + k) << self.cluster_bits:#x}, "
                    f"which is in use",
                    offset=(index + k) << self.cluster_bits,
                    field="cluster",
                )
            owner[index + k] = guest_cluster + k

    def set(self, index: int, who: int) -> None:
        self.grow(index + 1)
        self.owner[index] = who

    def release(self, index: int, count: int = 1) -> None:
        owner = self.owner
        for i in range(index, min(index + count, len(owner))):
            owner[i] = FREE

    def free_clusters(self, start: int = 0) -> Iterator[int]:
        owner = self.owner
        for i in range(start, len(owner)):
            if owner[i] == FREE:
                yield i

    def last_used(self) -> int:
        """Index of the last owned cluster (-1 if none)."""
        owner = self.owner
        for i in range(len(owner) - 1, -1, -1):
            if owner[i] != FREE:
                return i
        return -1
