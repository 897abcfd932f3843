"""The QED driver, split as QEMU splits block/qed*.c.

=============  ===================================================================
module         owns
=============  ===================================================================
image          open/create, the header and its flags, flush, resize, backing-name
               changes, close (QedImage, assembled from the layers below)
tables         the L1 table, the L2 cache, every table write and its ordering
lookup         guest ranges to runs, block status, host contiguity (the fast path)
alloc          the end of the file, the cluster map, the placement policy
io             read, write, write-zeroes, discard, copy-on-write fill, copy-on-read
               (copy_up), write stalls, and the synchronous fast paths next to the
               paths they shortcut
move           crash-safe moves of clusters and tables (defrag, leak compaction)
=============  ===================================================================

Check and repair (engine.check) and opening with the backing chain (engine.chain)
build on this package; nothing here imports them.
"""

from __future__ import annotations

from .alloc import FREE, META, Allocator, ClusterMap, LayoutKind, TargetLayout
from .image import QedImage
from .io import Filled, FillGroup, fill_zero, is_zero
from .move import CompactStats, Move, Mover, Planned

__all__ = [
    "FREE",
    "META",
    "Allocator",
    "ClusterMap",
    "CompactStats",
    "FillGroup",
    "Filled",
    "LayoutKind",
    "Move",
    "Mover",
    "Planned",
    "QedImage",
    "TargetLayout",
    "fill_zero",
    "is_zero",
]
