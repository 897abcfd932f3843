"""The pure QED format core: bytes in, values out.

Nothing in this package does I/O or imports os, io, asyncio, time or logging; a test
enforces it. The engine reads bytes and hands them here.
"""

from .geometry import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_TABLE_SIZE,
    MAX_CLUSTER_SIZE,
    MAX_TABLE_SIZE,
    MIN_CLUSTER_SIZE,
    MIN_TABLE_SIZE,
    Geometry,
    max_image_size,
    qemu_max_image_size,
)
from .header import HEADER_SIZE_BYTES, KNOWN_FEATURES, MAGIC, Feature, Header
from .probe import probe_format
from .tables import L2_UNALLOCATED, L2_ZERO_CLUSTER, pack_table, unpack_table

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_TABLE_SIZE",
    "HEADER_SIZE_BYTES",
    "KNOWN_FEATURES",
    "L2_UNALLOCATED",
    "L2_ZERO_CLUSTER",
    "MAGIC",
    "MAX_CLUSTER_SIZE",
    "MAX_TABLE_SIZE",
    "MIN_CLUSTER_SIZE",
    "MIN_TABLE_SIZE",
    "Feature",
    "Geometry",
    "Header",
    "max_image_size",
    "pack_table",
    "probe_format",
    "qemu_max_image_size",
    "unpack_table",
]
